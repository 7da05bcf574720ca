"""ggml's K-quant and legacy-quant search routines (ggml-quants.c), compiled with numba.

Each routine is the C function of the same name run on every row of a ``[M, n]`` float32 array: one row is
one (sub-)block of ``n`` elements, the loop over rows is a plain loop, and the body follows the C code line
for line in float32: the same additions in the same order, one IEEE division where C divides, ``nearest_int``
with C's bit trick (``_nearest_int``), codes stored through ``uint8_t``/``int8_t`` where C stores them (so
a wrapped code is read back wrapped, as C reads it). numba compiles without ``fastmath``, so LLVM neither
reassociates the sums nor fuses a multiply and an add into an FMA (ggml's reference is built without
contraction too): near-ties between trial scales are decided by the same last bits as in C, and the bytes
equal ``ggml_quantize_chunk``'s (tests/test_kquant_exact.py calls it through llama-cpp-python's libggml-base
and compares every block).

Why compiled loops: these searches try 9-37 scales per block of 16 or 32 weights, each trial a sum over the
block, and keep a trial only when it is strictly better. numpy can vectorise them only across blocks, with
one array operation per element index and trial (~400 operations per chunk), which measured 60-190 ns per
weight; the compiled loops do the same arithmetic at a few ns per weight. The kernels release the GIL
(``nogil``), so the GGUF writer's chunk threads run them on every core.

Routines (names and parameters as in ggml-quants.c; ``x`` and ``w`` are ``[M, n]`` float32, C-contiguous):

* ``make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad)``: ``make_qkx2_quants`` / ``make_qkx3_quants`` (the
  same algorithm once weights are given): a scale and a non-positive offset by weighted least squares over
  ``nstep + 1`` trial scales, each trial starting from the best offset so far.
* ``make_qx(x, nmax, w)``: ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: a symmetric scale from the
  signed largest element and 18 other trial scales, the least-squares fit of the best.
* ``make_qp(x, nmax, w)``: ``make_qp_quants``: non-negative codes for non-negative values (the 6-bit scales
  and mins of Q4_K/Q5_K, the 4-bit ones of Q2_K with an imatrix), trial scales then coordinate descent.
* ``make_q3(x, nmax)``: ``make_q3_quants(n, nmax, x, L, do_rmse=true)``.

numba caches the compiled kernels on disk (``cache=True``): in ``__pycache__`` beside this file when its
folder is writable, else (an installed, read-only package) in ``~/.cache/numba``; ``NUMBA_CACHE_DIR``
overrides both. Only the first run for a user compiles them: measured 9.7 s for the first K-quant call
from a read-only copy with an empty cache, 0.9 s (imports and cache loads) on every later run.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

f32 = np.float32
EPS = f32(1e-15)  # ggml's GROUP_MAX_EPS

# error_model="numpy": a float division by zero gives inf/nan as in C, instead of raising
_jit = njit(cache=True, nogil=True, error_model="numpy")


_MAGIC = f32(12582912.0)  # 1.5 * 2**23: float32 rounding of v + _MAGIC is round-half-even of v to an integer
_LIMIT = f32(4194303.0)  # nearest_int's range of exactness (C asserts it)


@_jit
def _tile(n):
    """Blocks per tile: ~16 KB per float32 [n, G] array, so a tile's arrays stay in L1/L2."""
    return max(16, 4096 // n)


@_jit
def _load(a, g0, gb, t):
    """t[i, b] = a[g0 + b, i] for the tile's gb blocks, zeros in the unused lanes."""
    n, g = t.shape
    for b in range(gb):
        ar = a[g0 + b]
        for i in range(n):
            t[i, b] = ar[i]
    for i in range(n):
        for b in range(gb, g):
            t[i, b] = 0.0


@_jit
def _nearest_int(fval: float) -> int:
    """ggml's ``nearest_int``: the low 23 bits of ``fval + 1.5 * 2**23`` minus 2**22 (round half to even for
    |fval| <= 4194303; beyond it the same wrapped bits C computes)."""
    if abs(fval) <= f32(4194303.0):
        return int(np.rint(fval))
    val = np.float32(fval + np.float32(12582912.0))
    if math.isnan(val):
        return 0  # a quiet NaN's mantissa field is 0x400000
    a = abs(np.float64(val))
    if math.isinf(a):
        return -0x400000
    # |val| >= 2**22 here, a normal float32: a = m * 2**e with 0.5 <= m < 1, mantissa field m * 2**24 - 2**23
    m, _ = math.frexp(a)
    return int(m * 16777216.0) - 0x800000 - 0x400000


@_jit
def _qkx_rows(x, w, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, codes):
    n = x.shape[1]
    fmax = np.float32(nmax)
    laux = np.empty(n, np.uint8)
    for r in range(x.shape[0]):
        xr = x[r]
        wr = w[r]
        lr = codes[r]
        mn = xr[0]
        mx = xr[0]
        sum_w = wr[0]
        sum_x = sum_w * xr[0]
        for i in range(1, n):
            if xr[i] < mn:
                mn = xr[i]
            if xr[i] > mx:
                mx = xr[i]
            sum_w += wr[i]
            sum_x += wr[i] * xr[i]
        if mn > 0:
            mn = np.float32(0.0)
        if mx <= mn:
            lr[:] = 0
            scale[r] = 0.0
            the_min[r] = -mn
            continue
        iscale = fmax / (mx - mn)
        sc = np.float32(1.0) / iscale
        best = np.float32(0.0)
        for i in range(n):
            q = min(max(_nearest_int(iscale * (xr[i] - mn)), 0), nmax)
            lr[i] = q
            diff = sc * np.float32(q) + mn - xr[i]
            diff = abs(diff) if use_mad else diff * diff
            best += wr[i] * diff
        for step in range(nstep + 1):
            iscale = (rmin + rdelta * np.float32(step) + fmax) / (mx - mn)
            sum_l = np.float32(0.0)
            sum_l2 = np.float32(0.0)
            sum_xl = np.float32(0.0)
            for i in range(n):
                q = min(max(_nearest_int(iscale * (xr[i] - mn)), 0), nmax)
                laux[i] = q
                fq = np.float32(q)
                wl = wr[i] * fq
                sum_l += wl
                sum_l2 += wl * fq
                sum_xl += wl * xr[i]
            det = sum_w * sum_l2 - sum_l * sum_l
            if det > 0:
                ts = (sum_w * sum_xl - sum_x * sum_l) / det
                tm = (sum_l2 * sum_x - sum_l * sum_xl) / det
                if tm > 0:
                    tm = np.float32(0.0)
                    ts = sum_xl / sum_l2
                err = np.float32(0.0)
                for i in range(n):
                    diff = ts * np.float32(laux[i]) + tm - xr[i]
                    diff = abs(diff) if use_mad else diff * diff
                    err += wr[i] * diff
                if err < best:
                    lr[:] = laux
                    best = err
                    sc = ts
                    mn = tm
        scale[r] = sc
        the_min[r] = -mn


@_jit
def _qkx_tiles(x, w, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, codes, redo):
    """make_qkx2/3_quants over tiles of G blocks, the blocks as SIMD lanes (see ``_qx_tiles``).

    Rounding is ``(v + 1.5 * 2**23) - 1.5 * 2**23``, C's ``nearest_int`` for |v| <= 4194303. A block where some
    |v| exceeds that (or is NaN: a trial offset can land next to the block's max) is flagged in ``redo`` and
    recomputed by the line-for-line kernel ``_qkx_rows``, so the result is C's in every case. The codes of
    the trial C keeps are recomputed once at the end from its iscale and the offset it started from."""
    m, n = x.shape
    g = _tile(n)
    fmax = np.float32(nmax)
    zero = np.float32(0.0)
    xt = np.zeros((n, g), np.float32)
    wt = np.zeros((n, g), np.float32)
    lt = np.zeros((n, g), np.float32)
    mn = np.zeros(g, np.float32)
    mx = np.zeros(g, np.float32)
    sw = np.zeros(g, np.float32)
    sx = np.zeros(g, np.float32)
    isc = np.zeros(g, np.float32)
    sc = np.zeros(g, np.float32)
    best = np.zeros(g, np.float32)
    bisc = np.zeros(g, np.float32)
    bmn = np.zeros(g, np.float32)
    big = np.zeros(g, np.float32)
    sl = np.zeros(g, np.float32)
    sl2 = np.zeros(g, np.float32)
    sxl = np.zeros(g, np.float32)
    ts = np.zeros(g, np.float32)
    tm = np.zeros(g, np.float32)
    err = np.zeros(g, np.float32)
    flat = np.zeros(g, np.bool_)
    for g0 in range(0, m, g):
        gb = min(g, m - g0)
        _load(x, g0, gb, xt)
        _load(w, g0, gb, wt)
        x0, w0 = xt[0], wt[0]
        for b in range(g):
            mn[b] = x0[b]
            mx[b] = x0[b]
            sw[b] = w0[b]
            sx[b] = w0[b] * x0[b]
        for i in range(1, n):
            xr, wr = xt[i], wt[i]
            for b in range(g):
                v = xr[b]
                mn[b] = v if v < mn[b] else mn[b]
                mx[b] = v if v > mx[b] else mx[b]
                sw[b] += wr[b]
                sx[b] += wr[b] * v
        for b in range(g):
            if mn[b] > 0:
                mn[b] = zero
            flat[b] = not mx[b] > mn[b]  # C: max <= min (qkx3) / max == min (qkx2): the same once min <= 0
            d = np.float32(1.0) if flat[b] else mx[b] - mn[b]  # flat blocks: results replaced below
            isc[b] = fmax / d
            sc[b] = np.float32(1.0) / isc[b]
            bisc[b] = isc[b]
            bmn[b] = mn[b]
            best[b] = zero
            big[b] = zero
        for i in range(n):
            xr, wr = xt[i], wt[i]
            for b in range(g):
                v = isc[b] * (xr[b] - mn[b])
                big[b] = big[b] if abs(v) <= _LIMIT else np.float32(1.0)
                q = max(zero, min(fmax, (v + _MAGIC) - _MAGIC))
                diff = sc[b] * q + mn[b] - xr[b]
                diff = abs(diff) if use_mad else diff * diff
                best[b] += wr[b] * diff
        for step in range(nstep + 1):
            num = rmin + rdelta * np.float32(step) + fmax
            for b in range(g):
                isc[b] = num / (mx[b] - mn[b])  # inf if a kept offset reached max: v is then flagged
                sl[b] = zero
                sl2[b] = zero
                sxl[b] = zero
            for i in range(n):
                xr, wr, lr = xt[i], wt[i], lt[i]
                for b in range(g):
                    v = isc[b] * (xr[b] - mn[b])
                    big[b] = big[b] if abs(v) <= _LIMIT else np.float32(1.0)
                    q = max(zero, min(fmax, (v + _MAGIC) - _MAGIC))
                    lr[b] = q
                    wl = wr[b] * q
                    sl[b] += wl
                    sl2[b] += wl * q
                    sxl[b] += wl * xr[b]
            for b in range(g):
                det = sw[b] * sl2[b] - sl[b] * sl[b]
                err[b] = zero
                if det > 0:
                    t_s = (sw[b] * sxl[b] - sx[b] * sl[b]) / det
                    t_m = (sl2[b] * sx[b] - sl[b] * sxl[b]) / det
                    if t_m > 0:
                        t_m = zero
                        t_s = sxl[b] / sl2[b]
                    ts[b] = t_s
                    tm[b] = t_m
                else:
                    ts[b] = zero
                    tm[b] = zero
            for i in range(n):
                xr, wr, lr = xt[i], wt[i], lt[i]
                for b in range(g):
                    diff = ts[b] * lr[b] + tm[b] - xr[b]
                    diff = abs(diff) if use_mad else diff * diff
                    err[b] += wr[b] * diff
            for b in range(g):
                det = sw[b] * sl2[b] - sl[b] * sl[b]
                if det > 0 and err[b] < best[b] and not flat[b]:
                    best[b] = err[b]
                    sc[b] = ts[b]
                    bisc[b] = isc[b]
                    bmn[b] = mn[b]
                    mn[b] = tm[b]
        for i in range(n):
            xr, lr = xt[i], lt[i]
            for b in range(g):
                lr[b] = max(zero, min(fmax, (bisc[b] * (xr[b] - bmn[b]) + _MAGIC) - _MAGIC))
        for b in range(gb):
            cr = codes[g0 + b]
            the_min[g0 + b] = -mn[b]
            if flat[b]:
                scale[g0 + b] = zero
                cr[:] = 0
                continue
            redo[g0 + b] = big[b] != 0
            scale[g0 + b] = sc[b]
            for i in range(n):
                cr[i] = np.uint8(lt[i, b])


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` on every row of x, w [M, n] float32.

    Returns (scale [M], the_min [M] (>= 0: the offset subtracted), codes uint8 [M, n] in 0..nmax)."""
    x, w = _c32(x), _c32(w)
    m = x.shape[0]
    scale, the_min = np.empty(m, np.float32), np.empty(m, np.float32)
    codes = np.empty(x.shape, np.uint8)
    if m:
        redo = np.zeros(m, np.bool_)
        _qkx_tiles(x, w, nmax, f32(rmin), f32(rdelta), nstep, use_mad, scale, the_min, codes, redo)
        if redo.any():  # a rounding beyond nearest_int's exact range: those blocks line for line as C
            idx = np.flatnonzero(redo)
            s, mn, c = scale[idx], the_min[idx], codes[idx]
            _qkx_rows(x[idx], w[idx], nmax, f32(rmin), f32(rdelta), nstep, use_mad, s, mn, c)
            scale[idx], the_min[idx], codes[idx] = s, mn, c
    return scale, the_min, codes


@_jit
def _qx_tiles(x, nmax, w, use_w, scale, codes):
    """make_qx_quants over tiles of G blocks, the blocks as SIMD lanes (see ``_tile``).

    ``nearest_int(v)`` is computed as ``(v + 1.5 * 2**23) - 1.5 * 2**23`` in float32, which equals C's bit
    trick for |v| <= 4194303; here |v| = |iscale * x| <= (nmax + 0.9) * |x| / |max| <= nmax + 0.9 always."""
    m, n = x.shape
    g = _tile(n)
    fmax = np.float32(nmax)
    lo, hi = -fmax, fmax - np.float32(1.0)
    xt = np.zeros((n, g), np.float32)
    wt = np.zeros((n, g), np.float32)
    wxt = np.zeros((n, g), np.float32)
    bl = np.zeros((n, g), np.float32)
    mx = np.zeros(g, np.float32)
    amax = np.zeros(g, np.float32)
    isc = np.zeros(g, np.float32)
    slx = np.zeros(g, np.float32)
    sl2 = np.zeros(g, np.float32)
    sc = np.zeros(g, np.float32)
    best = np.zeros(g, np.float32)
    bisc = np.zeros(g, np.float32)
    for g0 in range(0, m, g):
        gb = min(g, m - g0)
        _load(x, g0, gb, xt)
        if use_w:
            _load(w, g0, gb, wt)
        for i in range(n):
            xr, wr, wxr = xt[i], wt[i], wxt[i]
            for b in range(g):
                if not use_w:
                    wr[b] = xr[b] * xr[b]
                wxr[b] = wr[b] * xr[b]
        amax[:] = 0.0
        mx[:] = 0.0
        for i in range(n):
            xr = xt[i]
            for b in range(g):
                ax = abs(xr[b])
                gt = ax > amax[b]
                amax[b] = ax if gt else amax[b]
                mx[b] = xr[b] if gt else mx[b]
        for b in range(g):
            if amax[b] < EPS:
                mx[b] = 1.0  # an all-zero block: its results are replaced below
        for step in range(-10, 10):  # -10: the first trial, -nmax / max; then C's is = -9..9 but 0
            if step == 0:
                continue
            for b in range(g):
                num = fmax if step == -10 else fmax + np.float32(0.1) * np.float32(step)
                isc[b] = -num / mx[b]
            slx[:] = 0.0
            sl2[:] = 0.0
            for i in range(n):
                xr, wr, wxr = xt[i], wt[i], wxt[i]
                for b in range(g):
                    q = (isc[b] * xr[b] + _MAGIC) - _MAGIC
                    q = max(lo, min(hi, q))
                    slx[b] += wxr[b] * q
                    sl2[b] += wr[b] * q * q
            for b in range(g):
                if step == -10:
                    sc[b] = slx[b] / sl2[b] if sl2[b] != 0 else np.float32(0.0)
                    best[b] = sc[b] * slx[b]
                    bisc[b] = isc[b]
                elif sl2[b] > 0 and slx[b] * slx[b] > best[b] * sl2[b]:
                    sc[b] = slx[b] / sl2[b]
                    best[b] = sc[b] * slx[b]
                    bisc[b] = isc[b]
        # C re-rounds L with the iscale of each trial it keeps: the last kept one's codes, computed once
        for i in range(n):
            xr, br = xt[i], bl[i]
            for b in range(g):
                q = (bisc[b] * xr[b] + _MAGIC) - _MAGIC
                br[b] = max(lo, min(hi, q)) + fmax
        for b in range(gb):
            live = amax[b] >= EPS
            scale[g0 + b] = sc[b] if live else np.float32(0.0)
            cr = codes[g0 + b]
            for i in range(n):
                cr[i] = np.uint8(bl[i, b]) if live else np.uint8(0)


def make_qx(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on every row of x [M, n]; ``w`` None means x^2.

    Returns (scale [M], codes uint8 [M, n] in 0..2*nmax-1 (L + nmax))."""
    x = _c32(x)
    scale, codes = np.empty(x.shape[0], np.float32), np.empty(x.shape, np.uint8)
    if x.shape[0]:
        _qx_tiles(x, nmax, x if w is None else _c32(w), w is not None, scale, codes)
    return scale, codes


@_jit
def _qp_rows(x, nmax, w, scale, codes):
    n = x.shape[1]
    fmax = np.float32(nmax)
    for r in range(x.shape[0]):
        xr = x[r]
        wr = w[r]
        lr = codes[r]
        mx = np.float32(0.0)
        for i in range(n):
            mx = max(mx, xr[i])
        if mx < EPS:
            lr[:] = 0
            scale[r] = 0.0
            continue
        iscale = fmax / mx
        for i in range(n):
            lr[i] = _nearest_int(iscale * xr[i]) & 255  # uint8_t L[i]
        sc = np.float32(1.0) / iscale
        best = np.float32(0.0)
        for i in range(n):
            diff = xr[i] - sc * np.float32(lr[i])
            best += wr[i] * diff * diff
        for step in range(-4, 5):
            if step == 0:
                continue
            isc = (np.float32(0.1) * np.float32(step) + fmax) / mx
            sc_is = np.float32(1.0) / isc
            mse = np.float32(0.0)
            for i in range(n):
                q = min(nmax, _nearest_int(isc * xr[i]))
                diff = xr[i] - sc_is * np.float32(q)
                mse += wr[i] * diff * diff
            if mse < best:
                best = mse
                iscale = isc
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            q = min(nmax, _nearest_int(iscale * xr[i]))
            lr[i] = q & 255
            fq = np.float32(q)
            sumlx += wr[i] * xr[i] * fq
            suml2 += wr[i] * fq * fq
        for _ in range(5):
            changed = 0
            for i in range(n):
                li = np.float32(lr[i])
                slx = sumlx - wr[i] * xr[i] * li
                sl2 = suml2 - wr[i] * li * li
                if slx > 0 and sl2 > 0:
                    new = min(nmax, _nearest_int(xr[i] * sl2 / slx))
                    if new != lr[i]:
                        fq = np.float32(new)
                        slx += wr[i] * xr[i] * fq
                        sl2 += wr[i] * fq * fq
                        if slx * slx * suml2 > sumlx * sumlx * sl2:
                            lr[i] = new & 255
                            sumlx = slx
                            suml2 = sl2
                            changed += 1
            if not changed:
                break
        scale[r] = sumlx / suml2


def make_qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants(n, nmax, x, L, quant_weights)`` on every row of x, w [M, n].

    Returns (scale [M] (``sumlx / suml2`` as C returns it), codes uint8 [M, n]: C's ``uint8_t L``, so a
    (pathological) negative code wraps as it does there)."""
    x, w = _c32(x), _c32(w)
    scale, codes = np.empty(x.shape[0], np.float32), np.empty(x.shape, np.uint8)
    if x.shape[0]:
        _qp_rows(x, nmax, w, scale, codes)
    return scale, codes


@_jit
def _q3_rows(x, nmax, scale, codes):
    n = x.shape[1]
    fmax = np.float32(nmax)
    lq = np.empty(n, np.int64)
    for r in range(x.shape[0]):
        xr = x[r]
        lr = codes[r]
        mx = np.float32(0.0)
        amax = np.float32(0.0)
        for i in range(n):
            ax = abs(xr[i])
            if ax > amax:
                amax = ax
                mx = xr[i]
        if amax < EPS:
            lr[:] = 0
            scale[r] = 0.0
            continue
        iscale = -fmax / mx
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            q = max(-nmax, min(nmax - 1, _nearest_int(iscale * xr[i])))
            lq[i] = q
            wi = xr[i] * xr[i]
            fq = np.float32(q)
            sumlx += wi * xr[i] * fq
            suml2 += wi * fq * fq
        for _ in range(5):
            changed = 0
            for i in range(n):
                wi = xr[i] * xr[i]
                li = np.float32(lq[i])
                slx = sumlx - wi * xr[i] * li
                if slx > 0:
                    sl2 = suml2 - wi * li * li
                    new = max(-nmax, min(nmax - 1, _nearest_int(xr[i] * sl2 / slx)))
                    if new != lq[i]:
                        fq = np.float32(new)
                        slx += wi * xr[i] * fq
                        sl2 += wi * fq * fq
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            lq[i] = new
                            sumlx = slx
                            suml2 = sl2
                            changed += 1
            if not changed:
                break
        for i in range(n):
            lr[i] = lq[i] + nmax
        scale[r] = sumlx / suml2 if suml2 > 0 else np.float32(0.0)


def make_q3(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every row of x [M, n] -> (scale [M], codes
    uint8 [M, n] in 0..2nmax-1)."""
    x = _c32(x)
    scale, codes = np.empty(x.shape[0], np.float32), np.empty(x.shape, np.uint8)
    if x.shape[0]:
        _q3_rows(x, nmax, scale, codes)
    return scale, codes


@_jit
def _rowsum(a, out):
    for r in range(a.shape[0]):
        s = a[r, 0]
        for i in range(1, a.shape[1]):
            s += a[r, i]
        out[r] = s


def rowsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis of a float32 array in index order (ggml's float32 loops): a.shape[:-1]."""
    lead = a.shape[:-1]
    a = _c32(a.reshape(-1, a.shape[-1]))
    out = np.zeros(a.shape[0], np.float32)
    if a.shape[0] and a.shape[1]:
        _rowsum(a, out)
    return out.reshape(lead)


def nearest_int(a: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` on a float32 array, bit for bit (also beyond 4194303, inf and NaN): int32."""
    with np.errstate(all="ignore"):
        t = np.asarray(a, np.float32) + _MAGIC
    return (t.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def signed_max(x: np.ndarray) -> np.ndarray:
    """The element of largest magnitude of each row of x [M, n], sign kept, first on ties: ggml's scan
    (``if (fabsf(v) > amax)`` from amax 0, so NaN never wins and an all-NaN/zero row gives 0)."""
    a = np.nan_to_num(np.abs(x), nan=-1.0)
    i = a.argmax(1)
    out = np.take_along_axis(x, i[:, None], 1)[:, 0]
    return np.where(np.take_along_axis(a, i[:, None], 1)[:, 0] > 0, out, f32(0)).astype(np.float32)


def _c32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


@_jit
def _requant_rows(x, step, off, codes, lo, hi, zp, out):
    for r in range(x.shape[0]):
        s = step[r]
        xr, cr, orow = x[r], codes[r], out[r]
        if s == 0:  # ggml's `if (!d) continue;`: the search's codes stay
            orow[:] = cr
            continue
        o = off[r]
        for i in range(x.shape[1]):
            orow[i] = max(lo, min(hi, _nearest_int((xr[i] + o) / s))) + zp


def requant_rows(x: np.ndarray, step: np.ndarray, off: np.ndarray, codes: np.ndarray, lo: int, hi: int, zp: int
                 ) -> np.ndarray:
    """ggml's last loop of every K-quant: codes uint8 [M, n] = clamp(nearest_int((x + off) / step), lo, hi) + zp
    per sub-block row of x [M, n] (step, off float32 [M]); rows whose step is 0 keep ``codes``."""
    out = np.empty(x.shape, np.uint8)
    if x.size:
        _requant_rows(_c32(x), _c32(step), _c32(off), np.ascontiguousarray(codes, dtype=np.uint8), lo, hi, zp, out)
    return out
