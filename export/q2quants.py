"""Q2_K packer: ggml's ``quantize_row_q2_K_ref`` (ggml-quants.c), checked against ggml and gguf-py.

``block_q2_K`` (ggml-common.h), 84 bytes per 256 weights: ``scales[16]`` (per sub-block of 16: a 4-bit scale
in the low nibble, a 4-bit min in the high one), ``qs[64]`` (2-bit codes, packed as Q3_K's low bits), fp16
``d``, fp16 ``dmin``; w = d * sc_j * q - dmin * m_j, q in [0, 3].

The quantizer: per sub-block ``make_qkx2_quants(16, nmax 3, weights |x|, rmin -0.5, rdelta 0.1, 15 steps,
use_mad)``, the search of kquants.py's Q4_K with the *absolute* weighted error, then scales and mins rounded to
4 bits against the largest of each (d = max / 15) and the codes re-rounded with them. llama.cpp's Q2_K_S file
type (not offered) uses the imatrix variant instead.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.errors import UnsupportedError

from .kquants import QK_K, _qkx2, _rdiv

Q2_K_BYTES = 84


def quantize_q2_k(rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (Q2_K bytes, the float32 values gguf-py reads back)."""
    n, k = rows.shape
    if k % QK_K:
        raise UnsupportedError(f"Q2_K needs rows that are whole blocks of {QK_K}; got rows of {k}")
    x = rows.to(torch.float32).reshape(-1, 16, 16)  # super-blocks x 16 sub-blocks x 16 weights
    nb = x.shape[0]
    scale, mins, codes = _qkx2(x.reshape(-1, 16), x.reshape(-1, 16).abs(), nmax=3, rmin=-0.5, rdelta=0.1,
                               nstep=15, use_mad=True)
    scale, mins, codes = scale.reshape(nb, 16), mins.reshape(nb, 16), codes.reshape(nb, 16, 16)
    max_scale = scale.clamp(min=0).max(-1).values  # ggml starts both maxima at 0
    max_min = mins.clamp(min=0).max(-1).values
    has_s, has_m = max_scale > 0, max_min > 0
    inv_s = _rdiv(15.0, torch.where(has_s, max_scale, torch.ones_like(max_scale)))
    inv_m = _rdiv(15.0, torch.where(has_m, max_min, torch.ones_like(max_min)))
    ls = torch.where(has_s[:, None], torch.round(inv_s[:, None] * scale), torch.zeros_like(scale)).to(torch.uint8)
    lm = torch.where(has_m[:, None], torch.round(inv_m[:, None] * mins), torch.zeros_like(mins)).to(torch.uint8)
    d = torch.where(has_s, max_scale / torch.full_like(max_scale, 15.0), torch.zeros_like(max_scale)).to(torch.float16)
    dmin = torch.where(has_m, max_min / torch.full_like(max_min, 15.0), torch.zeros_like(max_min)).to(torch.float16)
    step = d.to(torch.float32)[:, None] * (ls & 0x0F).to(torch.float32)  # [nb, 16], gguf-py's products
    off = dmin.to(torch.float32)[:, None] * (lm & 0x0F).to(torch.float32)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    requant = torch.round((x + off[..., None]) / safe[..., None]).clamp(0, 3).to(torch.uint8)
    codes = torch.where(step[..., None] == 0, codes, requant)  # ggml keeps the search's codes when d == 0
    values = (step[..., None] * codes.to(torch.float32) - off[..., None]).reshape(n, k)
    low = codes.reshape(nb, 2, 4, 32).to(torch.int64)
    qs = (low << (2 * torch.arange(4))[None, None, :, None]).sum(2)
    out = torch.empty(nb, Q2_K_BYTES, dtype=torch.uint8)
    out[:, :16] = ls | (lm << 4)
    out[:, 16:80] = qs.reshape(nb, 64).to(torch.uint8)
    out[:, 80:82] = d.reshape(nb, 1).view(torch.uint8)
    out[:, 82:84] = dmin.reshape(nb, 1).view(torch.uint8)
    return out.reshape(-1).numpy(), values
