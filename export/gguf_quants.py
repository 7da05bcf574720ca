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

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from gguf import GGMLQuantizationType as GT
from gguf import LlamaFileType

from dsq.dsquant.errors import UnsupportedError
from dsq.dsquant.formats import FORMATS, QuantizedTensor, StreamPool, check_finite, row_chunks, split_blocks
from dsq.dsquant.kq_types import KSPEC, pack, quantize_k, quantize_legacy
from dsq.dsquant.rtn_kernels import quantized_error

from .q5quants import quantize_q4_1, quantize_q5_0, quantize_q5_1

BLOCK = 32


def _legacy(kind: str, ref: Callable, rows: torch.Tensor, importance: np.ndarray | None = None):
    """ggml's reference packer without importance, its imatrix path (``quantize_row_qX_impl``) with it."""
    return ref(rows) if importance is None else quantize_legacy(kind, rows, importance)


@dataclass(frozen=True)
class GGUFType:
    name: str  # the --type spelling
    gtype: GT
    twin: str | None = None  # dsq format that is bit-exact with it (quantized types)
    torch_dtype: torch.dtype | None = None  # float types
    file_type: LlamaFileType = LlamaFileType.ALL_F32
    block: int = BLOCK  # weights per block along a row (256 for k-quants)
    # dsq's own packer (kq_types.py, q5quants.py): (float rows, optional per-column importance) -> (bytes, the
    # values held), byte-equal to ggml_quantize_chunk's (with importance: its imatrix path)
    kquant: Callable[[torch.Tensor, np.ndarray | None], tuple[np.ndarray, torch.Tensor]] | None = None

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
        GGUFType("q4_1", GT.Q4_1, twin="int4_asym_g32", file_type=LlamaFileType.MOSTLY_Q4_1,
                 kquant=partial(_legacy, "q4_1", quantize_q4_1)),  # floats: ggml's rounding; int4_asym: carried
        GGUFType("q5_0", GT.Q5_0, file_type=LlamaFileType.MOSTLY_Q5_0, kquant=partial(_legacy, "q5_0", quantize_q5_0)),
        GGUFType("q5_1", GT.Q5_1, file_type=LlamaFileType.MOSTLY_Q5_1, kquant=partial(_legacy, "q5_1", quantize_q5_1)),
        GGUFType("q8_0", GT.Q8_0, twin="int8_g32", file_type=LlamaFileType.MOSTLY_Q8_0),
        GGUFType("q2_k", GT.Q2_K, file_type=LlamaFileType.MOSTLY_Q2_K, block=256, kquant=partial(quantize_k, "q2_k")),
        GGUFType("q3_k", GT.Q3_K, file_type=LlamaFileType.MOSTLY_Q3_K_M, block=256, kquant=partial(quantize_k, "q3_k")),
        GGUFType("q4_k", GT.Q4_K, file_type=LlamaFileType.MOSTLY_Q4_K_S, block=256, kquant=partial(quantize_k, "q4_k")),
        GGUFType("q5_k", GT.Q5_K, file_type=LlamaFileType.MOSTLY_Q5_K_M, block=256, kquant=partial(quantize_k, "q5_k")),
        GGUFType("q6_k", GT.Q6_K, file_type=LlamaFileType.MOSTLY_Q6_K, block=256, kquant=partial(quantize_k, "q6_k")),
        GGUFType("f16", GT.F16, torch_dtype=torch.float16, file_type=LlamaFileType.MOSTLY_F16),
        GGUFType("bf16", GT.BF16, torch_dtype=torch.bfloat16, file_type=LlamaFileType.MOSTLY_BF16),
        GGUFType("f32", GT.F32, torch_dtype=torch.float32, file_type=LlamaFileType.ALL_F32),
    )
}

def nearest_type(fmt_name: str) -> GGUFType:
    """The GGUF type for a dsq format, from the format's facts: a format named as a GGUF type is that type's
    own grid; else its twin; else the type whose twin has the same packing, bits and symmetry (int4_sym_g128
    -> Q4_0, int8_channel -> Q8_0: exact when the row splits into blocks of 32, ``is_exact``); else the one
    of the same bits and symmetry, re-quantized (FP8 -> Q8_0).
    Raises UnsupportedError naming the format when no GGUF type dsq writes is like it."""
    if fmt_name in GGUF_TYPES:
        return GGUF_TYPES[fmt_name]
    fmt = FORMATS[fmt_name]
    twins = [t for t in GGUF_TYPES.values() if t.twin is not None]
    for facts in (lambda f: f.name, lambda f: (f.packing, f.bits, f.symmetric), lambda f: (f.bits, f.symmetric)):
        for t in twins:
            if facts(FORMATS[t.twin]) == facts(fmt):
                return t
    raise UnsupportedError(f"format {fmt_name}: no GGUF type dsq writes is like it; choose one with --type")

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
    if qt.format in KSPEC:  # a GGUF-grid tensor (kformats.py): exact in its own type only
        return qt.format == t.name
    if t.twin is None:
        return False
    src, dst = qt.fmt, FORMATS[t.twin]
    if t.twin == qt.format:
        return True
    group = src.block_cols or qt.shape[1]
    return (type(src) is type(dst) and src.block_rows == 1 and group % dst.block_cols == 0
            and qt.shape[1] % dst.block_cols == 0)


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


KQUANT_ELEMENTS = 1 << 22


def _kquant_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, KQUANT_ELEMENTS // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


def pack_exact(qt: QuantizedTensor, t: GGUFType, pool: StreamPool | None = None) -> np.ndarray:
    """Re-pack dsq's codes and scales into GGUF blocks without re-rounding the codes. -> uint8 bytes.

    Works through cache-sized row chunks (on ``pool``'s workers when given), each written straight into
    its rows of the output: byte operations on the codes' uint8 view, no int16 or concatenated copies."""
    rows, cols = qt.shape
    nb = cols // BLOCK
    head_bytes = {GT.Q4_0: 2, GT.Q4_1: 4, GT.Q8_0: 2}[t.gtype]
    body_bytes = BLOCK if t.gtype == GT.Q8_0 else BLOCK // 2
    out = np.empty((rows, nb, head_bytes + body_bytes), dtype=np.uint8)  # filled in place: no concat copy

    def fill(chunk: tuple[int, int]) -> None:
        # One row per 32-weight block: its fp16 header as int16 columns, its body as bytes. The nibble pairs
        # are formed 8 bytes at a time: in an int64 word of 8 codes < 16, ``hi << 4`` moves every code into
        # its byte's high nibble without crossing bytes, so body word k = lo word k | hi word k << 4.
        r0, r1 = chunk
        m = (r1 - r0) * nb
        o = torch.from_numpy(out[r0:r1].reshape(m, head_bytes + body_bytes))
        heads = o.view(torch.int16)
        codes = qt.codes[r0:r1].reshape(m, BLOCK)
        if t.gtype == GT.Q8_0:
            heads[:, 0] = qt.scale[r0:r1].to(torch.float16).reshape(m).view(torch.int16)
            o[:, 2:] = codes.view(torch.uint8)  # int8 codes are Q8_0's bytes
            return
        if t.gtype == GT.Q4_0:
            heads[:, 0] = qt.scale[r0:r1].to(torch.float16).reshape(m).view(torch.int16)
            u = torch.from_numpy(codes.contiguous().numpy().view(np.uint8) + np.uint8(8))  # c + 8, wrapping
        else:  # Q4_1: dsq's asymmetric codes are the nibbles; header d then m
            part = QuantizedTensor(qt.format, (r1 - r0, cols), qt.codes[r0:r1], qt.scale[r0:r1], qt.zero[r0:r1])
            heads[:, 0] = part.scale.to(torch.float16).reshape(m).view(torch.int16)
            heads[:, 1] = q4_1_offset(part).reshape(m).view(torch.int16)
            u = codes.contiguous()
        words = u.view(torch.int64)  # [m, 4]: codes 0-7, 8-15 (low nibbles), 16-23, 24-31 (high nibbles)
        o[:, head_bytes:] = (words[:, :2] | (words[:, 2:] << 4)).view(torch.uint8)

    chunks = row_chunks(rows, cols)
    if pool is None or len(chunks) == 1:
        for c in chunks:
            fill(c)
    else:
        list(pool.workers.map(fill, chunks))
    return out.reshape(-1)


def encode(
    value: QuantizedTensor | torch.Tensor, t: GGUFType, name: str, pool: StreamPool | None = None,
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Bytes of one tensor (or one row-block of a stacked tensor) in GGUF type ``t``, plus, when values were
    re-rounded, (sum of squared change, sum of squared source values) for the report's relative error.

    A QuantizedTensor in ``t``'s twin format is packed exactly (None: nothing changed); anything else is
    dequantized and quantized with the twin format (ggml's reference rounding, byte-identical with gguf-py's
    quantizer, which tests check) or cast to a float type (None).
    The change is measured on dsq's dequantization of what was packed: equal to the GGUF's values for
    Q4_0/Q8_0, within ``q4_1_offset_bound`` for Q4_1 (tests check both), so no bytes are decoded.
    Row chunks go to ``pool``'s workers when given; each writes its own rows of the output, and the sums
    are added in row order, so neither the bytes nor the report depend on the thread count.
    ``importance`` [in_features] (llama.cpp imatrix entries of this tensor) makes every re-rounding take ggml's
    imatrix path, byte-equal to ``llama-quantize --imatrix`` (Q8_0 and float types ignore it, as ggml does).
    """
    if isinstance(value, QuantizedTensor) and is_exact(value, t):
        if value.format in KSPEC:  # its grid and codes are the block's numbers: packed as they are
            codes = value.codes.numpy().reshape(-1, KSPEC[value.format].block)
            return pack(value.format, value.grid(), codes).reshape(-1), None
        return pack_exact(split_blocks(value, t.twin), t, pool), None
    if not t.quantized:
        w = value.dequantize() if isinstance(value, QuantizedTensor) else value
        return w.to(t.torch_dtype).contiguous().view(torch.uint8).reshape(-1).numpy(), None
    shape = tuple(value.shape)
    if not t.fits(shape):
        raise UnsupportedError(
            f"{name}: rows of {shape[-1]} are not a multiple of {t.block}, which {t.name.upper()} needs"
        )
    n_rows, k = math.prod(shape[:-1]), shape[-1]
    row_bytes = nbytes(t, (k,))
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    if isinstance(value, QuantizedTensor):  # re-quantized a chunk at a time: no whole float32 copy
        if value.fmt.block_rows != 1:
            value = value.dequantize()
        rows = value
    else:
        rows = value.reshape(n_rows, k)

    def work(chunk: tuple[int, int]) -> tuple[float, float]:
        r0, r1 = chunk
        src = rows.rows(r0, r1).dequantize() if isinstance(rows, QuantizedTensor) else rows[r0:r1]
        if t.kquant is None and importance is None:  # dsq's twin format: bf16 read as is, sums without copies
            qt = FORMATS[t.twin].quantize(src, name)  # also where NaN/Inf and fp16 overflow get their error
            out[r0:r1] = pack_exact(qt, t).reshape(r1 - r0, row_bytes)
            change, norm, _ = quantized_error(src, qt)
            return change, norm
        x = src.to(torch.float32)
        if t.kquant is not None:
            check_finite(x, name, (1, t.block))
            data, held = t.kquant(x, importance)
        elif importance is not None and t.name == "q4_0":
            check_finite(x, name, (1, t.block))
            data, held = quantize_legacy(t.name, x, importance)
        else:
            qt = FORMATS[t.twin].quantize(x, name)  # also where NaN/Inf and fp16 overflow get their error
            data, held = pack_exact(qt, t), _block_values(qt)
        out[r0:r1] = data.reshape(r1 - r0, row_bytes)
        diff = (held - x).reshape(-1)
        xf = x.reshape(-1)
        return float(torch.dot(diff, diff)), float(torch.dot(xf, xf))

    # k-quants go to the chunk threads in chunks of KQUANT_ELEMENTS (4 Mi weights: ~0.1 s of compiled search
    # each, so the threads' hand-offs cost nothing); kq_types splits each further into L2-sized pieces
    chunks = row_chunks(n_rows, k) if t.kquant is None else _kquant_chunks(n_rows, k)
    results = map(work, chunks) if pool is None or len(chunks) == 1 else pool.workers.map(work, chunks)
    change = norm = 0.0
    for c, n in results:
        change += c
        norm += n
    return out.reshape(-1), (change, norm)


def nbytes(t: GGUFType, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[t.gtype]
    n = int(np.prod(shape))
    return n // block * size
