"""Q4_K: dsq's own packer and ggml's reference quantizer, checked bit-exact against gguf-py's dequantizer.

The shared K-quant helpers (``_qkx2``, ``_rdiv``, ``_seqsum``) serve the Q5_K and Q2_K packers too
(q5quants.py, q2quants.py); Q6_K is in q6ref.py, Q3_K in q3quants.py.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.errors import UnsupportedError

QK_K = 256


# ---------------------------------------------------------------------------------------------------------
# Q4_K (ggml-common.h ``block_q4_K``, 144 bytes per 256 weights): fp16 ``d``, fp16 ``dmin``, ``scales[12]``
# holding a 6-bit scale ls_j and a 6-bit min lm_j for each of 8 sub-blocks of 32, and ``qs[128]`` 4-bit
# codes; w = d * ls_j * q - dmin * lm_j. The 6-bit packing (``get_scale_min_k4``): for j < 4, byte j holds
# ls_j and byte j+4 holds lm_j in their low 6 bits; for j >= 4, byte j+4 holds ls_j & 15 | (lm_j & 15) << 4
# and the top 2 bits of ls_j / lm_j go to bits 6-7 of bytes j-4 / j. Codes: each 64 weights take 32 bytes,
# weight l in the low nibble of byte l and weight l+32 in the high nibble.
#
# The quantizer follows ggml-quants.c ``quantize_row_q4_K_ref``: per sub-block, ``make_qkx2_quants``
# (nmax 15, rmin -1, rdelta 0.1, 20 steps, squared error) with weights av_x + |x| (av_x = RMS of the
# sub-block) searches a scale and a min by weighted least squares over 21 trial scales; the 8 scales
# and mins are then rounded to 6 bits against the largest of each (d = max_scale / 63, dmin = max_min / 63)
# and the codes re-rounded with the stored scales. With per-column importance (llama.cpp imatrix: mean x^2
# of the input feature), the search weights become importance * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2)
# of the super-block, as in ``quantize_row_q4_K_impl``; dsq keeps the reference's max-based 6-bit step
# (not the impl's ``make_qkx3_quants`` / ``make_qp_quants`` refinements), so with importance the bytes are
# dsq's own and differ from llama.cpp's imatrix Q4_K.
# ---------------------------------------------------------------------------------------------------------

Q4_K_BYTES = 144


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t as one IEEE division, like C's ``c/t``. (torch's ``c / t`` is ``t.reciprocal() * c``: two
    roundings, which moves ggml's trial scales by an ulp and flips its near-tie choices.)"""
    return torch.full_like(t, c) / t


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in index order, in float32, like ggml's C loops. Its near-ties between trial
    scales are decided by the last bits of these sums, so torch's pairwise sums would pick differently
    in ~5% of blocks; the sequential order makes the bytes equal llama.cpp's (test_gguf_kquants).
    numpy's ``add.accumulate`` is a float32 running sum in index order (``sum`` would be pairwise)."""
    a = t.contiguous().numpy()
    return torch.from_numpy(np.add.accumulate(a, axis=-1, dtype=np.float32)[..., -1].copy())


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
          nstep: int = 20, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` for every row of x [m, n] at once -> (scale, min >= 0, codes uint8).
    The weighted error is w * (scale * L - min - x)^2, or w * |scale * L - min - x| with ``use_mad`` (ggml's
    flag of the same name, Q2_K's search); returns min as a positive offset (ggml's the_min)."""

    def error(scale: torch.Tensor, mn: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        diff = scale[:, None] * codes + mn[:, None] - x
        return _seqsum(w * (diff.abs() if use_mad else diff.pow(2)))

    lo = x.min(dim=-1).values.clamp(max=0.0)
    hi = x.max(dim=-1).values
    rng = hi - lo
    flat = rng == 0
    safe_rng = torch.where(flat, torch.ones_like(rng), rng)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    iscale = _rdiv(nmax, safe_rng)
    scale = _rdiv(1.0, iscale)
    codes = torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
    best = error(scale, lo, codes)
    mn = lo.clone()
    for step in range(nstep + 1):
        # as in ggml, each trial is taken from the best min so far (``min`` is updated inside its loop)
        span = hi - mn
        span = torch.where(flat | (span == 0), torch.ones_like(span), span)
        f32 = np.float32  # ggml forms this numerator in float32, step by step
        iscale = _rdiv(float(f32(f32(f32(rmin) + f32(rdelta) * f32(step)) + f32(nmax))), span)
        la = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        sum_l = _seqsum(w * la)
        sum_l2 = _seqsum(w * la * la)
        sum_xl = _seqsum(w * la * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        sdet = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / sdet
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / sdet
        pos = this_min > 0  # a positive offset is not allowed: refit the scale alone through zero
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, la)
        better = ok & (err < best)
        codes = torch.where(better[:, None], la, codes)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    codes = torch.where(flat[:, None], torch.zeros_like(codes), codes)
    return scale, -mn, codes.to(torch.uint8)


def six_bit_scales(x: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, codes: torch.Tensor, nmax: int):
    """The step Q4_K and Q5_K share after the sub-block search (ggml's ``quantize_row_q4_K_ref`` /
    ``quantize_row_q5_K_ref``): 8 scales and mins per super-block rounded to 6 bits against the largest of each
    (d = max_scale / 63, dmin = max_min / 63), codes re-rounded with the stored values (0..nmax), scales packed.

    x [nb, 8, 32] float32; scale, mins [nb, 8]; codes [nb, 8, 32] from the search. Returns (d fp16 [nb],
    dmin fp16 [nb], packed scales uint8 [nb, 12], codes uint8 [nb, 8, 32], values float32 [nb, 256] as gguf-py
    dequantizes them).
    """
    nb = x.shape[0]
    max_scale = scale.max(-1).values
    max_min = mins.max(-1).values
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, _rdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    ls = torch.round(inv_scale[:, None] * scale).clamp(max=63).to(torch.uint8)
    lm = torch.round(inv_min[:, None] * mins).clamp(max=63).to(torch.uint8)
    d = (max_scale / torch.full_like(max_scale, 63.0)).to(torch.float16)  # a true division (see _rdiv)
    dmin = (max_min / torch.full_like(max_min, 63.0)).to(torch.float16)
    step = d.to(torch.float32)[:, None] * ls.to(torch.float32)  # [nb, 8], gguf-py's order of products
    off = dmin.to(torch.float32)[:, None] * lm.to(torch.float32)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    requant = torch.round((x + off[..., None]) / safe[..., None]).clamp(0, nmax).to(torch.uint8)
    codes = torch.where(step[..., None] == 0, codes, requant)  # ggml keeps the search's codes when d == 0
    values = (step[..., None] * codes.to(torch.float32) - off[..., None]).reshape(nb, -1)
    sc = torch.zeros(nb, 12, dtype=torch.uint8)
    sc[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return d, dmin, sc, codes, values


def quantize_q4_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] float rows (k a multiple of 256) -> (Q4_K bytes, the float32 values they hold).

    ``importance``: optional [k] non-negative weight per column (llama.cpp imatrix convention, mean x^2 of
    that input feature over calibration tokens); it weights the scale/min search of every sub-block.
    """
    n, k = rows.shape
    if k % QK_K:
        raise UnsupportedError(f"Q4_K needs rows that are whole blocks of {QK_K}; got rows of {k}")
    if importance is not None and tuple(importance.shape) != (k,):
        raise UnsupportedError(f"Q4_K importance has shape {tuple(importance.shape)}; expected ({k},)")
    x = rows.to(torch.float32).reshape(-1, 8, 32)  # super-blocks x 8 sub-blocks x 32 weights
    nb = x.shape[0]
    if importance is None:
        av = (_seqsum(x * x) / 32.0).sqrt()[..., None]
        w = av + x.abs()
    else:
        imp = importance.to(torch.float32).reshape(1, k // 256, 8, 32).expand(n, -1, -1, -1).reshape(nb, 8, 32)
        sigma2 = 2.0 * x.pow(2).reshape(nb, -1).mean(-1)
        w = imp * (sigma2[:, None, None] + x * x).sqrt()
    scale, mins, codes = _qkx2(x.reshape(-1, 32), w.reshape(-1, 32))
    scale, mins, codes = scale.reshape(nb, 8), mins.reshape(nb, 8), codes.reshape(nb, 8, 32)
    d, dmin, sc, codes, values = six_bit_scales(x, scale, mins, codes, nmax=15)
    q = codes.reshape(nb, 4, 2, 32)
    out = torch.empty(nb, Q4_K_BYTES, dtype=torch.uint8)
    out[:, 0:2] = d.reshape(nb, 1).view(torch.uint8)
    out[:, 2:4] = dmin.reshape(nb, 1).view(torch.uint8)
    out[:, 4:16] = sc
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return out.reshape(-1).numpy(), values.reshape(n, k)
