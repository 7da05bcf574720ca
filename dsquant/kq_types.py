"""K-quants (Q2_K..Q6_K) and the 32-blocks Q4_0/Q4_1/Q5_0/Q5_1, with and without an importance matrix, byte for
byte as ggml's ``ggml_quantize_chunk`` writes them.

Every K-quant is a *grid* per 256-weight super-block (fp16 ``d``, fp16 ``dmin``, one small integer scale and
min per sub-block) and *codes* on that grid. This module keeps the two apart:

* ``fit(kind, x, importance)`` -> ``KGrid``: the super-block's scales as ggml chooses them: without
  importance its ``quantize_row_qX_K_ref``, with importance (llama.cpp imatrix: mean x^2 per input column)
  its ``quantize_row_qX_K_impl`` (``make_qkx3_quants`` sub-block search weighted by
  ``qw * sqrt(sigma2 + x^2)``, then ``make_qp_quants``/``make_qx_quants`` for the 6/4-bit scales);
  The sub-block searches and the final rounding run in kq_search.py's compiled kernels (numba, ggml's float32
  operation order), one sub-block per row of ``x.reshape(-1, sub)``; the steps between them are numpy;
* ``requant(kind, x, grid)``: ggml's final rounding of every weight on the stored grid;
* ``values`` / ``pack``: what gguf-py dequantizes (bit for bit) and the block bytes (ggml-common.h).

GPTQ (dsquant/calib/gptq.py) fits a super-block's grid with ``fit`` when it reaches it and rounds its columns
on that grid one at a time; the GGUF writer then packs the same grid and codes (``pack``), so the file holds
exactly the calibrated values.

Per kind (``KSPEC``): sub-block width, sub-blocks per super-block, largest code, the code of value 0 for the
symmetric kinds (Q3_K: 4, Q6_K: 32), block bytes. Values: w = d * s_j * (q - zp) - dmin * m_j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UnsupportedError
from .kq_search import f32, make_q3, make_qkx, make_qp, make_qx, nearest_int, requant_rows, rowsum, signed_max

QK_K = 256


@dataclass(frozen=True)
class KSpec:
    sub: int  # weights per sub-block
    nsub: int  # sub-blocks per super-block
    qmax: int  # largest code
    zp: int  # code of value 0 (symmetric kinds), else 0
    nbytes: int  # bytes per super-block
    asym: bool

    @property
    def block(self) -> int:
        return self.sub * self.nsub

    @property
    def bits(self) -> int:
        return int(self.qmax).bit_length()


#: The K-quants, and the 5-bit 32-blocks as one-sub-block grids (Q5_0: w = d * (q - 16); Q5_1: w = d * q + m,
#: held as dmin = -m with one min of 1, which is the same float32 value: x - (-m) == x + m).
KSPEC: dict[str, KSpec] = {
    "q2_k": KSpec(16, 16, 3, 0, 84, True),
    "q3_k": KSpec(16, 16, 7, 4, 110, False),
    "q4_k": KSpec(32, 8, 15, 0, 144, True),
    "q5_k": KSpec(32, 8, 31, 0, 176, True),
    "q6_k": KSpec(16, 16, 63, 32, 210, False),
    "q5_0": KSpec(32, 1, 31, 16, 22, False),
    "q5_1": KSpec(32, 1, 31, 0, 24, True),
}
K_KINDS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


@dataclass
class KGrid:
    """The stored scales of ``nb`` super-blocks: ``d``/``dmin`` float16 [nb] (``dmin`` zero for Q3_K/Q6_K),
    ``scale`` int16 [nb, nsub] (the signed sub-block multiplier: Q3_K's 6-bit value - 32, Q6_K's int8),
    ``mins`` uint8 [nb, nsub] (zero for the symmetric kinds). ``codes`` [nb, nsub, sub] are the search's
    codes, which ggml keeps in sub-blocks whose step d * scale is 0."""

    d: np.ndarray
    dmin: np.ndarray
    scale: np.ndarray
    mins: np.ndarray
    codes: np.ndarray

    def step_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """(d * scale_j, dmin * min_j) float32 [nb, nsub], the products gguf-py's dequantizers form."""
        step = self.d.astype(np.float32)[:, None] * self.scale.astype(np.float32)
        off = self.dmin.astype(np.float32)[:, None] * self.mins.astype(np.float32)
        return step, off


def _u8(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to ``uint8_t`` (wraps)."""
    return (v.astype(np.int64) & 255).astype(np.uint8)


def _max_based(v: np.ndarray, levels: float) -> tuple[np.ndarray, np.ndarray]:
    """ref's rounding of per-sub-block scales (or mins) [nb, nsub] against their largest (ggml starts the
    max at 0): (6-bit/4-bit values (uint8, C's wrap then MIN), the fp16 super-block multiplier)."""
    top = np.maximum(v.max(1), f32(0))
    with np.errstate(divide="ignore"):
        inv = np.where(top > 0, f32(levels) / np.where(top > 0, top, f32(1)), f32(0)).astype(np.float32)
    q = np.minimum(_u8(np.rint(inv[:, None] * v)), np.uint8(levels))
    return q, (top / f32(levels)).astype(np.float16)


def fit(kind: str, x: np.ndarray, importance: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> KGrid:
    """ggml's choice of the stored scales for float32 super-blocks ``x`` [nb, 256] (Q5_0/Q5_1: blocks [nb, 32]).

    ``importance`` [nb, block] (each block's columns' imatrix entries) selects ggml's imatrix path
    (``quantize_row_qX_K_impl``); None its reference path (``quantize_row_qX_K_ref``). Q5_0/Q5_1 need
    ``sigma2`` [nb] with importance (ggml's mean x^2 over the block's whole row). The sub-block searches
    run in kq_search's compiled kernels, one sub-block per row of ``x.reshape(-1, sub)``."""
    sp = KSPEC[kind]
    x = np.ascontiguousarray(x, dtype=np.float32)
    nb = x.shape[0]
    if kind in ("q5_0", "q5_1"):
        return _fit_32(kind, x, importance, sigma2)
    xs = x.reshape(-1, sp.sub)  # [nb * nsub, sub]: sub-block j of super-block b is row b * nsub + j
    zeros = np.zeros((nb, sp.nsub), np.uint8)
    with np.errstate(all="ignore"):
        if importance is not None:
            sigma2 = rowsum(x * x)
            sigma2 = (sigma2 if kind == "q2_k" else f32(2) * sigma2) / f32(QK_K)
            sig = np.repeat(sigma2, sp.nsub)[:, None]  # per sub-block row
            w = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, sp.sub) * np.sqrt(sig + xs * xs)
        if kind in ("q4_k", "q5_k"):
            nmax = sp.qmax
            if importance is None:
                av = np.sqrt(rowsum(xs * xs) / f32(32))
                scale, mins, codes = make_qkx(xs, av[:, None] + np.abs(xs), nmax,
                                              -1.0 if kind == "q4_k" else -0.5, 0.1, 20 if kind == "q4_k" else 15)
                ls, d = _max_based(scale.reshape(nb, 8), 63.0)
                lm, dmin = _max_based(mins.reshape(nb, 8), 63.0)
            else:
                sw = rowsum(w).reshape(nb, 8)
                scale, mins, codes = make_qkx(xs, w, nmax, -0.9, 0.05, 36)
                dblk, ls = make_qp(scale.reshape(nb, 8), 63, sw)
                mblk, lm = make_qp(mins.reshape(nb, 8), 63, sw)
                ls, lm = np.minimum(ls, np.uint8(63)), np.minimum(lm, np.uint8(63))
                d, dmin = dblk.astype(np.float16), mblk.astype(np.float16)
            return KGrid(d, dmin, ls.astype(np.int16), lm, codes.reshape(nb, 8, 32))
        if kind == "q2_k":
            if importance is None:
                scale, mins, codes = make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
                ls, d = _max_based(scale.reshape(nb, 16), 15.0)
                lm, dmin = _max_based(mins.reshape(nb, 16), 15.0)
            else:
                sw = rowsum(w).reshape(nb, 16)
                scale, mins, codes = make_qkx(xs, w, 3, -0.9, 0.05, 36)
                dblk, ls = make_qp(scale.reshape(nb, 16), 15, sw)
                mblk, lm = make_qp(mins.reshape(nb, 16), 15, sw)
                byte = ls | (lm << 4)  # the stored byte, as C's uint8 arithmetic writes it
                ls, lm = byte & 0x0F, byte >> 4
                d, dmin = dblk.astype(np.float16), mblk.astype(np.float16)
            return KGrid(d, dmin, ls.astype(np.int16), lm, codes.reshape(nb, 16, 16))
        if kind == "q3_k":
            if importance is None:
                scale, codes = make_q3(xs, 4)
                scale = scale.reshape(nb, 16)
                top = signed_max(scale)
                has = top != 0
                iscale = (f32(-32) / np.where(has, top, f32(1))).astype(np.float32)
                l8 = nearest_int(iscale[:, None] * scale).astype(np.int64)
                l8 = ((l8 + 128) & 255) - 128  # C's int8_t
                ls = np.where(has[:, None], np.clip(l8, -32, 31) + 32, 0)
                d = np.where(has, f32(1) / iscale, f32(0)).astype(np.float16)
            else:
                sw = rowsum(w).reshape(nb, 16)
                scale, codes = make_qx(xs, 4, w)
                dblk, ls = make_qx(scale.reshape(nb, 16), 32, sw)
                d = dblk.astype(np.float16)
            return KGrid(d, np.zeros(nb, np.float16), ls.astype(np.int16) - 32, zeros, codes.reshape(nb, 16, 16))
        if kind == "q6_k":
            qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32).reshape(-1, 16)
            scale, codes = make_qx(xs, 32, qw)
            scale = scale.reshape(nb, 16)
            top = signed_max(scale)
            live = np.abs(top) >= f32(1e-15)
            iscale = (f32(-128) / np.where(live, top, f32(1))).astype(np.float32)
            sc = np.where(live[:, None], np.minimum(np.rint(iscale[:, None] * scale), f32(127)), f32(0))
            d = np.where(live, f32(1) / iscale, f32(0)).astype(np.float16)
            codes = np.where(live[:, None, None], codes.reshape(nb, 16, 16), np.uint8(0))  # memset
            return KGrid(d, np.zeros(nb, np.float16), sc.astype(np.int16), zeros, codes)
    raise UnsupportedError(f"no K-quant {kind!r}; known: {', '.join(KSPEC)}")


def _fit_32(kind: str, x: np.ndarray, importance: np.ndarray | None, sigma2: np.ndarray | None) -> KGrid:
    """Q5_0/Q5_1 grids: ggml's ``quantize_row_q5_X_ref`` scale (and min) without importance, its ``_impl``
    search with importance (codes kept as the search's)."""
    nb = x.shape[0]
    ones = np.ones((nb, 1), np.int16)
    with np.errstate(all="ignore"):
        if importance is None:
            if kind == "q5_0":
                d = signed_max(x) / f32(-16)
                inv = np.where(d == 0, f32(0), f32(1) / np.where(d == 0, f32(1), d))
                q = np.minimum(np.trunc(x * inv[:, None] + f32(16.5)), f32(31)).astype(np.uint8)
                return KGrid(d.astype(np.float16), np.zeros(nb, np.float16), ones, np.zeros((nb, 1), np.uint8), q[:, None])
            lo, hi = x.min(1), x.max(1)
            d = (hi - lo) / f32(31)
            inv = np.where(d == 0, f32(0), f32(1) / np.where(d == 0, f32(1), d))
            q = np.minimum(np.trunc((x - lo[:, None]) * inv[:, None] + f32(0.5)), f32(31)).astype(np.uint8)
            return KGrid(d.astype(np.float16), (-lo.astype(np.float16)), ones, np.ones((nb, 1), np.uint8), q[:, None])
        w = np.asarray(importance, np.float32) * np.sqrt(np.asarray(sigma2, np.float32)[:, None] + x * x)
        if kind == "q5_0":
            scale, codes = make_qx(x, 16, w)
            return KGrid(scale.astype(np.float16), np.zeros(nb, np.float16), ones, np.zeros((nb, 1), np.uint8),
                         codes[:, None])
        scale, the_min, codes = make_qkx(x, w, 31, -0.9, 0.05, 36)
        # ggml stores m = fp16(-the_min); dmin = -m is the same fp16 negated (exact)
        return KGrid(scale.astype(np.float16), -((-the_min).astype(np.float16)), ones, np.ones((nb, 1), np.uint8),
                     codes[:, None])


def requant(kind: str, x: np.ndarray, grid: KGrid) -> np.ndarray:
    """Codes uint8 [nb, nsub, sub] of ``x`` [nb, 256] on ``grid``: ggml's last loop (nearest code to
    (x + dmin * m_j) / (d * s_j)); sub-blocks whose step is 0 keep the search's codes (ggml's ``continue``)."""
    sp = KSPEC[kind]
    nb = x.shape[0]
    step, off = grid.step_offset()
    q = requant_rows(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, sp.sub), step.reshape(-1),
                     off.reshape(-1), grid.codes.reshape(-1, sp.sub), -sp.zp, sp.qmax - sp.zp, sp.zp)
    return q.reshape(nb, sp.nsub, sp.sub)


def values(kind: str, grid: KGrid, codes: np.ndarray) -> np.ndarray:
    """float32 [nb, block]: what gguf-py (and ggml) dequantize ``grid`` + ``codes`` to."""
    sp = KSPEC[kind]
    step, off = grid.step_offset()
    q = codes.astype(np.float32) - f32(sp.zp)
    with np.errstate(all="ignore"):  # an fp16 d of inf (weights beyond fp16's range): inf/NaN, as ggml reads it
        return (step[..., None] * q - off[..., None]).reshape(codes.shape[0], sp.block)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """Codes [nb, 256] < 4 -> [nb, 64]: qs[32 * (e // 128) + e % 32] holds e at bits 2 * ((e % 128) // 32)."""
    nb = q.shape[0]
    low = q.reshape(nb, 2, 4, 32).astype(np.uint8)
    out = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    return out.reshape(nb, 64)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 scale bytes from 6-bit scales and mins [nb, 8] (ggml's ``get_scale_min_k4`` inverse)."""
    sc = np.zeros((ls.shape[0], 12), np.uint8)
    sc[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return sc


def pack(kind: str, grid: KGrid, codes: np.ndarray) -> np.ndarray:
    """Block bytes uint8 [nb, nbytes] (ggml-common.h ``block_qX_K``)."""
    sp = KSPEC[kind]
    nb = codes.shape[0]
    q = codes.reshape(nb, sp.block).astype(np.uint8)
    out = np.zeros((nb, sp.nbytes), np.uint8)
    d = grid.d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    dmin = grid.dmin.astype(np.float16).view(np.uint8).reshape(nb, 2)
    if kind in ("q5_0", "q5_1"):
        qh, qs = _qh_qs(q)
        out[:, 0:2] = d
        if kind == "q5_1":
            out[:, 2:4] = (-grid.dmin.astype(np.float16)).view(np.uint8).reshape(nb, 2)  # m = -dmin
        out[:, -20:-16], out[:, -16:] = qh, qs
        return out
    if kind in ("q4_k", "q5_k"):
        ls, lm = grid.scale.astype(np.uint8), grid.mins.astype(np.uint8)
        out[:, 0:2], out[:, 2:4], out[:, 4:16] = d, dmin, _pack_scales_k4(ls, lm)
        if kind == "q4_k":
            h = q.reshape(nb, 4, 2, 32)
            out[:, 16:] = (h[:, :, 0] | (h[:, :, 1] << 4)).reshape(nb, 128)
        else:
            hi = (q >> 4).reshape(nb, 8, 32)
            out[:, 16:48] = np.bitwise_or.reduce(hi << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
            low = (q & 0x0F).reshape(nb, 4, 2, 32)
            out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
        return out
    if kind == "q2_k":
        out[:, :16] = grid.scale.astype(np.uint8) | (grid.mins.astype(np.uint8) << 4)
        out[:, 16:80] = _pack_2bit(q)
        out[:, 80:82], out[:, 82:84] = d, dmin
        return out
    if kind == "q3_k":
        ls = (grid.scale + 32).astype(np.uint8)
        hm = (q >> 2).reshape(nb, 8, 32)
        out[:, :32] = np.bitwise_or.reduce(hm << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        out[:, 32:96] = _pack_2bit(q & 3)
        sc = np.zeros((nb, 12), np.uint8)
        sc[:, :8] = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)
        top2 = (ls >> 4).reshape(nb, 4, 4)  # [nb, j // 4, j % 4]
        sc[:, 8:] = np.bitwise_or.reduce(top2 << (2 * np.arange(4, dtype=np.uint8))[None, :, None], axis=1)
        out[:, 96:108], out[:, 108:] = sc, d
        return out
    if kind == "q6_k":
        u = q.reshape(nb, 2, 128)
        low = (u & 0x0F).reshape(nb, 2, 2, 64)
        out[:, :128] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
        high = (u >> 4).reshape(nb, 2, 4, 32)
        out[:, 128:192] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
                           | (high[:, :, 3] << 6)).reshape(nb, 64)
        out[:, 192:208] = grid.scale.astype(np.int8).view(np.uint8)
        out[:, 208:] = d
        return out
    raise UnsupportedError(f"no K-quant {kind!r}; known: {', '.join(KSPEC)}")


# Row chunks for the packers: the searches are compiled (kq_search.py); the numpy steps around them (weights,
# scale rounding, values, packing) make ~30 whole-chunk temporaries, which 128 Ki weights keep in L2.
CHUNK = 1 << 17


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK // max(k, 1))
    return [(r, min(r + step, n)) for r in range(0, n, step)] or [(0, 0)]


def _importance(importance: torch.Tensor | np.ndarray | None, k: int, what: str) -> np.ndarray | None:
    if importance is None:
        return None
    imp = np.asarray(importance.detach().cpu().numpy() if isinstance(importance, torch.Tensor) else importance,
                     dtype=np.float32)
    if imp.shape != (k,):
        raise UnsupportedError(f"{what} importance has shape {tuple(imp.shape)}; expected ({k},), one per column")
    return imp


def quantize_k(kind: str, rows: torch.Tensor, importance: torch.Tensor | np.ndarray | None = None
               ) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (bytes as ``ggml_quantize_chunk(type, rows, ..., imatrix)``
    writes them, the float32 values gguf-py reads back). ``importance`` [k]: per-column imatrix entries."""
    n, k = rows.shape
    if k % QK_K:
        raise UnsupportedError(f"{kind.upper()} needs rows that are whole blocks of {QK_K}; got rows of {k}")
    imp = _importance(importance, k, kind.upper())
    sp = KSPEC[kind]
    x_all = rows.detach().to(torch.float32).numpy()
    out = np.empty((n, k // QK_K, sp.nbytes), np.uint8)
    vals = np.empty((n, k), np.float32)
    for r0, r1 in _chunks(n, k):
        x = np.ascontiguousarray(x_all[r0:r1]).reshape(-1, QK_K)
        qw = None if imp is None else np.broadcast_to(imp.reshape(1, -1, QK_K), (r1 - r0, k // QK_K, QK_K)).reshape(-1, QK_K)
        grid = fit(kind, x, qw)
        codes = requant(kind, x, grid)
        out[r0:r1] = pack(kind, grid, codes).reshape(r1 - r0, -1, sp.nbytes)
        vals[r0:r1] = values(kind, grid, codes).reshape(r1 - r0, k)
    return out.reshape(-1), torch.from_numpy(vals)


# ---------------------------------------------------------------------------------------------------------
# The 32-blocks with an importance matrix: ggml's quantize_row_q4_0_impl / q4_1 / q5_0 / q5_1. Per row,
# sigma2 = mean x^2 over the whole row; per block, weights qw * sqrt(sigma2 + x^2); Q4_0/Q5_0 take
# make_qx_quants(32, 8 | 16) (signed codes + nmax), Q4_1/Q5_1 make_qkx3_quants(32, 15 | 31, -0.9, 0.05, 36)
# with m = -the_min. The search's codes are stored as they are (no re-rounding on the fp16 scale).
# ---------------------------------------------------------------------------------------------------------
LEGACY = {"q4_0": (8, 18, False), "q5_0": (16, 22, False), "q4_1": (15, 20, True), "q5_1": (31, 24, True)}


def _qh_qs(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """5-bit codes [nb, 32] -> (qh [nb, 4], qs [nb, 16]) as ggml's Q5_0/Q5_1."""
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    bits = (q >> 4).astype(np.uint32)
    qh = np.bitwise_or.reduce(bits << np.arange(32, dtype=np.uint32)[None, :], axis=1)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4), qs


def quantize_legacy(kind: str, rows: torch.Tensor, importance: torch.Tensor | np.ndarray
                    ) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] rows (k a multiple of 32) + per-column importance [k] -> (ggml's imatrix-path bytes, values)."""
    nmax, nbytes, asym = LEGACY[kind]
    n, k = rows.shape
    if k % 32:
        raise UnsupportedError(f"{kind.upper()} needs rows that are whole blocks of 32; got rows of {k}")
    imp = _importance(importance, k, kind.upper())
    x_all = rows.detach().to(torch.float32).numpy()
    out = np.empty((n, k // 32, nbytes), np.uint8)
    vals = np.empty((n, k), np.float32)
    for r0, r1 in _chunks(n, k):
        x = np.ascontiguousarray(x_all[r0:r1])
        m = r1 - r0
        with np.errstate(all="ignore"):
            sigma2 = rowsum(x * x) / f32(k)
            xs = x.reshape(-1, 32)  # [m * k / 32, 32]: one block per row
            sig = np.repeat(sigma2, k // 32)[:, None]
            w = np.broadcast_to(imp.reshape(1, -1, 32), (m, k // 32, 32)).reshape(-1, 32) * np.sqrt(sig + xs * xs)
            if asym:
                scale, the_min, codes = make_qkx(xs, w, nmax, -0.9, 0.05, 36)
                mh = (-the_min).astype(np.float16)
            else:
                scale, codes = make_qx(xs, nmax, w)
        dh = scale.astype(np.float16)
        q = codes  # [nb, 32]
        blk = out[r0:r1].reshape(-1, nbytes)
        blk[:, 0:2] = dh.view(np.uint8).reshape(-1, 2)
        df = dh.astype(np.float32)[:, None]
        if asym:
            blk[:, 2:4] = mh.view(np.uint8).reshape(-1, 2)
            v = df * q.astype(np.float32) + mh.astype(np.float32)[:, None]
            body = 4
        else:
            v = df * (q.astype(np.float32) - f32(nmax))
            body = 2
        if nmax in (8, 15):
            blk[:, body:] = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
        else:
            qh, qs = _qh_qs(q)
            blk[:, body:body + 4], blk[:, body + 4:] = qh, qs
        vals[r0:r1] = v.reshape(m, k)
    return out.reshape(-1), torch.from_numpy(vals)


def nbytes(kind: str, shape: tuple[int, ...]) -> int:
    """GGUF bytes of a tensor of ``shape`` in ``kind`` (a KSPEC kind)."""
    sp = KSPEC[kind]
    return math.prod(shape) // sp.block * sp.nbytes
