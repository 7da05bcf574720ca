"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) on dsq's block formats.

Columns are quantized one at a time; each column's rounding error is spread over the columns not
yet quantized through the inverse Hessian ``H = X^T X`` of the layer's calibration inputs (Cholesky
form, lazy batch updates of ``block_size`` columns, as Algorithm 1 of the paper). Groups are the
format's blocks along the input dim, so the result is a plain :class:`QuantizedTensor` of that format
(Q4_0/Q8_0/MatMulNBits-exact). A group's scale is taken when its first column is reached, from the
error-updated weights, by the format's own rule; with ``act_order`` (columns in order of decreasing
``diag(H)``) the scales are fixed from the original weights first ("static groups"), because
permuted columns would otherwise visit a group several times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..formats import QuantFormat, QuantizedTensor
from ..kformats import KQuantFormat, KQuantTensor, fit_blocks, from_grid
from ..kq_types import KGrid
from .grid import Codec, codec, expand


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    act_order: bool = False
    block_size: int = 128  # columns per lazy-update batch (speed only, not the format's block)


def _group_params(fmt: QuantFormat, w_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block scale/zero (format dtypes) for one group of columns, by the format's own rule."""
    qt = fmt.quantize(w_cols)
    return qt.scale[:, 0], None if qt.zero is None else qt.zero[:, 0]


def gptq_quantize(
    fmt: QuantFormat, weight: torch.Tensor, hessian: torch.Tensor, options: GPTQOptions = GPTQOptions(),
    overwrite: bool = False,
) -> QuantizedTensor:
    """GPTQ-quantize ``weight`` [out, in] against ``hessian`` [in, in] (float32: 2 X^T X / n) into ``fmt``.
    ``overwrite``: ``hessian`` may be used as working memory (a 18944-wide Hessian is 1.4 GB; the
    inverse factor is then computed in it, no copy)."""
    if isinstance(fmt, KQuantFormat):
        return gptq_kquant(fmt, weight, hessian, options, overwrite)
    w = weight.to(torch.float32, copy=True)
    rows, cols = w.shape
    _, group = fmt.block((rows, cols))
    n_groups = -(-cols // group)
    h = _working_hessian(hessian, w, overwrite)

    perm = torch.argsort(torch.diagonal(h), descending=True) if options.act_order else torch.arange(cols)
    scale_grid: list[torch.Tensor | None] = [None] * n_groups
    zero_grid: list[torch.Tensor | None] = [None] * n_groups
    if options.act_order:  # static groups from the original weights
        for g in range(n_groups):
            scale_grid[g], zero_grid[g] = _group_params(fmt, w[:, g * group : (g + 1) * group])
    if options.act_order:
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _upper_inverse_cholesky(_damped(h, options.damp))
    del h

    codes = torch.empty(rows, cols, dtype=_codes_dtype(fmt))
    row_params: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    c = codec(fmt)

    def ensure_grid(g: int, x: torch.Tensor) -> None:
        if scale_grid[g] is None:  # first column of the group (no act_order): take its params now
            scale_grid[g], zero_grid[g] = _group_params(fmt, x)

    def round_column(i: int, col: int, x: torch.Tensor) -> torch.Tensor:
        g = col // group
        if g not in row_params:  # per-row float32 grid of this group, expanded once
            zg = zero_grid[g]
            sg = _rows(fmt, scale_grid[g], rows)
            row_params[g] = (sg, torch.where(sg == 0, torch.ones_like(sg), sg), None if zg is None else _rows(fmt, zg, rows))
        s, s_safe, z = row_params[g]
        q, dq = _round_column(c, x, s, s_safe, z)
        codes[:, i] = q
        return dq

    _sweep(w, hinv, perm, group, options.block_size, ensure_grid, round_column)

    inv = torch.argsort(perm)
    codes = codes[:, inv].contiguous()
    scale = torch.stack([t for t in scale_grid if t is not None], dim=1)  # type: ignore[misc]
    zero = torch.stack([t for t in zero_grid if t is not None], dim=1) if zero_grid[0] is not None else None  # type: ignore[misc]
    return QuantizedTensor(fmt.name, (rows, cols), codes, scale, zero)


def _rows(fmt: QuantFormat, per_block: torch.Tensor, rows: int) -> torch.Tensor:
    """One group's per-row-block values -> one float32 value per row."""
    return expand(fmt, per_block.unsqueeze(1), (rows, 1))[:, 0]


def _codes_dtype(fmt: QuantFormat) -> torch.dtype:
    return codec(fmt).dtype


def _round_column(
    c: Codec, x: torch.Tensor, s: torch.Tensor, s_safe: torch.Tensor, z: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) of one column; the same rounding as grid.encode, fewer ops (hot loop).
    Where a block's scale is 0 the code is irrelevant: it dequantizes to 0 either way."""
    if c.fp8:
        q = (x / s_safe).clamp_(c.qmin, c.qmax).to(c.dtype)
        return q, q.to(torch.float32) * s
    q = torch.floor(x / s_safe + 0.5)
    if z is not None:
        q = q.add_(z).clamp_(c.qmin, c.qmax)
        return q, (q - z) * s
    q = q.clamp_(c.qmin, c.qmax)
    return q, q * s


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads capped at ``n`` inside the block. The column loop is thousands of small ops:
    with two OpenMP threads each op is split and the threads spin-wait between ops, which on a loaded
    2-core machine cost 40-50x the CPU seconds of one thread (measured: GPTQ of a 576x1536 weight, 4.5 s vs
    0.09 s). The big matmuls around it (the lazy block update, the Hessian, the forwards) keep all threads."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


SMALL = 2048  # matrices up to this size are factorised/inverted with one thread (see _threads)


def _sweep(w: torch.Tensor, hinv: torch.Tensor, perm: torch.Tensor, group: int, block_size: int,
           ensure_grid: Callable[[int, torch.Tensor], None],
           round_column: Callable[[int, int, torch.Tensor], torch.Tensor]) -> None:
    """GPTQ's column loop with lazy batch updates (Frantar et al. 2023, Algorithm 1), shared by every grid.

    ``w`` [out, in] float32, columns already in ``perm`` order, updated in place; ``hinv``: upper Cholesky
    factor of the damped inverse Hessian in the same order. Batches hold whole groups of ``group`` columns
    (about ``block_size`` columns each), so a group's columns are all in the batch when its grid is taken:
    ``ensure_grid(g, x)`` sees the error-compensated columns of group ``g`` starting at its first column
    ([out, <= group]) before that column is rounded, and fits the grid if it has none yet.
    ``round_column(i, col, x)`` rounds column ``x`` [out] (position ``i`` in ``perm`` order, ``col`` in the
    original order), stores its codes and returns its dequantized values; the rounding error is spread over
    the later columns of the batch at once and over the rest of the matrix once per batch."""
    cols = w.shape[1]
    batch = group * max(1, block_size // group)
    for i1 in range(0, cols, batch):
        i2 = min(i1 + batch, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _threads(1):
            for i in range(i2 - i1):
                col = int(perm[i1 + i])
                g = col // group
                ensure_grid(g, w1[:, i : i + min(group, cols - g * group)])
                x = w1[:, i]
                dq = round_column(i1 + i, col, x)
                e = (x - dq) / hinv1[i, i]
                w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
                err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def _working_hessian(hessian: torch.Tensor, w: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """float32 Hessian to work in (``hessian`` itself when ``overwrite``); dead inputs (a column no token
    ever set) get a unit diagonal and their weights are zeroed, as the GPTQ reference does."""
    h = hessian if overwrite and hessian.dtype == torch.float32 else hessian.to(torch.float32, copy=True)
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h.diagonal()[dead] = 1.0
        w[:, dead] = 0.0
    return h


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``h`` + damp * mean(diag h) * I, in place (no identity matrix is built)."""
    h.diagonal().add_(damp * torch.mean(torch.diagonal(h)))
    return h


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1), computed in ``h``'s own memory (``h`` is consumed);
    raises the damping until H is positive definite.

    The GPTQ reference computes cholesky(H) -> cholesky_inverse -> cholesky(upper): 4n^3/3 flops, and
    torch's CPU cholesky_inverse runs at a few GFLOP/s (measured: 14 s at n = 4096, ~25 min at 7B's
    down_proj n = 18944). The same factor, cheaper: with J the order-reversing permutation, the lower
    Cholesky factor L of J H J gives H = (J L J)(J L J)^T with J L J upper, so H^-1 = U^T U for
    U = (J L J)^-1 = J L^-1 J, upper with a positive diagonal: the unique upper factor of H^-1. That is one
    Cholesky and one triangular inverse (n^3 flops, mostly matmuls), and J X J of a square matrix is the
    reversal of its flattened storage, done in place."""
    if h.shape[0] <= SMALL:
        with _threads(1):
            return _upper_inverse_cholesky_(h)
    return _upper_inverse_cholesky_(h)


def _upper_inverse_cholesky_(h: torch.Tensor) -> torch.Tensor:
    mean_diag = float(torch.mean(torch.diagonal(h)))
    added = 0.0
    _reverse_(h)  # J H J
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(h)  # a second buffer: h is kept for a retry with more damping
        if int(info) == 0:
            h.copy_(lower)
            del lower
            _lower_inverse_(h)
            _reverse_(h)  # J L^-1 J
            return h
        del lower
        extra = max(added * 10, 1e-4 * mean_diag) - added
        h.diagonal().add_(extra)  # J (H + e I) J = J H J + e I
        added += extra
    raise torch.linalg.LinAlgError("Hessian not positive definite even with extra damping")


def _reverse_(m: torch.Tensor, chunk: int = 1 << 22) -> None:
    """Reverse the flattened storage of contiguous ``m`` in place (for a square matrix: J m J), swapping
    ``chunk`` elements at a time (no full-size temporary)."""
    flat = m.view(-1)
    n = flat.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        head = flat[a:b].clone()
        flat[a:b] = flat[n - b:n - a].flip(0)
        flat[n - b:n - a] = head.flip(0)


def _lower_inverse_(m: torch.Tensor, base: int = 256) -> None:
    """Invert the lower-triangular ``m`` [n, n] in place (upper part stays 0), by halves:
    [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], so all but ``base``-sized blocks are matmuls."""
    n = m.shape[0]
    if n <= SMALL and torch.get_num_threads() > 1:
        with _threads(1):
            return _lower_inverse_(m, base)
    if n <= base:
        m.copy_(torch.linalg.solve_triangular(m, torch.eye(n, dtype=m.dtype), upper=False))
        return
    k = n // 2
    a, c, d = m[:k, :k], m[k:, :k], m[k:, k:]
    _lower_inverse_(a, base)
    _lower_inverse_(d, base)
    dc = d @ c
    torch.matmul(dc, a, out=c)
    c.neg_()


def gptq_kquant(fmt: KQuantFormat, weight: torch.Tensor, hessian: torch.Tensor,
                options: GPTQOptions = GPTQOptions(), overwrite: bool = False) -> KQuantTensor:
    """GPTQ into a GGUF grid (Q2_K..Q6_K, Q5_0/Q5_1; kformats.py).

    When the column loop reaches a block (256 columns, or 32), that block's grid (fp16 d/dmin and the
    sub-blocks' integer scales/mins) is fitted on the *error-compensated* weights by ggml's own
    importance-weighted search (kq_types.fit, llama.cpp's imatrix path) with importance diag(H) (the
    layer's mean x^2 per column, up to a factor the search does not see); then the block's columns are
    rounded one at a time on that fixed grid and their error spread over the columns not yet quantized.
    With ``act_order`` every grid is fitted first from the original weights (static groups). The result's
    grid and codes are the GGUF block's numbers, so the GGUF writer carries them without re-rounding.
    """
    sp = fmt.spec
    blk = sp.block
    w = weight.to(torch.float32, copy=True)
    rows, cols = w.shape
    importance = torch.diagonal(hessian).to(torch.float32).clamp(min=0).numpy().copy()
    h = _working_hessian(hessian, w, overwrite)
    sigma2 = (w * w).mean(1).numpy()  # Q5_0/Q5_1's whole-row mean x^2 in ggml's weights (a weighting only)

    nbr = cols // blk
    grids: list[KGrid | None] = [None] * nbr
    steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fit_block(g: int, x: torch.Tensor) -> None:
        grid = fit_blocks(fmt.kind, x.numpy(), importance[g * blk:(g + 1) * blk], sigma2)
        grids[g] = grid
        step, off = grid.step_offset()  # [rows, nsub] float32: gguf-py's products
        steps[g] = (torch.from_numpy(step), torch.from_numpy(off))

    perm = torch.argsort(torch.diagonal(h), descending=True) if options.act_order else torch.arange(cols)
    if options.act_order:
        for g in range(nbr):
            fit_block(g, w[:, g * blk:(g + 1) * blk])
    if options.act_order:
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _upper_inverse_cholesky(_damped(h, options.damp))
    del h

    codes = torch.empty(rows, cols, dtype=torch.uint8)
    lo, hi = float(-sp.zp), float(sp.qmax - sp.zp)

    def ensure_grid(g: int, x: torch.Tensor) -> None:
        if grids[g] is None:  # the block's first column: its grid from the compensated weights
            fit_block(g, x)

    def round_column(i: int, col: int, x: torch.Tensor) -> torch.Tensor:
        step, off = steps[col // blk]
        j = (col % blk) // sp.sub
        s, o = step[:, j], off[:, j]
        q = torch.round((x + o) / torch.where(s == 0, torch.ones_like(s), s)).clamp_(lo, hi)
        q = torch.where(s == 0, torch.zeros_like(q), q)  # a zero step holds -off whatever the code
        codes[:, col] = (q + sp.zp).to(torch.uint8)
        return s * q - o

    _sweep(w, hinv, perm, blk, options.block_size, ensure_grid, round_column)

    full = KGrid(
        np.stack([gr.d for gr in grids], 1).reshape(-1), np.stack([gr.dmin for gr in grids], 1).reshape(-1),
        np.stack([gr.scale for gr in grids], 1).reshape(rows * nbr, sp.nsub),
        np.stack([gr.mins for gr in grids], 1).reshape(rows * nbr, sp.nsub), np.zeros(0, np.uint8),
    )
    return from_grid(fmt.kind, (rows, cols), full, codes.numpy())
