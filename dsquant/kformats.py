"""dsq formats whose values are GGUF's K-quant grids (``q2_k`` .. ``q6_k``) and 5-bit 32-blocks (``q5_0``, ``q5_1``).

A :class:`KQuantTensor` holds what the GGUF block holds, unpacked: the codes, and per block its fp16 ``d`` and
``dmin`` and its sub-blocks' integer scales and mins (kq_types.py). ``dequantize()`` is gguf-py's (and ggml's)
dequantization bit for bit, and the GGUF writer packs the same numbers into the same bytes
(export/gguf_quants.py), so a calibrated tensor in one of these formats reaches llama.cpp without re-rounding.

Round to nearest (``quantize``) is ggml's reference quantizer, byte for byte; with a per-column ``importance``
(llama.cpp imatrix entries) it is ggml's imatrix path. GPTQ (calib/gptq.py) fits each block's grid with the same
code on the error-compensated weights, then rounds columns on it.

Stored in a quantized checkpoint (layouts.py, compressed-tensors groups with ``type = "gguf"``): codes packed as
``weight_packed`` (``bits`` per code), ``weight_scale`` (d) and ``weight_dmin`` fp16 [out, blocks],
``weight_sub_scale`` int8 and ``weight_sub_min`` uint8 [out, blocks * sub-blocks], ``weight_shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CorruptFileError, UnsupportedError
from .formats import QuantFormat, QuantizedTensor
from .kq_types import KSPEC, KGrid, fit, requant, rowsum, values


@dataclass(frozen=True)
class KQuantTensor(QuantizedTensor):
    """codes uint8 [out, in]; ``scale`` = d float16 [out, blocks]; ``dmin`` float16 [out, blocks];
    ``sub_scale`` int16 [out, blocks, nsub] (signed multiplier); ``sub_min`` uint8 [out, blocks, nsub]."""

    dmin: torch.Tensor | None = None
    sub_scale: torch.Tensor | None = None
    sub_min: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> KQuantTensor:
        return KQuantTensor(self.format, (stop - start, self.shape[1]), self.codes[start:stop], self.scale[start:stop],
                            None, self.dmin[start:stop], self.sub_scale[start:stop], self.sub_min[start:stop])

    def select_rows(self, idx: torch.Tensor) -> KQuantTensor:
        """Rows ``idx`` (a permutation or selection), every per-row part with them."""
        return KQuantTensor(self.format, (len(idx), self.shape[1]), self.codes[idx], self.scale[idx], None,
                            self.dmin[idx], self.sub_scale[idx], self.sub_min[idx])

    def grid(self) -> KGrid:
        """The blocks as kq_types' [nb] / [nb, nsub] arrays (row-major over [out, blocks])."""
        sp = KSPEC[self.format]
        nb = self.scale.numel()
        codes = self.codes.numpy().reshape(nb, sp.nsub, sp.sub)
        return KGrid(self.scale.numpy().reshape(nb), self.dmin.numpy().reshape(nb),
                     self.sub_scale.numpy().reshape(nb, sp.nsub), self.sub_min.numpy().reshape(nb, sp.nsub), codes)


def from_grid(kind: str, shape: tuple[int, int], grid: KGrid, codes: np.ndarray) -> KQuantTensor:
    """A KQuantTensor of ``shape`` from kq_types' per-block arrays (blocks row-major)."""
    sp = KSPEC[kind]
    rows, cols = shape
    nbr = cols // sp.block
    return KQuantTensor(
        kind, shape, torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols).astype(np.uint8))),
        torch.from_numpy(np.ascontiguousarray(grid.d.astype(np.float16).reshape(rows, nbr))), None,
        torch.from_numpy(np.ascontiguousarray(grid.dmin.astype(np.float16).reshape(rows, nbr))),
        torch.from_numpy(np.ascontiguousarray(grid.scale.astype(np.int16).reshape(rows, nbr, sp.nsub))),
        torch.from_numpy(np.ascontiguousarray(grid.mins.astype(np.uint8).reshape(rows, nbr, sp.nsub))),
    )


def fit_blocks(kind: str, x: np.ndarray, importance: np.ndarray | None, row_sigma2: np.ndarray | None = None
               ) -> KGrid:
    """ggml's grid for ``x`` [rows, block] (one block per row, e.g. one 256-column slice of a weight), with
    ``importance`` [block] (broadcast over rows) or None. ``row_sigma2`` [rows]: Q5_0/Q5_1's mean x^2 of each
    whole row (ggml's imatrix path needs it); computed from ``x`` when None."""
    sp = KSPEC[kind]
    qw = None if importance is None else np.ascontiguousarray(
        np.broadcast_to(np.asarray(importance, np.float32).reshape(1, sp.block), x.shape))
    if sp.block == 32 and qw is not None and row_sigma2 is None:
        row_sigma2 = rowsum(x * x) / np.float32(x.shape[1])
    return fit(kind, np.ascontiguousarray(x, dtype=np.float32), qw, row_sigma2)


class KQuantFormat(QuantFormat):
    """One GGUF grid kind as a dsq format (block = the GGUF block: 256, or 32 for q5_0/q5_1)."""

    scale_dtype = torch.float16

    def __init__(self, kind: str) -> None:
        self.kind = self.name = kind
        self.spec = KSPEC[kind]
        self.bits = self.spec.bits
        self.block_cols = self.spec.block
        self.symmetric = not self.spec.asym

    def nbytes(self, shape: tuple[int, int]) -> int:
        """The GGUF block bytes."""
        return math.prod(shape) // self.spec.block * self.spec.nbytes

    def quantize(self, w: torch.Tensor, name: str = "<tensor>", importance: torch.Tensor | None = None
                 ) -> KQuantTensor:
        """ggml's quantizer for this type (``importance`` [in]: its imatrix path), as a KQuantTensor."""
        w = self._prepare(w, name)
        rows, cols = w.shape
        sp = self.spec
        x = w.numpy().reshape(-1, sp.block)
        imp = None
        if importance is not None:
            imp = np.asarray(importance, np.float32).reshape(-1)
            if imp.shape != (cols,):
                raise UnsupportedError(f"{name}: importance has {imp.size} values; expected {cols}, one per column")
            imp = np.ascontiguousarray(np.broadcast_to(imp.reshape(1, cols), (rows, cols))).reshape(-1, sp.block)
        sig = None
        if sp.block == 32 and imp is not None:
            sig = np.repeat(rowsum(w.numpy() * w.numpy()) / np.float32(cols), cols // 32)
        grid = fit(self.kind, x, imp, sig)
        codes = grid.codes.reshape(-1, sp.block) if sp.block == 32 else requant(self.kind, x, grid)
        return from_grid(self.kind, (rows, cols), grid, codes)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        assert isinstance(qt, KQuantTensor)
        g = qt.grid()
        return torch.from_numpy(values(self.kind, g, g.codes)).reshape(qt.shape)

    # -- storage in a quantized checkpoint (layouts.py) -------------------------------------------------
    def stored(self, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        rows, cols = shape
        nbr = cols // self.spec.block
        per = 32 // self.bits
        return {
            "weight_packed": (torch.int32, (rows, math.ceil(cols / per))),
            "weight_scale": (torch.float16, (rows, nbr)),
            "weight_dmin": (torch.float16, (rows, nbr)),
            "weight_sub_scale": (torch.int8, (rows, nbr * self.spec.nsub)),
            "weight_sub_min": (torch.uint8, (rows, nbr * self.spec.nsub)),
            "weight_shape": (torch.int64, (2,)),
        }

    def encode(self, qt: KQuantTensor, full_shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        from .layouts import pack_int32

        rows = qt.shape[0]
        return {
            "weight_packed": pack_int32(qt.codes, self.bits),
            "weight_scale": qt.scale,
            "weight_dmin": qt.dmin,
            "weight_sub_scale": qt.sub_scale.to(torch.int8).reshape(rows, -1),
            "weight_sub_min": qt.sub_min.reshape(rows, -1),
            "weight_shape": torch.tensor(full_shape or qt.shape, dtype=torch.int64),
        }

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, int], mod: str) -> KQuantTensor:
        from .layouts import unpack_int32

        rows, cols = shape
        for key, (_, want) in self.stored(shape).items():
            if key != "weight_shape" and tuple(parts[key].shape) != want:
                raise CorruptFileError(f"{mod}.{key}: shape {list(parts[key].shape)}, expected {list(want)}; damaged checkpoint")
        for key in ("weight_scale", "weight_dmin"):
            if not bool(torch.isfinite(parts[key]).all()):
                raise CorruptFileError(f"{mod}.{key}: NaN/Inf scale; the quantized checkpoint is damaged")
        codes = unpack_int32(parts["weight_packed"], self.bits, cols).to(torch.uint8)
        if int(codes.max()) > self.spec.qmax if codes.numel() else False:
            raise CorruptFileError(f"{mod}.weight_packed: codes above {self.spec.qmax}; damaged checkpoint")
        nbr = cols // self.spec.block
        return KQuantTensor(self.kind, shape, codes.contiguous(), parts["weight_scale"], None, parts["weight_dmin"],
                            parts["weight_sub_scale"].to(torch.int16).reshape(rows, nbr, self.spec.nsub),
                            parts["weight_sub_min"].reshape(rows, nbr, self.spec.nsub))

    def scheme(self) -> dict:
        return {"num_bits": self.bits, "type": "gguf", "gguf_type": self.kind, "group_size": self.spec.block,
                "symmetric": self.symmetric, "strategy": "group"}


#: The GGUF-grid formats by name (registered in formats.FORMATS).
K_FORMATS: dict[str, KQuantFormat] = {k: KQuantFormat(k) for k in KSPEC}
