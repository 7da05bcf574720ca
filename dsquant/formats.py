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

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import BadWeightsError, UnsupportedError

FP16_MAX = 65504.0
FP8_E4M3_MAX = 448.0


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
    """A block quantization format. Subclasses set the class attributes and the two methods."""

    name: str
    bits: int
    block_rows: int = 1
    block_cols: int = 0  # 0: the whole row (per output channel)
    symmetric: bool = True
    scale_dtype: ClassVar[torch.dtype] = torch.float16
    # Edge blocks: a format that allows partial blocks (DeepSeek FP8) sets this to True; the others
    # need in_features to be a multiple of the block and raise UnsupportedError otherwise.
    partial_blocks: ClassVar[bool] = False

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
        """(codes - zero) * scale, per block, in float32: the same for every format."""
        codes = qt.codes.to(torch.float32)
        if qt.zero is not None:
            codes = codes - self._expand(qt.zero.to(torch.float32), qt.shape)
        return codes * self._expand(qt.scale.to(torch.float32), qt.shape)

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
    """Raise BadWeightsError naming the tensor, the first bad element and its block."""
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

    def __init__(self, group: int) -> None:
        self.block_cols = group
        self.name = f"int4_sym_g{group}"

    def quantize(self, w: torch.Tensor, name: str = "<tensor>") -> QuantizedTensor:
        w = self._prepare(w, name)
        b = self._blocks(w)
        imax = b.abs().argmax(dim=-1, keepdim=True)  # first max, as ggml's strict '>' scan
        d = torch.gather(b, -1, imax) / -8.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc(b * inv + 8.5).clamp(0, 15) - 8
        return QuantizedTensor(
            self.name, tuple(w.shape), q.to(torch.int8).reshape(w.shape), self._fp16_scale(d[..., 0], name)
        )


class Int4Asym(QuantFormat):
    bits = 4
    symmetric = False

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

    def __init__(self, group: int) -> None:
        self.block_cols = group
        self.name = f"int8_g{group}" if group else "int8_channel"

    def quantize(self, w: torch.Tensor, name: str = "<tensor>") -> QuantizedTensor:
        w = self._prepare(w, name)
        b = self._blocks(w)
        d = b.abs().amax(dim=-1, keepdim=True) / 127.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        x = b * inv
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # C roundf: half away from zero
        return QuantizedTensor(
            self.name, tuple(w.shape), q.to(torch.int8).reshape(w.shape), self._fp16_scale(d[..., 0], name)
        )


class Fp8Block(QuantFormat):
    bits = 8
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


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UnsupportedError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
