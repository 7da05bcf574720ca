"""Importance-weighted round-to-nearest (llama.cpp's imatrix idea) and per-block scale search.

llama.cpp's ``--imatrix`` collects, per linear, the mean squared activation of every input column,
and its quantizers pick each block's scale to minimise the rounding error weighted by those values
(``make_qx_quants`` with ``quant_weights``). Here: per block, try the format's RTN scale times each
factor in a grid and keep the best under ``sum_j imp_j (w_j - deq_j)^2``. With no importance it is
an MSE scale search (used for FP8 blocks too). Codes and scales stay in the format's layout.
"""

from __future__ import annotations

import torch

from ..formats import QuantFormat, QuantizedTensor
from .grid import block_sum, codec, quantize_with, scaled_params

DEFAULT_FACTORS = tuple(round(0.70 + 0.025 * i, 4) for i in range(21))  # 0.70 .. 1.20, includes 1.0


def search_scales(
    fmt: QuantFormat,
    w: torch.Tensor,
    importance: torch.Tensor | None = None,
    factors: tuple[float, ...] = DEFAULT_FACTORS,
) -> QuantizedTensor:
    """Per block, the scale ``s0 * f`` (s0: the format's RTN scale, f in ``factors``) minimising
    ``sum_j imp_j (w_j - deq_j)^2``; ``importance`` is per input column (llama.cpp's imatrix: mean
    squared activation), or None for plain MSE. f = 1 is always a candidate, so the result is never
    worse than RTN on that objective."""
    if hasattr(fmt, "stored"):  # a GGUF-grid format (kformats.py): ggml's own importance-weighted search
        return fmt.quantize(w, importance=None if importance is None else importance.to(torch.float32).clamp(min=0))
    w = w.to(torch.float32)
    base = fmt.quantize(w)
    imp = torch.ones(w.shape[1]) if importance is None else importance.to(torch.float32).clamp(min=0)
    imp = imp + 1e-12 * (imp.max() if imp.numel() else 1.0)  # columns never seen keep a little weight
    best_err: torch.Tensor | None = None
    best_scale, best_zero = base.scale.clone(), None if base.zero is None else base.zero.clone()
    grouped = fmt.block_rows == 1 and not codec(fmt).fp8
    for f in (1.0, *[x for x in factors if x != 1.0]):
        scale, zero = scaled_params(fmt, w, base, f)
        err = _group_err(fmt, w, scale, zero, imp) if grouped else _generic_err(fmt, w, scale, zero, imp)
        if best_err is None:
            best_err = err
            best_scale, best_zero = scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None and best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return quantize_with(fmt, w, best_scale, best_zero)


def _generic_err(fmt: QuantFormat, w, scale, zero, imp) -> torch.Tensor:
    qt = quantize_with(fmt, w, scale, zero)
    return block_sum(fmt, (w - qt.dequantize()).square() * imp)


def _group_err(fmt: QuantFormat, w, scale, zero, imp) -> torch.Tensor:
    """Same as _generic_err for one-row blocks, on a [rows, groups, g] view (no expanded copies)."""
    rows, cols = w.shape
    _, g = fmt.block((rows, cols))
    b = w.reshape(rows, cols // g, g)
    s = scale.to(torch.float32).unsqueeze(-1)
    c = codec(fmt)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.floor(b / safe + 0.5)
    if zero is not None:
        z = zero.to(torch.float32).unsqueeze(-1)
        q = (q + z).clamp(c.qmin, c.qmax) - z
    else:
        q = q.clamp(c.qmin, c.qmax)
    deq = torch.where(s == 0, torch.zeros_like(b), q * s)
    return ((b - deq).square() * imp.reshape(cols // g, g)).sum(-1)
