"""Block quantization formats: one small class each, registered with its block shape in ``FORMATS``.

Every format works on a 2-D weight ``[out_features, in_features]`` (the HF ``nn.Linear`` layout)
and returns integer (or fp8) codes plus scales (plus integer zero points when asymmetric).
Dequantization is ``codes * scale`` or ``(codes - zero) * scale`` broadcast over blocks, computed
in float32: that is the single definition every writer (compressed-tensors, GGUF, ONNX) re-packs.

Rounding rules are those of the reference implementations they must stay exact with:

* ``int4_sym_g*``  ggml's Q4_0 (``quantize_row_q4_0_ref``): d = signed-max / -8, q = trunc(x/d + 8.5),
  scale stored as fp16. With g=32 the codes and scales are bit-exact with ggml's Q4_0.
* ``int8_*``       ggml's Q8_0 (``quantize_row_q8_0_ref``): d = amax / 127, q = roundf(x/d) (half away
  from zero), scale stored as fp16. With g=32 bit-exact with ggml's Q8_0.
* ``int4_asym_g*`` min/max with an integer zero point (compressed-tensors, ONNX MatMulNBits):
  s = fp16((max - min) / 15) over a range that includes 0, z = round(-min / s), q = round(x/s) + z.
* ``fp8_b128``     DeepSeek-V3's block FP8: s = amax / 448 per 128x128 block (fp32, edge blocks may be
  partial, so the scale grid is ``ceil(out/128) x ceil(in/128)``), q = e4m3(x / s).
"""

from __future__ import annotations

import gc
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .errors import BadWeightsError, UnsupportedError

FP16_MAX = 65504.0
FP8_E4M3_MAX = 448.0
# The fast quantizers work through a weight this many elements at a time: a float32 chunk and its few
# temporaries then stay in a core's L2 cache (1 MiB here), where a whole-slice pass would stream every
# temporary through memory, and the ~30 ops per chunk still amortise torch's per-op overhead. Measured
# (2-core EPYC, load ~7): quantize + error + pack of int4_sym_g32, 5.9 ns/weight in chunks of 256 Ki
# elements, 8.1 at 4 Mi, 8.7 at 64 Ki.
CACHE_ELEMENTS = 1 << 18


def row_chunks(rows: int, cols: int, block_rows: int = 1) -> list[tuple[int, int]]:
    """[start, stop) row ranges of about ``CACHE_ELEMENTS`` elements, on ``block_rows`` boundaries."""
    step = max(block_rows, CACHE_ELEMENTS // max(cols, 1) // block_rows * block_rows)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


def stream_threads() -> int:
    """Worker threads for the streaming loops: ``DSQ_THREADS``, else the CPUs this process may use (max 8)."""
    env = os.environ.get("DSQ_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class _Inline:
    """The part of ``ThreadPoolExecutor`` the streaming loops use, run in the calling thread."""

    def map(self, fn, *iterables):
        return list(map(fn, *iterables))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class StreamPool:
    """Threads for quantizing/exporting a stream of tensors, as a context manager.

    ``workers`` run cache-sized chunks in parallel (torch and numpy release the GIL inside their kernels);
    ``reader`` reads the next slice while the current one is worked on. While the pool is open torch's own
    intra-op threads are set to 1 (restored on exit): its OpenMP threads split every small op and then
    spin-wait between ops, which on a loaded 2-core machine cost ~5x the CPU seconds of the work itself
    (measured: ``dsq quantize`` of 0.7 G weights, 69 s CPU with torch's 2 threads vs 12.7 s with 1).
    Callers keep results in submission order (``workers.map``), so outputs never depend on timing."""

    def __init__(self, workers: int | None = None):
        self.n_workers = workers or stream_threads()

    def __enter__(self) -> StreamPool:
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # the objects alive now (modules, configs, the plan) are moved out of the collector's generations:
        # every chunk allocates a few arrays, and each full collection walked all of them (3-4% of CPU)
        gc.freeze()
        # one worker: run chunks inline (measured ~5% fewer CPU seconds than handing them to a thread)
        self.workers = ThreadPoolExecutor(self.n_workers, thread_name_prefix="dsq-work") if self.n_workers > 1 \
            else _Inline()
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="dsq-read")
        return self

    def __exit__(self, *exc) -> None:
        self.workers.shutdown(wait=True, cancel_futures=True)
        self.reader.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._torch_threads)
        gc.unfreeze()


@dataclass(frozen=True)
class QuantizedTensor:
    """The single source of truth for one quantized weight: codes + scales (+ zero points).

    ``codes`` are unpacked: int8 in [-8, 7] (int4 symmetric), uint8 in [0, 15] (int4 asymmetric),
    int8 in [-127, 127] (int8), float8_e4m3fn (fp8). ``scale`` has one value per block, shape
    ``[ceil(out / block_rows), ceil(in / block_cols)]``; ``zero`` is uint8 with the same shape.
    """

    format: str
    shape: tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def fmt(self) -> QuantFormat:
        return FORMATS[self.format]

    def dequantize(self) -> torch.Tensor:
        return self.fmt.dequantize(self)

    @property
    def nbytes(self) -> int:
        return self.fmt.nbytes(self.shape)

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Rows [start, stop) with their scales; start must be on a block-row boundary."""
        br = self.fmt.block_rows
        if start % br:
            raise ValueError(f"row slice must start on a multiple of {br}")
        s0, s1 = start // br, math.ceil(stop / br)
        zero = None if self.zero is None else self.zero[s0:s1]
        return QuantizedTensor(self.format, (stop - start, self.shape[1]), self.codes[start:stop], self.scale[s0:s1], zero)


class QuantFormat:
    """A block quantization format. Subclasses set the class attributes and the two methods.

    The attributes are every fact other code needs about a format; writers and calibration derive their
    choices from them (``find_format``), never from the format's name:

    * ``bits``, ``symmetric`` (no zero point), ``block_rows`` x ``block_cols`` (0: the whole row);
    * ``qmin``/``qmax``/``code_dtype``: the range and dtype of the unpacked codes (float8 codes: the range
      bounds the value); ``scale_dtype`` of the per-block scales;
    * ``packing``: how codes reach a runtime. ``"int"``: integer codes with one scale (and zero point) per
      block of one row, the layout of GGUF Q4_0/Q4_1/Q8_0, ONNX MatMulNBits and MLX's affine mode;
      ``"fp8"``: e4m3 codes with float32 block scales (DeepSeek-V3), which those runtimes do not compute with;
      ``""`` (the default): a format with a layout of its own, which no writer packs by these facts (a
      writer that knows it does so by its name, e.g. a GGUF type's own grid), so it is never matched by
      ``find_format`` or taken for an int/fp8 format.
    """

    name: str
    bits: int
    block_rows: int = 1
    block_cols: int = 0  # 0: the whole row (per output channel)
    symmetric: bool = True
    qmin: ClassVar[float]
    qmax: ClassVar[float]
    code_dtype: ClassVar[torch.dtype]
    packing: ClassVar[str] = ""
    scale_dtype: ClassVar[torch.dtype] = torch.float16
    # Edge blocks: a format that allows partial blocks (DeepSeek FP8) sets this to True; the others
    # need in_features to be a multiple of the block and raise UnsupportedError otherwise.
    partial_blocks: ClassVar[bool] = False

    @property
    def float_codes(self) -> bool:
        """Whether the codes are floating point (FP8) rather than integers."""
        return self.code_dtype.is_floating_point

    def regrouped(self, block_cols: int) -> QuantFormat:
        """The registered format with these facts but blocks of ``block_cols`` columns.

        Raises UnsupportedError naming both when dsq has no such format."""
        fmt = find_format(packing=self.packing, bits=self.bits, symmetric=self.symmetric,
                          block_rows=self.block_rows, block_cols=block_cols)
        if fmt is None:
            raise UnsupportedError(f"{self.name}: no format like it with blocks of {block_cols} columns; "
                                   f"known formats: {', '.join(FORMATS)}")
        return fmt

    def block(self, shape: tuple[int, int]) -> tuple[int, int]:
        rows, cols = shape
        return self.block_rows, (self.block_cols or cols)

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        br, bc = self.block(shape)
        return math.ceil(shape[0] / br), math.ceil(shape[1] / bc)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """Why this format cannot hold a tensor of ``shape``, or None when it can."""
        if len(shape) != 2:
            return f"{self.name} needs a 2-D weight, got shape {list(shape)}"
        if not self.partial_blocks:
            _, bc = self.block(shape)
            if shape[1] % bc:
                return f"{self.name} needs in_features ({shape[1]}) to be a multiple of {bc}"
        return None

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Stored size: packed codes + scales (+ packed zero points)."""
        n_scales = math.prod(self.scale_shape(shape))
        size = math.ceil(shape[0] * shape[1] * self.bits / 8) + n_scales * self.scale_dtype.itemsize
        if not self.symmetric:
            size += math.ceil(n_scales * self.bits / 8)
        return size

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return 8 * self.nbytes(shape) / (shape[0] * shape[1])

    # -- what a format implements ----------------------------------------------------------------
    def quantize(self, w: torch.Tensor, name: str = "<tensor>") -> QuantizedTensor:
        raise NotImplementedError

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """(codes - zero) * scale, per block, in float32: the same for every format.

        Blocks of one row whose width divides the row (every int format) broadcast their scale over a
        [rows, blocks, width] view, the same products without ``repeat_interleave``'s full-size copies."""
        rows, cols = qt.shape
        br, bc = self.block(qt.shape)
        if br != 1 or cols % bc or qt.codes.numel() == 0:
            codes = qt.codes.to(torch.float32)
            if qt.zero is not None:
                codes = codes - self._expand(qt.zero.to(torch.float32), qt.shape)
            return codes * self._expand(qt.scale.to(torch.float32), qt.shape)
        codes = qt.codes.to(torch.float32, copy=True).reshape(rows, cols // bc, bc)  # updated in place below
        if qt.zero is not None:
            codes -= qt.zero.to(torch.float32)[..., None]
        codes *= qt.scale.to(torch.float32)[..., None]
        return codes.reshape(rows, cols)

    # -- shared helpers ---------------------------------------------------------------------------
    def _prepare(self, w: torch.Tensor, name: str) -> torch.Tensor:
        why = self.check_shape(tuple(w.shape))
        if why:
            raise UnsupportedError(f"{name}: {why}; pick another format or block size in the recipe")
        w = w.to(torch.float32)
        check_finite(w, name, self.block(tuple(w.shape)))
        return w

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [out, in / g, g] (group formats, block_rows == 1)."""
        _, bc = self.block(tuple(w.shape))
        return w.reshape(w.shape[0], w.shape[1] // bc, bc)

    def _expand(self, t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Broadcast a per-block tensor [R, C] back to the weight shape (cropping partial edges)."""
        br, bc = self.block(shape)
        return t.repeat_interleave(br, 0)[: shape[0]].repeat_interleave(bc, 1)[:, : shape[1]]

    def _fp16_scale(self, d: torch.Tensor, name: str) -> torch.Tensor:
        if bool((d.abs() > FP16_MAX).any()):
            raise BadWeightsError(
                f"{name}: values up to {d.abs().max().item():.3g} x the code range overflow the fp16 scale of "
                f"{self.name}; keep this tensor unquantized in the recipe (e.g. `skip = [\"{name}\"]`)"
            )
        return d.to(torch.float16)


def check_finite(w: torch.Tensor, name: str, block: tuple[int, int]) -> None:
    """Raise BadWeightsError naming the tensor, the first bad element and its block.

    Screened first with one min/max reduction (NaN propagates through it and Inf is an extreme, so
    both extremes are finite exactly when every element is): ~10x cheaper than ``isfinite`` + ``any``,
    which runs only to locate a bad element."""
    if w.numel() and w.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        lo, hi = torch.aminmax(w)
        if math.isfinite(float(lo)) and math.isfinite(float(hi)):
            return
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        n = int(bad.sum())
        blk = ""
        if len(idx) == 2:
            blk = f", block ({idx[0] // block[0]}, {idx[1] // block[1]}) of {block[0]}x{block[1]}"
        raise BadWeightsError(
            f"{name}: {n} non-finite value(s) (NaN/Inf), first at index {list(idx)}{blk}; "
            "the checkpoint is damaged: re-download it or exclude the tensor"
        )


class Int4Sym(QuantFormat):
    bits = 4
    qmin, qmax, code_dtype = -8, 7, torch.int8
    packing = "int"

    def __init__(self, group: int) -> None:
        self.block_cols = group
        self.name = f"int4_sym_g{group}"

    def quantize(self, w: torch.Tensor, name: str = "<tensor>") -> QuantizedTensor:
        """ggml's ``quantize_row_q4_0_ref`` on blocks of ``group`` (rtn_kernels.q4_sym_rows, compiled: C's float32
        operations in C's order), over cache-sized row chunks converted to float32 one at a time.

        Per block: the element of largest magnitude, sign kept (the first one on ties), d = it / -8,
        code = min(15, trunc(x * (1/d) + 8.5)) - 8. Raises BadWeightsError naming the tensor and block for
        NaN/Inf, and when a scale overflows fp16."""
        from .rtn_kernels import q4_sym_rows

        why = self.check_shape(tuple(w.shape))
        if why:
            raise UnsupportedError(f"{name}: {why}; pick another format or block size in the recipe")
        rows, cols = w.shape
        g = self.block_cols
        codes = torch.empty(rows, cols, dtype=torch.int8)
        d_all = np.empty((rows, cols // g), dtype=np.float32)
        out = codes.numpy()
        for r0, r1 in row_chunks(rows, cols):
            c, d, bad = q4_sym_rows(w[r0:r1], g)  # bf16 read as its bits: no float32 copy
            if bad:
                check_finite(w.to(torch.float32), name, (1, g))
            out[r0:r1] = c
            d_all[r0:r1] = d
        return QuantizedTensor(self.name, (rows, cols), codes, self._fp16_scale(torch.from_numpy(d_all), name))


class Int4Asym(QuantFormat):
    bits = 4
    symmetric = False
    qmin, qmax, code_dtype = 0, 15, torch.uint8
    packing = "int"

    def __init__(self, group: int) -> None:
        self.block_cols = group
        self.name = f"int4_asym_g{group}"

    def quantize(self, w: torch.Tensor, name: str = "<tensor>") -> QuantizedTensor:
        w = self._prepare(w, name)
        b = self._blocks(w)
        lo = b.amin(dim=-1, keepdim=True).clamp(max=0.0)
        hi = b.amax(dim=-1, keepdim=True).clamp(min=0.0)
        s = self._fp16_scale((hi - lo) / 15.0, name).to(torch.float32)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.round(-lo / safe).clamp(0, 15)
        q = (torch.round(b / safe) + z).clamp(0, 15)
        return QuantizedTensor(
            self.name,
            tuple(w.shape),
            q.to(torch.uint8).reshape(w.shape),
            s[..., 0].to(torch.float16),
            z[..., 0].to(torch.uint8),
        )


class Int8Sym(QuantFormat):
    bits = 8
    qmin, qmax, code_dtype = -127, 127, torch.int8
    packing = "int"

    def __init__(self, group: int) -> None:
        self.block_cols = group
        self.name = f"int8_g{group}" if group else "int8_channel"

    def quantize(self, w: torch.Tensor, name: str = "<tensor>") -> QuantizedTensor:
        """ggml's ``quantize_row_q8_0_ref`` over row chunks: d = amax / 127, q = roundf(x * (1/d)).

        roundf (half away from zero) is trunc(x + copysign(0.5, x)): the same float32 sum as
        sign(x) * floor(|x| + 0.5), and the int8 cast truncates."""
        why = self.check_shape(tuple(w.shape))
        if why:
            raise UnsupportedError(f"{name}: {why}; pick another format or block size in the recipe")
        rows, cols = w.shape
        _, g = self.block((rows, cols))
        nb = cols // g if g else 0
        codes = torch.empty(rows, cols, dtype=torch.int8)
        d_all = torch.empty(rows, nb, dtype=torch.float32)
        out = codes.numpy()
        for r0, r1 in row_chunks(rows, cols):
            n = r1 - r0
            b = w[r0:r1].to(torch.float32).reshape(n, nb, g)
            d = b.abs().amax(dim=-1) / 127.0
            if not bool(torch.isfinite(d).all()):
                check_finite(w.to(torch.float32), name, (1, g))
            inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
            d_all[r0:r1] = d
            if not bool(torch.isfinite(inv).all()):  # d subnormal: 1/d overflows; keep the literal formula
                x = b * inv[..., None]
                q = torch.sign(x) * torch.floor(x.abs() + 0.5)
                out[r0:r1] = q.to(torch.int8).reshape(n, cols).numpy()
                continue
            x = (b * inv[..., None]).numpy()
            x += np.copysign(np.float32(0.5), x)
            out[r0:r1] = x.astype(np.int8).reshape(n, cols)
        return QuantizedTensor(self.name, (rows, cols), codes, self._fp16_scale(d_all, name))


class Fp8Block(QuantFormat):
    bits = 8
    qmin, qmax, code_dtype = -FP8_E4M3_MAX, FP8_E4M3_MAX, torch.float8_e4m3fn
    packing = "fp8"
    scale_dtype = torch.float32
    partial_blocks = True

    def __init__(self, block: int) -> None:
        self.block_rows = self.block_cols = block
        self.name = f"fp8_b{block}"

    def quantize(self, w: torch.Tensor, name: str = "<tensor>") -> QuantizedTensor:
        w = self._prepare(w, name)
        rows, cols = w.shape
        n = self.block_rows
        gr, gc = self.scale_shape((rows, cols))
        padded = torch.zeros(gr * n, gc * n, dtype=torch.float32)
        padded[:rows, :cols] = w
        blocks = padded.reshape(gr, n, gc, n)
        s = blocks.abs().amax(dim=(1, 3)) / FP8_E4M3_MAX
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = (w / self._expand(s, (rows, cols))).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        return QuantizedTensor(self.name, (rows, cols), q.to(torch.float8_e4m3fn), s)


def split_blocks(qt: QuantizedTensor, target: str) -> QuantizedTensor | None:
    """``qt`` re-expressed in format ``target`` with bit-identical values, or None when that is impossible.

    A block of g columns with one scale (and zero) is also g/g' blocks of g' columns with that same scale:
    when ``target`` is the same kind of format (int4 sym, int4 asym or int8) with a group g' that divides
    ``qt``'s group (or ``qt`` is per-channel and g' divides the row), the codes are unchanged and every
    scale/zero is repeated g/g' times. This is how an int4_sym_g128 weight (GPTQ's usual group) becomes
    GGUF Q4_0 blocks exactly: four Q4_0 blocks that share one fp16 d.
    """
    src, dst = qt.fmt, FORMATS[target]
    if src.name == dst.name:
        return qt
    if type(src) is not type(dst) or src.block_rows != 1 or dst.block_rows != 1 or not dst.block_cols:
        return None
    cols = qt.shape[1]
    group = src.block_cols or cols
    if group % dst.block_cols or cols % dst.block_cols:
        return None
    k, n = group // dst.block_cols, cols // dst.block_cols
    zero = None if qt.zero is None else qt.zero.repeat_interleave(k, 1)[:, :n]
    return QuantizedTensor(dst.name, qt.shape, qt.codes, qt.scale.repeat_interleave(k, 1)[:, :n], zero)


def _registry(*formats: QuantFormat) -> dict[str, QuantFormat]:
    return {f.name: f for f in formats}


#: Every format dsq knows, by name. The one table recipes, writers and tests loop over.
FORMATS: dict[str, QuantFormat] = _registry(
    Fp8Block(128),
    Int8Sym(0),
    Int8Sym(32),
    Int8Sym(128),
    *(Int4Sym(g) for g in (32, 64, 128)),
    *(Int4Asym(g) for g in (32, 64, 128)),
)


def find_format(*, bits: int, block_cols: int, symmetric: bool = True, block_rows: int = 1,
                packing: str = "int") -> QuantFormat | None:
    """The registered format with these facts (see ``QuantFormat``), or None when dsq has none."""
    for f in FORMATS.values():
        if (f.packing, f.bits, f.symmetric, f.block_rows, f.block_cols) == (packing, bits, symmetric, block_rows,
                                                                             block_cols):
            return f
    return None


from .kformats import K_FORMATS  # noqa: E402 - GGUF K-quant grids (kformats.py builds on the classes above)

FORMATS.update(K_FORMATS)


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UnsupportedError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
