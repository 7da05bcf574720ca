"""Q3_K packer: ggml's ``quantize_row_q3_K_ref`` (ggml-quants.c), checked against ggml and gguf-py.

``block_q3_K`` (ggml-common.h), 110 bytes per 256 weights: ``hmask[32]``, ``qs[64]``, ``scales[12]``, fp16 ``d``.
16 sub-blocks of 16 weights, each with a 6-bit signed scale s_j in [-32, 31]; w = d * s_j * (q - 4), q in
[0, 7]. Weight e's low 2 bits are in qs[32 * (e // 128) + e % 32] at bit 2 * ((e % 128) // 32), its third bit
is bit e // 32 of hmask[e % 32]. Scale j's low nibble is byte j (j < 8) or the high nibble of byte j - 8, its top
2 bits are bits 2 * (j // 4) of byte 8 + j % 4.

The quantizer: per sub-block ``make_q3_quants(16, nmax 4, do_rmse)``: codes round(-4 x / m) for the signed
largest m, then 5 passes of a coordinate descent that moves one code at a time when it raises
(sum w x l)^2 / (sum w l^2) with w = x^2 (the least-squares fit of the scale), the scale being that fit; the 16
scales are rounded to 6 bits against the signed largest (d = m / -32) and the codes re-rounded with them. The
sums run in ggml's order, element by element in float32, because the descent's comparisons are near-ties.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.errors import UnsupportedError

QK_K = 256
Q3_K_BYTES = 110
_EPS = 1e-15  # ggml's GROUP_MAX_EPS: a sub-block below it is all zeros


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude per row (sign kept, first on ties, as ggml's strict ``>`` scan)."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))[..., 0]


def _make_q3(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants(16, nmax, x, L, true)`` for every row of x [m, 16] -> (scale [m], codes 0..2nmax-1)."""
    mx = _signed_max(x)
    zero = mx.abs() < _EPS
    iscale = torch.full_like(mx, -float(nmax)) / torch.where(zero, torch.ones_like(mx), mx)
    lq = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x  # ggml's w*x[i], then *l: the same float32 products
    sumlx = torch.zeros_like(mx)
    suml2 = torch.zeros_like(mx)
    for i in range(x.shape[1]):  # float32 running sums in index order
        sumlx = sumlx + wx[:, i] * lq[:, i]
        suml2 = suml2 + (w[:, i] * lq[:, i]) * lq[:, i]
    for _ in range(5):
        for i in range(x.shape[1]):
            li = lq[:, i]
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - (w[:, i] * li) * li
            pos = slx > 0
            new = torch.round((x[:, i] * sl2) / torch.where(pos, slx, torch.ones_like(slx))).clamp(-nmax, nmax - 1)
            moved = pos & (new != li)
            slx2 = slx + wx[:, i] * new
            sl22 = sl2 + (w[:, i] * new) * new
            take = moved & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lq[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(zero, torch.zeros_like(mx), sumlx / torch.where(zero, torch.ones_like(suml2), suml2))
    codes = torch.where(zero[:, None], torch.zeros_like(lq), lq + nmax)
    return scale, codes


def quantize_q3_k(rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (Q3_K bytes, the float32 values gguf-py reads back)."""
    n, k = rows.shape
    if k % QK_K:
        raise UnsupportedError(f"Q3_K needs rows that are whole blocks of {QK_K}; got rows of {k}")
    x = rows.to(torch.float32).reshape(-1, 16, 16)  # super-blocks x 16 sub-blocks x 16 weights
    nb = x.shape[0]
    scales, codes = _make_q3(x.reshape(-1, 16))
    scales, codes = scales.reshape(nb, 16), codes.reshape(nb, 16, 16)
    top = _signed_max(scales)
    has = top != 0
    iscale = torch.full_like(top, -32.0) / torch.where(has, top, torch.ones_like(top))
    ls = torch.where(has[:, None], torch.round(iscale[:, None] * scales).clamp(-32, 31) + 32,
                     torch.zeros_like(scales)).to(torch.uint8)  # 6-bit, offset 32
    d = torch.where(has, torch.ones_like(iscale) / iscale, torch.zeros_like(iscale)).to(torch.float16)
    step = d.to(torch.float32)[:, None] * (ls.to(torch.float32) - 32)  # [nb, 16], gguf-py's product
    safe = torch.where(step == 0, torch.ones_like(step), step)
    requant = torch.round(x / safe[..., None]).clamp(-4, 3) + 4
    codes = torch.where(step[..., None] == 0, codes, requant).to(torch.uint8)  # ggml keeps the search's on d == 0
    values = (step[..., None] * (codes.to(torch.float32) - 4)).reshape(n, k)
    flat = codes.reshape(nb, 256)
    hmask = ((flat >> 2).reshape(nb, 8, 32).to(torch.int64) << torch.arange(8)[None, :, None]).sum(1)
    low = (flat & 3).reshape(nb, 2, 4, 32).to(torch.int64)
    qs = (low << (2 * torch.arange(4))[None, None, :, None]).sum(2)  # [nb, 2, 32]
    sc = torch.zeros(nb, 12, dtype=torch.uint8)
    sc[:, :8] = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)
    top2 = (ls >> 4).reshape(nb, 4, 4).to(torch.int64)  # [nb, j // 4, j % 4]
    sc[:, 8:] = (top2 << (2 * torch.arange(4))[None, :, None]).sum(1).to(torch.uint8)
    out = torch.empty(nb, Q3_K_BYTES, dtype=torch.uint8)
    out[:, :32] = hmask.to(torch.uint8)
    out[:, 32:96] = qs.reshape(nb, 64).to(torch.uint8)
    out[:, 96:108] = sc
    out[:, 108:] = d.reshape(nb, 1).view(torch.uint8)
    return out.reshape(-1).numpy(), values
