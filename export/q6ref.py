"""Q6_K as llama.cpp writes it: ggml's ``quantize_row_q6_K_ref`` (ggml-quants.c), byte for byte.

``block_q6_K`` (ggml-common.h, 210 bytes per 256 weights): ``ql[128]`` low 4 bits, ``qh[64]`` high 2 bits,
``scales[16]`` int8 (one per sub-block of 16 weights), fp16 ``d``; w = d * scale_j * (q - 32), q in [0, 63].
Within each half of 128 weights, element e's low nibble is in byte e % 64 (shifted by 4 when e >= 64) and its
high bits in qh byte e % 32, shifted by 2 * (e // 32) (ggml's ``dequantize_row_q6_K``). The difference is the sub-block scale: ggml's
``make_qx_quants(16, nmax 32, rmse_type 1)`` starts from round(-32 x / m) (m the signed largest) and tries 18
other trial scales -(32 + 0.1 i) / m, i = -9..9, keeping the one whose least-squares fit with weights x^2 explains
most (largest (sum w x l)^2 / sum w l^2); the fitted scale, not the trial one, is the sub-block's. Sums run
element by element in float32, in ggml's order, because the comparisons between trials are near-ties.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.errors import UnsupportedError

QK_K = 256
_EPS = 1e-15  # ggml's GROUP_MAX_EPS


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))[..., 0]


def _sums(wx_t: torch.Tensor, w_t: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum w*x*l, sum w*l*l) in index order, float32 (ggml's loop). ``wx_t``/``w_t`` are [n, m] (transposed,
    contiguous), so each step reads one contiguous column: the same operations in the same order as a loop
    over ``[:, i]`` (bit-identical), without strided reads, which were 70 % of the packer's time."""
    lq_t = lq.t().contiguous()
    sumlx = torch.zeros(wx_t.shape[1])
    suml2 = torch.zeros(wx_t.shape[1])
    prod = torch.empty(wx_t.shape[1])
    for i in range(wx_t.shape[0]):
        torch.mul(wx_t[i], lq_t[i], out=prod)
        sumlx.add_(prod)
        torch.mul(w_t[i], lq_t[i], out=prod)
        prod.mul_(lq_t[i])
        suml2.add_(prod)
    return sumlx, suml2


def _make_qx(x: torch.Tensor, nmax: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` per row of x [m, n] -> (scale [m], codes 0..2nmax-1)."""
    mx = _signed_max(x)
    zero = mx.abs() < _EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x
    w_t, wx_t = w.t().contiguous(), wx.t().contiguous()

    def trial(numerator: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = torch.full_like(mx, numerator) / safe
        lq = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return (lq, *_sums(wx_t, w_t, lq))

    lq, sumlx, suml2 = trial(-float(nmax))
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)), 0.0)
    best = scale * sumlx
    f32 = np.float32
    for i in range(-9, 10):
        if i == 0:
            continue
        num = -float(f32(f32(nmax) + f32(0.1) * f32(i)))  # -(nmax + 0.1f*is), formed in float32
        lq_i, slx, sl2 = trial(num)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        lq = torch.where(take[:, None], lq_i, lq)
        scale = torch.where(take, slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), scale)
        best = torch.where(take, scale * slx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    codes = torch.where(zero[:, None], torch.zeros_like(lq), lq + nmax)
    return scale, codes


def quantize_q6_k_ref(rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (Q6_K bytes as llama.cpp writes them, the float32 values
    gguf-py reads back)."""
    n, k = rows.shape
    if k % QK_K:
        raise UnsupportedError(f"Q6_K needs rows that are whole blocks of {QK_K}; got rows of {k}")
    x = rows.to(torch.float32).reshape(-1, 16, 16)
    nb = x.shape[0]
    scales, codes = _make_qx(x.reshape(-1, 16))
    scales, codes = scales.reshape(nb, 16), codes.reshape(nb, 16, 16)
    top = _signed_max(scales)
    live = top.abs() >= _EPS
    iscale = torch.full_like(top, -128.0) / torch.where(live, top, torch.ones_like(top))
    sc = torch.where(live[:, None], torch.round(iscale[:, None] * scales).clamp(max=127), 0.0).to(torch.int8)
    d = torch.where(live, torch.ones_like(iscale) / iscale, torch.zeros_like(iscale)).to(torch.float16)
    step = d.to(torch.float32)[:, None] * sc.to(torch.float32)  # [nb, 16], gguf-py's order
    safe = torch.where(step == 0, torch.ones_like(step), step)
    requant = torch.round(x / safe[..., None]).clamp(-32, 31) + 32
    codes = torch.where(step[..., None] == 0, codes, requant)  # ggml keeps the search's codes when d == 0
    codes = torch.where(live[:, None, None], codes, torch.zeros_like(codes)).to(torch.uint8)  # zero block: memset
    values = (step[..., None] * (codes.to(torch.float32) - 32)).reshape(n, k)
    u = codes.reshape(nb, 2, 128)
    low, high = u & 0x0F, u >> 4
    low = low.reshape(nb, 2, 2, 64)
    ql = low[:, :, 0] | (low[:, :, 1] << 4)  # [nb, 2, 64]
    high = high.reshape(nb, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = torch.empty(nb, 210, dtype=torch.uint8)
    out[:, :128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(torch.uint8)
    out[:, 208:] = d.reshape(nb, 1).view(torch.uint8)
    return out.reshape(-1).numpy(), values
