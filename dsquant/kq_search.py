"""ggml's K-quant and legacy-quant search routines (ggml-quants.c), vectorised over many blocks at once.

Each routine is the C function of the same name run on every row of a ``[n, M]`` array at once: the ``n``
elements of one (sub-)block are a *column*, so ``M`` blocks are searched together and every per-element
step is one numpy operation over ``M`` lanes. The C code's float32 sums run in index order and its search
keeps a trial only when it is strictly better, so near-ties between trials are decided by the last bits of
those sums; here every sum is the same float32 additions in the same order (a loop of ``n`` vector adds,
``_seqsum``), every division one IEEE division, every ``sqrtf`` numpy's correctly rounded float32 sqrt
(torch's float32 ``sqrt`` is not: it is off by an ulp on some inputs, which flipped ~0.1 % of Q4_K blocks),
and ``nearest_int`` is ``np.rint`` (round half to even, what ggml's 1.5 * 2**23 trick does for |x| < 2**22).
The bytes therefore equal ``ggml_quantize_chunk``'s (tests/test_kquant_exact.py calls it through
llama-cpp-python's libggml-base and compares every block).

Routines (names and parameters as in ggml-quants.c):

* ``make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad)``: ``make_qkx2_quants`` and ``make_qkx3_quants`` (the
  same algorithm once weights are given): a scale and a non-positive offset by weighted least squares over
  ``nstep + 1`` trial scales, each trial starting from the best offset so far.
* ``make_qx(x, nmax, w)``: ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: a symmetric scale from the
  signed largest element and 18 other trial scales, the least-squares fit of the best.
* ``make_qp(x, nmax, w)``: ``make_qp_quants``: non-negative codes for non-negative values (the 6-bit scales
  and mins of Q4_K/Q5_K, the 4-bit ones of Q2_K with an imatrix), trial scales then coordinate descent.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32
EPS = f32(1e-15)  # ggml's GROUP_MAX_EPS


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sum of a [n, M] array over its first axis in index order (float32, as ggml's loops): [M]."""
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def seqsums(a: np.ndarray) -> np.ndarray:
    """``seqsum`` of several [n, M] arrays stacked as [k, n, M] -> [k, M], one vector add per element index
    for all k at once (the add count, not the data, is what costs at these sizes)."""
    s = a[:, 0].copy()
    for i in range(1, a.shape[1]):
        s += a[:, i]
    return s


def rowsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in index order, float32 (``add.accumulate`` is a running sum)."""
    return np.add.accumulate(a, axis=-1, dtype=np.float32)[..., -1].copy()


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, f32(1), d).astype(np.float32)


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` on x, w [n, M] float32.

    Returns (scale [M], the_min [M] (>= 0: the offset subtracted), codes uint8 [n, M] in 0..nmax)."""
    with np.errstate(all="ignore"):
        mn = np.minimum(x.min(0), f32(0))
        mx = x.max(0)
        flat = mx <= mn
        sum_w = seqsum(w)
        sum_x = seqsum(w * x)
        fmax = f32(nmax)

        def codes(iscale: np.ndarray, m: np.ndarray) -> np.ndarray:
            t = x - m
            t *= iscale
            np.rint(t, out=t)
            return np.clip(t, f32(0), fmax, out=t)

        def error(scale: np.ndarray, m: np.ndarray, lq: np.ndarray) -> np.ndarray:
            d = lq * scale
            d += m
            d -= x
            if use_mad:
                np.abs(d, out=d)
            else:
                d *= d
            d *= w
            return seqsum(d)

        stack = np.empty((3, *x.shape), np.float32)  # w*l, w*l*x, w*l*l of a trial
        iscale = fmax / _safe(mx - mn)
        scale = f32(1) / iscale
        best_l = codes(iscale, mn)
        best = error(scale, mn, best_l)
        for step in range(nstep + 1):
            num = f32(f32(f32(rmin) + f32(rdelta) * f32(step)) + fmax)
            iscale = num / _safe(mx - mn)
            la = codes(iscale, mn)
            np.multiply(w, la, out=stack[0])
            np.multiply(stack[0], x, out=stack[1])
            np.multiply(stack[0], la, out=stack[2])
            sum_l, sum_xl, sum_l2 = seqsums(stack)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = (det > 0) & ~flat
            sdet = np.where(ok, det, f32(1))
            ts = (sum_w * sum_xl - sum_x * sum_l) / sdet
            tm = (sum_l2 * sum_x - sum_l * sum_xl) / sdet
            pos = tm > 0
            ts = np.where(pos, sum_xl / np.where(sum_l2 != 0, sum_l2, f32(1)), ts).astype(np.float32)
            tm = np.where(pos, f32(0), tm).astype(np.float32)
            err = error(ts, tm, la)
            better = ok & (err < best)
            if better.any():
                best_l = np.where(better, la, best_l)
                best = np.where(better, err, best)
                scale = np.where(better, ts, scale)
                mn = np.where(better, tm, mn)
        scale = np.where(flat, f32(0), scale).astype(np.float32)
        best_l = np.where(flat, f32(0), best_l)
    return scale, (-mn).astype(np.float32), best_l.astype(np.uint8)


def signed_max(x: np.ndarray) -> np.ndarray:
    """The element of largest magnitude of each column of x [n, M], sign kept, first on ties (ggml's scan)."""
    i = np.abs(x).argmax(0)
    return np.take_along_axis(x, i[None], 0)[0]


def make_qx(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on x [n, M]; ``w`` None means x^2.

    Returns (scale [M], codes uint8 [n, M] in 0..2*nmax-1 (L + nmax))."""
    with np.errstate(all="ignore"):
        mx = signed_max(x)
        zero = np.abs(mx) < EPS
        smx = np.where(zero, f32(1), mx).astype(np.float32)
        if w is None:
            w = x * x
        wx = w * x

        stack = np.empty((2, *x.shape), np.float32)

        def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            lq = x * iscale
            np.rint(lq, out=lq)
            np.clip(lq, f32(-nmax), f32(nmax - 1), out=lq)
            np.multiply(wx, lq, out=stack[0])
            np.multiply(w, lq, out=stack[1])
            stack[1] *= lq
            sumlx, suml2 = seqsums(stack)
            return lq, sumlx, suml2

        lq, sumlx, suml2 = trial(f32(-nmax) / smx)
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0)).astype(np.float32)
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            num = f32(-f32(f32(nmax) + f32(f32(0.1) * f32(i))))
            lq_i, slx, sl2 = trial(num / smx)
            take = (sl2 > 0) & (slx * slx > best * sl2)
            if take.any():
                lq = np.where(take, lq_i, lq)
                scale = np.where(take, slx / np.where(sl2 > 0, sl2, f32(1)), scale).astype(np.float32)
                best = np.where(take, scale * slx, best).astype(np.float32)
        scale = np.where(zero, f32(0), scale).astype(np.float32)
        codes = np.where(zero, f32(0), lq + f32(nmax))
    return scale, codes.astype(np.uint8)


def make_qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qp_quants(n, nmax, x, L, quant_weights)`` on x, w [n, M].

    Returns (scale [M], codes uint8 [n, M]: the C code's ``uint8_t L``, so a (pathological) negative code
    wraps as it does there)."""
    with np.errstate(all="ignore"):
        mx = np.maximum(x.max(0), f32(0))
        zero = mx < EPS
        smx = np.where(zero, f32(1), mx).astype(np.float32)
        fmax = f32(nmax)

        def mse(scale: np.ndarray, lq: np.ndarray) -> np.ndarray:
            diff = x - lq * scale
            t = w * diff
            t *= diff
            return seqsum(t)

        iscale = fmax / smx
        best = mse(f32(1) / iscale, np.rint(x * iscale))
        for i in range(-4, 5):
            if i == 0:
                continue
            isc = f32(f32(f32(0.1) * f32(i)) + fmax) / smx
            err = mse(f32(1) / isc, np.minimum(np.rint(x * isc), fmax))
            better = err < best
            best = np.where(better, err, best)
            iscale = np.where(better, isc, iscale).astype(np.float32)
        lq = np.minimum(np.rint(x * iscale), fmax)
        wx = w * x
        sumlx = seqsum(wx * lq)
        suml2 = seqsum(w * lq * lq)
        stored = (lq.astype(np.int64) & 255).astype(np.float32)  # the uint8_t L[i] the descent reads back
        for _ in range(5):
            for i in range(x.shape[0]):
                li = stored[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                live = (slx > 0) & (sl2 > 0)
                new = np.minimum(np.rint((x[i] * sl2) / np.where(live, slx, f32(1))), fmax)
                slx2 = slx + wx[i] * new
                sl22 = sl2 + (w[i] * new) * new
                take = live & (new != li) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                if take.any():
                    stored[i] = np.where(take, (new.astype(np.int64) & 255).astype(np.float32), li)
                    sumlx = np.where(take, slx2, sumlx).astype(np.float32)
                    suml2 = np.where(take, sl22, suml2).astype(np.float32)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0)).astype(np.float32)
        scale = np.where(zero, f32(0), scale).astype(np.float32)
        stored = np.where(zero, f32(0), stored)
    return scale, stored.astype(np.uint8)


def make_q3(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on x [n, M] -> (scale [M], codes 0..2nmax-1)."""
    with np.errstate(all="ignore"):
        mx = signed_max(x)
        zero = np.abs(mx) < EPS
        iscale = f32(-nmax) / np.where(zero, f32(1), mx).astype(np.float32)
        lq = np.clip(np.rint(x * iscale), f32(-nmax), f32(nmax - 1))
        w = x * x
        wx = w * x
        sumlx = seqsum(wx * lq)
        suml2 = seqsum(w * lq * lq)
        for _ in range(5):
            for i in range(x.shape[0]):
                li = lq[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                pos = slx > 0
                new = np.clip(np.rint((x[i] * sl2) / np.where(pos, slx, f32(1))), f32(-nmax), f32(nmax - 1))
                slx2 = slx + wx[i] * new
                sl22 = sl2 + (w[i] * new) * new
                take = pos & (new != li) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                if take.any():
                    lq[i] = np.where(take, new, li)
                    sumlx = np.where(take, slx2, sumlx).astype(np.float32)
                    suml2 = np.where(take, sl22, suml2).astype(np.float32)
        scale = np.where(zero | (suml2 <= 0), f32(0), sumlx / np.where(suml2 > 0, suml2, f32(1))).astype(np.float32)
        codes = np.where(zero, f32(0), lq + f32(nmax))
    return scale, codes.astype(np.uint8)
