"""GGUF tensor types and dsq's bit-exact packers for them.

Block layouts (ggml-common.h, and gguf-py's ``gguf.quants`` which the tests check against):

* ``Q4_0``: 32 weights in 18 bytes: fp16 ``d``, then 16 bytes where byte j holds nibble j (low 4 bits)
  and nibble j+16 (high 4 bits); w = (nibble - 8) * d. dsq's ``int4_sym_g32`` codes + 8 are the nibbles
  and its fp16 scale is ``d``: carried over bit for bit. ``int4_sym_g64``/``g128`` too: each block of 64/128
  is 2/4 Q4_0 blocks that repeat the same ``d`` (``split_blocks``), so GPTQ's usual g128 is carried exactly.
* ``Q4_1``: 32 weights in 20 bytes: fp16 ``d``, fp16 ``m``, 16 nibble bytes as Q4_0; w = nibble * d + m.
  dsq's ``int4_asym_g32`` is w = (q - z) * s, so d = s (already fp16) and m = -z * s rounded to fp16.
  z * s needs up to 4 more mantissa bits than fp16 holds, so m moves by at most half an fp16 ulp:
  |m - (-z*s)| <= max(2**-11 * z * s, 2**-25) per block (``q4_1_offset_bound``), added to every weight.
* ``Q8_0``: 32 weights in 34 bytes: fp16 ``d`` then 32 int8; dsq's ``int8_g32`` is the same thing.

A float tensor (or a dsq format without a GGUF twin) is quantized with the twin dsq format, which
follows ggml's reference rounding (see dsquant/formats.py), then packed the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as GT
from gguf import LlamaFileType

from dsq.dsquant.errors import UnsupportedError
from dsq.dsquant.formats import FORMATS, QuantizedTensor, check_finite, split_blocks

from .kquants import quantize_q4_k, quantize_q6_k
from .q2quants import quantize_q2_k
from .q3quants import quantize_q3_k
from .q5quants import quantize_q5_0, quantize_q5_1, quantize_q5_k

BLOCK = 32
# Floats are quantized this many elements at a time, so the temporaries of quantization stay small
# next to the tensor itself (a 150k-vocab embedding would otherwise need several float32 copies).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class GGUFType:
    name: str  # the --type spelling
    gtype: GT
    twin: str | None = None  # dsq format that is bit-exact with it (quantized types)
    torch_dtype: torch.dtype | None = None  # float types
    file_type: LlamaFileType = LlamaFileType.ALL_F32
    block: int = BLOCK  # weights per block along a row (256 for k-quants)
    # dsq's own packer (kquants.py, q2quants.py, q3quants.py, q5quants.py): float rows -> (bytes, values held)
    kquant: Callable[[torch.Tensor], tuple[np.ndarray, torch.Tensor]] | None = None

    @property
    def quantized(self) -> bool:
        return self.twin is not None or self.kquant is not None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Quantized types need the row (last dim) to be whole blocks."""
        return not self.quantized or shape[-1] % self.block == 0


#: Every GGUF type dsq writes, by its --type name.
GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("q4_0", GT.Q4_0, twin="int4_sym_g32", file_type=LlamaFileType.MOSTLY_Q4_0),
        GGUFType("q4_1", GT.Q4_1, twin="int4_asym_g32", file_type=LlamaFileType.MOSTLY_Q4_1),
        GGUFType("q5_0", GT.Q5_0, file_type=LlamaFileType.MOSTLY_Q5_0, kquant=quantize_q5_0),
        GGUFType("q5_1", GT.Q5_1, file_type=LlamaFileType.MOSTLY_Q5_1, kquant=quantize_q5_1),
        GGUFType("q8_0", GT.Q8_0, twin="int8_g32", file_type=LlamaFileType.MOSTLY_Q8_0),
        GGUFType("q2_k", GT.Q2_K, file_type=LlamaFileType.MOSTLY_Q2_K, block=256, kquant=quantize_q2_k),
        GGUFType("q3_k", GT.Q3_K, file_type=LlamaFileType.MOSTLY_Q3_K_M, block=256, kquant=quantize_q3_k),
        GGUFType("q4_k", GT.Q4_K, file_type=LlamaFileType.MOSTLY_Q4_K_S, block=256, kquant=quantize_q4_k),
        GGUFType("q5_k", GT.Q5_K, file_type=LlamaFileType.MOSTLY_Q5_K_M, block=256, kquant=quantize_q5_k),
        GGUFType("q6_k", GT.Q6_K, file_type=LlamaFileType.MOSTLY_Q6_K, block=256, kquant=quantize_q6_k),
        GGUFType("f16", GT.F16, torch_dtype=torch.float16, file_type=LlamaFileType.MOSTLY_F16),
        GGUFType("bf16", GT.BF16, torch_dtype=torch.bfloat16, file_type=LlamaFileType.MOSTLY_BF16),
        GGUFType("f32", GT.F32, torch_dtype=torch.float32, file_type=LlamaFileType.ALL_F32),
    )
}

#: dsq format -> the GGUF type that holds it exactly (block 32, or a multiple of 32 split into blocks of 32 that
#: repeat the scale: ``is_exact``) or most nearly (FP8).
NEAREST: dict[str, str] = {
    "int4_sym_g32": "q4_0",
    "int4_sym_g64": "q4_0",
    "int4_sym_g128": "q4_0",
    "int4_asym_g32": "q4_1",
    "int4_asym_g64": "q4_1",
    "int4_asym_g128": "q4_1",
    "int8_g32": "q8_0",
    "int8_g128": "q8_0",
    "int8_channel": "q8_0",
    "fp8_b128": "q8_0",
}
assert set(NEAREST) == set(FORMATS), "every dsq format needs a nearest GGUF type"

FLOAT_OF: dict[torch.dtype, str] = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


def get_type(name: str) -> GGUFType:
    try:
        return GGUF_TYPES[name.lower()]
    except KeyError:
        raise UnsupportedError(
            f"--type {name}: not a GGUF type dsq writes; choose auto or one of: {', '.join(GGUF_TYPES)}"
        ) from None


def is_exact(qt: QuantizedTensor, t: GGUFType) -> bool:
    """Whether ``qt`` goes into ``t`` without re-rounding: its twin format, or a larger group of the same kind
    (int4_sym_g64/g128 -> Q4_0, int4_asym_g* -> Q4_1, int8_g128/channel -> Q8_0; ``split_blocks``)."""
    if t.twin is None:
        return False
    src, dst = qt.fmt, FORMATS[t.twin]
    if t.twin == qt.format:
        return True
    group = src.block_cols or qt.shape[1]
    return (type(src) is type(dst) and src.block_rows == 1 and group % dst.block_cols == 0
            and qt.shape[1] % dst.block_cols == 0)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 values [..., n] -> their little-endian bytes [..., 2n] as uint8."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [rows, nb, 32] -> [rows, nb, 16] bytes: j low, j+16 high (ggml's order)."""
    u = u.to(torch.uint8)
    return u[..., :16] | (u[..., 16:] << 4)


def _block_values(qt: QuantizedTensor) -> torch.Tensor:
    """dsq's dequantization of a block-32 tensor, broadcast per block (no repeat_interleave copies)."""
    rows, cols = qt.shape
    codes = qt.codes.to(torch.float32).reshape(rows, cols // BLOCK, BLOCK)
    if qt.zero is not None:
        codes = codes - qt.zero.to(torch.float32)[..., None]
    return (codes * qt.scale.to(torch.float32)[..., None]).reshape(rows, cols)


def q4_1_offset(qt: QuantizedTensor) -> torch.Tensor:
    """Q4_1's m for dsq's asymmetric codes: -z * s, computed exactly in float32 then rounded to fp16."""
    return (-(qt.zero.to(torch.float32) * qt.scale.to(torch.float32))).to(torch.float16)


def q4_1_offset_bound(qt: QuantizedTensor) -> torch.Tensor:
    """Per-block bound on |fp16(m) - (-z*s)|: half an fp16 ulp (relative 2**-11, subnormal floor 2**-25)."""
    exact = (qt.zero.to(torch.float32) * qt.scale.to(torch.float32)).abs()
    return torch.maximum(exact * 2.0**-11, torch.full_like(exact, 2.0**-25))


def pack_exact(qt: QuantizedTensor, t: GGUFType) -> np.ndarray:
    """Re-pack dsq's codes and scales into GGUF blocks without re-rounding the codes. -> uint8 bytes."""
    rows, cols = qt.shape
    nb = cols // BLOCK
    head_bytes = {GT.Q4_0: 2, GT.Q4_1: 4, GT.Q8_0: 2}[t.gtype]
    body_bytes = BLOCK if t.gtype == GT.Q8_0 else BLOCK // 2
    out = torch.empty(rows, nb, head_bytes + body_bytes, dtype=torch.uint8)  # filled in place: no concat copy
    if t.gtype == GT.Q4_0:
        out[..., 2:] = _nibbles((qt.codes.to(torch.int16) + 8).reshape(rows, nb, BLOCK))
        out[..., :2] = _fp16_bytes(qt.scale.reshape(rows, nb, 1))
    elif t.gtype == GT.Q4_1:
        out[..., 4:] = _nibbles(qt.codes.reshape(rows, nb, BLOCK))
        d_m = torch.stack([qt.scale.to(torch.float16), q4_1_offset(qt)], dim=-1)  # d first, then m
        out[..., :4] = _fp16_bytes(d_m.reshape(rows, nb, 2))
    else:
        out[..., 2:] = qt.codes.to(torch.int8).reshape(rows, nb, BLOCK).view(torch.uint8)
        out[..., :2] = _fp16_bytes(qt.scale.reshape(rows, nb, 1))
    return out.reshape(-1).numpy()


def encode(value: QuantizedTensor | torch.Tensor, t: GGUFType, name: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Bytes of one tensor (or one row-block of a stacked tensor) in GGUF type ``t``, plus, when values were
    re-rounded, (sum of squared change, sum of squared source values) for the report's relative error.

    A QuantizedTensor in ``t``'s twin format is packed exactly (None: nothing changed); anything else is
    dequantized and quantized with the twin format (ggml's reference rounding) or cast to a float type (None).
    The change is measured on dsq's dequantization of what was packed: equal to the GGUF's values for
    Q4_0/Q8_0, within ``q4_1_offset_bound`` for Q4_1 (tests check both), so no bytes are decoded.
    """
    if isinstance(value, QuantizedTensor) and is_exact(value, t):
        return pack_exact(split_blocks(value, t.twin), t), None
    w = value.dequantize() if isinstance(value, QuantizedTensor) else value
    if not t.quantized:
        return w.to(t.torch_dtype).contiguous().view(torch.uint8).reshape(-1).numpy(), None
    shape = tuple(w.shape)
    if not t.fits(shape):
        raise UnsupportedError(
            f"{name}: rows of {shape[-1]} are not a multiple of {t.block}, which {t.name.upper()} needs"
        )
    rows = w.reshape(-1, shape[-1])
    step = max(1, CHUNK_ELEMENTS // shape[-1])
    parts, change, norm = [], 0.0, 0.0
    for i in range(0, rows.shape[0], step):  # row chunks: blocks never span rows, so results are identical
        chunk = rows[i : i + step].float()
        if t.kquant is not None:
            check_finite(chunk, name, (1, t.block))
            data, held = t.kquant(chunk)
            c = float((held - chunk).pow(2).sum())
        else:
            data, c = _quantize_fast(chunk, t) if t.gtype in FAST_REFERENCE else (None, 0.0)
        if data is None:
            qt = FORMATS[t.twin].quantize(chunk, name)  # also where NaN/Inf and fp16 overflow get their error
            data, c = pack_exact(qt, t), float((_block_values(qt) - chunk).pow(2).sum())
        parts.append(data)
        change += c
        norm += float(chunk.pow(2).sum())
    return (np.concatenate(parts) if len(parts) > 1 else parts[0]), (change, norm)


# Types whose gguf-py numpy quantizer is ggml's reference rounding, i.e. byte-identical to dsq's twin
# format (test_gguf_quants checks it): used for floats because it is ~8x faster than the generic path.
FAST_REFERENCE = {GT.Q4_0, GT.Q8_0}


def _quantize_fast(chunk: torch.Tensor, t: GGUFType) -> tuple[np.ndarray | None, float]:
    """gguf-py's reference quantizer on finite input whose scales fit fp16; (None, 0) to take dsq's path."""
    from gguf.quants import dequantize, quantize

    x = chunk.numpy()
    if not np.isfinite(x).all():
        return None, 0.0
    data = quantize(x, t.gtype)
    block_bytes = data.shape[-1] // (x.shape[-1] // BLOCK)
    d = data.reshape(-1, block_bytes)[:, :2].copy().view(np.float16)
    if not np.isfinite(d).all():
        return None, 0.0
    diff = dequantize(data, t.gtype) - x
    return data.reshape(-1), float(np.square(diff, dtype=np.float64).sum())


def nbytes(t: GGUFType, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[t.gtype]
    n = int(np.prod(shape))
    return n // block * size
