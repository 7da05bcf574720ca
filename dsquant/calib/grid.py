"""The quantization grid of each dsq format, element-wise: codes for given block scales, and scale helpers.

Calibrated methods choose codes (GPTQ) or scales (imatrix, AWQ, FP8 search) differently from the
formats' round-to-nearest, but they must store the *same layout*: codes in the format's integer
(or e4m3) range and one scale (and zero point) per block, in the format's storage dtypes. Every
result is a :class:`QuantizedTensor` whose ``dequantize()`` is exactly the weight the method
optimised, so GGUF/ONNX writers re-pack it without re-rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats import QuantFormat, QuantizedTensor


@dataclass(frozen=True)
class Codec:
    """Element-wise code range of a format family (float8: ``qmin``/``qmax`` bound the value)."""

    qmin: float
    qmax: float
    dtype: torch.dtype
    asymmetric: bool = False
    fp8: bool = False


def codec(fmt: QuantFormat) -> Codec:
    """The format's code range and dtype, as the format states them (``QuantFormat.qmin/qmax/code_dtype``)."""
    return Codec(fmt.qmin, fmt.qmax, fmt.code_dtype, asymmetric=not fmt.symmetric, fp8=fmt.float_codes)


def encode(fmt: QuantFormat, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Codes of ``w`` for element-wise (already expanded) float32 ``scale``/``zero``; same shape as w."""
    c = codec(fmt)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    x = w / safe
    if c.fp8:
        return x.clamp(c.qmin, c.qmax).to(c.dtype)
    q = torch.floor(x + 0.5)  # round half up (ggml's trunc(x + 8.5) - 8 for Q4_0)
    if zero is not None:
        q = q + zero
    q = torch.where(scale == 0, zero if zero is not None else torch.zeros_like(q), q)
    return q.clamp(c.qmin, c.qmax).to(c.dtype)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    q = codes.to(torch.float32)
    if zero is not None:
        q = q - zero
    return q * scale


def expand(fmt: QuantFormat, t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-block [R, C] -> element-wise float32 (cropping partial edge blocks)."""
    return fmt._expand(t.to(torch.float32), shape)


def block_sum(fmt: QuantFormat, e: torch.Tensor) -> torch.Tensor:
    """Element-wise [out, in] -> per-block sums [R, C] (partial edge blocks padded with zeros)."""
    rows, cols = e.shape
    br, bc = fmt.block((rows, cols))
    gr, gc = math.ceil(rows / br), math.ceil(cols / bc)
    if (gr * br, gc * bc) != (rows, cols):
        e = torch.nn.functional.pad(e, (0, gc * bc - cols, 0, gr * br - rows))
    return e.reshape(gr, br, gc, bc).sum(dim=(1, 3))


def scaled_params(
    fmt: QuantFormat, w: torch.Tensor, base: QuantizedTensor, factor: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block scale ``base.scale * factor`` in the format's scale dtype, and the zero point that goes with
    it (asymmetric formats: ``round(-min / s)`` over the block's range including 0)."""
    scale = (base.scale.to(torch.float32) * factor).to(base.scale.dtype)
    if base.zero is None:
        return scale, None
    lo = -block_sum_min(fmt, w)
    s = scale.to(torch.float32)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    zero = torch.round(lo / safe).clamp(0, codec(fmt).qmax).to(torch.uint8)
    return scale, zero


def block_sum_min(fmt: QuantFormat, w: torch.Tensor) -> torch.Tensor:
    """Per-block min(w, 0) (asymmetric formats keep 0 in range)."""
    rows, cols = w.shape
    br, bc = fmt.block((rows, cols))
    return w.reshape(rows // br, br, cols // bc, bc).amin(dim=(1, 3)).clamp(max=0.0)


def quantize_with(
    fmt: QuantFormat, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
) -> QuantizedTensor:
    """The QuantizedTensor of ``w`` on the given per-block grid."""
    shape = (int(w.shape[0]), int(w.shape[1]))
    se = expand(fmt, scale, shape)
    ze = expand(fmt, zero, shape) if zero is not None else None
    return QuantizedTensor(fmt.name, shape, encode(fmt, w, se, ze), scale, zero)
