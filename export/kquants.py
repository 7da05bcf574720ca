"""K-quant packers: dsq's own, checked bit-exact against gguf-py's dequantizers (tests/test_gguf_quants.py).

``Q6_K`` (ggml-common.h ``block_q6_K``, 210 bytes per 256 weights): ``ql[128]`` low 4 bits, ``qh[64]``
high 2 bits, ``scales[16]`` int8 (one per 16 weights), fp16 ``d``; w = d * scale * (q - 32), q in [0, 63].
Within each half of 128 weights, element e's low nibble is in byte e % 64 (shifted by 4 when e >= 64)
and its high bits in qh byte e % 32, shifted by 2 * (e // 32) (ggml's ``dequantize_row_q6_K``).

The quantizer is plain round-to-nearest with ggml's scale scheme (sub-block scale = signed max / -32,
int8 scales relative to the signed largest one / -128), not ggml's iterative ``make_qx_quants`` search,
so the bytes differ from llama.cpp's Q6_K; the point is that any 6-bit values dsq chooses (calibrated
ones included) can be written as Q6_K and read back exactly as dsq computed them.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """Per last-dim row, the element with the largest magnitude (sign kept), first one on ties."""
    return torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))[..., 0]


def quantize_q6_k(rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] float rows (k a multiple of 256) -> (Q6_K bytes, the float32 values they hold)."""
    n, k = rows.shape
    x = rows.to(torch.float32).reshape(-1, 16, 16)  # super-blocks x 16 sub-blocks x 16 weights
    sub = _signed_max(x) / -32.0  # [nb, 16]
    top = _signed_max(sub)  # [nb]
    iscale = torch.where(top == 0, torch.zeros_like(top), -128.0 / top)
    sc = torch.round(iscale[:, None] * sub).clamp(max=127).to(torch.int8)
    d = torch.where(top == 0, torch.zeros_like(top), 1.0 / iscale).to(torch.float16)
    step = d.to(torch.float32)[:, None] * sc.to(torch.float32)  # [nb, 16], the order gguf-py multiplies in
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.where(step[..., None] == 0, torch.zeros_like(x), torch.round(x / safe[..., None])).clamp(-32, 31)
    values = (step[..., None] * q).reshape(n, k)
    u = (q + 32).to(torch.uint8).reshape(-1, 2, 128)  # two halves of 128
    low, high = u & 0x0F, u >> 4
    low = low.reshape(-1, 2, 2, 64)
    ql = low[:, :, 0] | (low[:, :, 1] << 4)  # [nb, 2, 64]
    high = high.reshape(-1, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # [nb, 2, 32]
    nb = x.shape[0]
    out = torch.empty(nb, 210, dtype=torch.uint8)
    out[:, :128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(torch.uint8)
    out[:, 208:] = d.reshape(nb, 1).view(torch.uint8)
    return out.reshape(-1).numpy(), values
