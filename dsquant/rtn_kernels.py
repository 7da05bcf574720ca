"""Round-to-nearest kernels of the streaming quantizer, compiled with numba (one pass over a row chunk each).

* ``q4_sym_rows``: ggml's ``quantize_row_q4_0_ref`` for blocks of any width ``g`` (dsq's ``int4_sym_g*``):
  per block the element of largest magnitude, sign kept, first on ties (gguf-py's argmax; C's scan differs
  only on an all-zero block, where it keeps +0 and gguf-py the first zero's sign: d is then -0.0 or +0.0),
  d = it / -8, id = d ? 1/d : 0, code = min(15, (int)(x * id + 8.5)) - 8 in float32, C's operations in C's
  order. A subnormal d makes 1/d infinite; then x * id + 8.5 is +-inf or NaN and the code is what the
  float-to-int8 conversion of ``clamp(trunc(t), 0, 15)`` gives on x86 (NaN: 0; +inf: 7; -inf: -8), as
  dsq's torch formula always gave.
* ``block_error``: the quantize report's error sums of a chunk, ((c - z) * s - x)^2 and x^2 summed, and
  max |(c - z) * s - x|, without materialising the dequantized copy (float64 sums).

Both release the GIL, so the chunk threads of ``formats.StreamPool`` run them on every core.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_jit = njit(cache=True, nogil=True, error_model="numpy")


@_jit
def _row_f32(xr, bf16, buf, bufu):
    """Row ``xr`` as float32 in ``buf`` (L1/L2-sized): bf16 bits (uint16) widened exactly through ``bufu``
    (``buf``'s uint32 view), or float32 copied."""
    if bf16:
        for i in range(xr.shape[0]):
            bufu[i] = np.uint32(xr[i]) << np.uint32(16)
    else:
        for i in range(xr.shape[0]):
            buf[i] = xr[i]
    return buf


@_jit
def _q4_sym(x, bf16, g, codes, d_out):
    n, cols = x.shape
    nb = cols // g
    bad = False
    buf = np.empty(cols, np.float32)
    bufu = buf.view(np.uint32)
    for r in range(n):
        xr = _row_f32(x[r], bf16, buf, bufu)
        cr = codes[r]
        for j in range(nb):
            amax = np.float32(-1.0)  # the first element of largest |v|, as argmax (and gguf-py) pick it
            mx = np.float32(0.0)
            for i in range(j * g, j * g + g):
                v = xr[i]
                a = abs(v)
                bad |= not a <= np.float32(3.4028234663852886e38)  # NaN or Inf
                if a > amax:
                    amax = a
                    mx = v
            d = mx / np.float32(-8.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            d_out[r, j] = d
            for i in range(j * g, j * g + g):
                t = xr[i] * inv + np.float32(8.5)
                t = min(max(t, np.float32(0.0)), np.float32(15.0))
                cr[i] = np.int8(np.int32(t) - 8) if t == t else np.int8(0)
    return bad


def _bits(x) -> tuple[np.ndarray, bool]:
    """A torch/numpy float tensor as what the kernels read: bf16 as its uint16 bits (widened in the kernel,
    exactly), float32 as is, anything else converted to float32."""
    import torch

    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.contiguous().view(torch.uint16).numpy(), True
        x = x.to(torch.float32).contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32), False


def q4_sym_rows(x, g: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Rows [n, cols] (a bf16/float torch tensor or float32 array; cols a multiple of ``g``) -> (int8 codes
    [n, cols] in [-8, 7], float32 d [n, cols / g], whether a NaN/Inf was seen: then the caller locates it
    and refuses the tensor)."""
    xb, bf16 = _bits(x)
    codes = np.empty(xb.shape, np.int8)
    d = np.empty((xb.shape[0], xb.shape[1] // g), np.float32)
    bad = bool(_q4_sym(xb, bf16, g, codes, d)) if xb.size else False
    return codes, d, bad


@njit(cache=True, nogil=True, error_model="numpy", fastmath=True)  # sums may be reordered: a statistic
def _block_error(x, bf16, codes, scale, zero, has_zero, g):
    n, cols = x.shape
    sq_err = 0.0
    sq_ref = 0.0
    mx = np.float32(0.0)
    buf = np.empty(cols, np.float32)
    bufu = buf.view(np.uint32)
    for r in range(n):
        xr = _row_f32(x[r], bf16, buf, bufu)
        cr = codes[r]
        for j in range(cols // g):
            s = scale[r, j]
            z = zero[r, j] if has_zero else np.float32(0.0)
            se = np.float32(0.0)  # per block in float32 (vectorised), the totals in float64
            sr = np.float32(0.0)
            mb = np.float32(0.0)
            for i in range(j * g, j * g + g):
                deq = (np.float32(cr[i]) - z) * s
                diff = deq - xr[i]
                se += diff * diff
                sr += xr[i] * xr[i]
                mb = max(mb, abs(diff))
            sq_err += np.float64(se)
            sq_ref += np.float64(sr)
            mx = max(mx, mb)
    return sq_err, sq_ref, np.float64(mx)


def block_error(x, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, g: int) -> tuple[float, float, float]:
    """(sum of squared error, sum of squared weights, max |error|) of rows x [n, cols] (bf16/float tensor or
    float32 array) against codes
    [n, cols] (int8 or uint8) dequantized as dsq does, (c - zero) * scale per block of ``g`` columns; scale
    and zero float32 [n, cols / g]."""
    xb, bf16 = _bits(x)
    if not xb.size:
        return 0.0, 0.0, 0.0
    z = scale if zero is None else np.ascontiguousarray(zero, dtype=np.float32)
    return _block_error(xb, bf16, np.ascontiguousarray(codes), np.ascontiguousarray(scale, dtype=np.float32), z,
                        zero is not None, g)


@_jit
def _unpack_nibbles(b, out):
    n, nbytes = b.shape
    cols = out.shape[1]
    for r in range(n):
        br = b[r]
        orow = out[r]
        for i in range(cols // 2):
            v = br[i]
            orow[2 * i] = v & 15
            orow[2 * i + 1] = v >> 4
        if cols % 2:
            orow[cols - 1] = br[cols // 2] & 15


def unpack_nibbles(b: np.ndarray, cols: int) -> np.ndarray:
    """Bytes [rows, nbytes] holding two 4-bit codes each (low nibble first) -> uint8 codes [rows, cols], in one
    pass and one allocation (compressed-tensors' int32 words of 4-bit codes are such bytes, little-endian)."""
    out = np.empty((b.shape[0], cols), np.uint8)
    if out.size:
        _unpack_nibbles(np.ascontiguousarray(b), out)
    return out


@_jit
def _pack_nibbles(u, offset, out):
    n, cols = u.shape
    for r in range(n):
        ur = u[r]
        orow = out[r]
        for i in range(cols // 2):
            orow[i] = np.uint8((ur[2 * i] + offset) & 15) | np.uint8(((ur[2 * i + 1] + offset) & 15) << 4)
        if cols % 2:
            orow[cols // 2] = np.uint8((ur[cols - 1] + offset) & 15)


def pack_nibbles(u: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
    """4-bit codes [rows, cols] (uint8, or int8 with ``offset`` 8 making them unsigned) -> bytes [rows, nbytes]
    (two codes per byte, low nibble first, zero padded): one pass, no shifted copies."""
    out = np.zeros((u.shape[0], nbytes), np.uint8)
    if u.size:
        _pack_nibbles(np.ascontiguousarray(u).view(np.uint8), np.uint8(offset), out)
    return out


def quantized_error(w, qt) -> tuple[float, float, float]:
    """(sum of squared error, sum of squared weights, max |error|) of rows ``w`` [n, cols] (bf16/float tensor)
    against the QuantizedTensor ``qt`` of them: ``block_error`` for row-block formats (int4/int8 groups and
    channels: codes int8/uint8, one scale (and zero) per block of one row), else from ``qt.dequantize()``
    (FP8, GGUF grids) in float32 dot products."""
    import torch

    fmt = qt.fmt
    rows, cols = qt.shape
    br, bc = fmt.block(qt.shape)
    if (br != 1 or not bc or cols % bc or not cols or qt.codes.dtype not in (torch.int8, torch.uint8)
            or hasattr(fmt, "stored")):
        x = w.to(torch.float32).reshape(-1)
        diff = qt.dequantize().reshape(-1) - x
        if not diff.numel():
            return float(torch.dot(diff, diff)), float(torch.dot(x, x)), 0.0
        lo, hi = torch.aminmax(diff)
        return float(torch.dot(diff, diff)), float(torch.dot(x, x)), max(float(-lo), float(hi))
    zero = None if qt.zero is None else qt.zero.to(torch.float32).numpy()
    return block_error(w, qt.codes.numpy(), qt.scale.to(torch.float32).numpy(), zero, bc)
