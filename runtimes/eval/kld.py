"""KL divergence from a compact reference: its most likely tokens per position plus one merged tail.

The reference keeps per position its most likely tokens (see ``runtimes.eval.evaluate``); KL(reference ||
candidate) is computed with those tokens exactly and the rest merged into one
"tail" outcome on both sides. Merging outcomes never increases a KL divergence (log-sum inequality),
so the reported value is a lower bound, equal to the true KLD when the kept tokens hold all the mass;
the error is ``p_tail * KL(reference tail || candidate tail)``, with ``p_tail <= 1 - coverage`` for
rows that are not capped. Measured on SmolLM2-135M (bf16 reference vs its Q4_1 GGUF, 256 tokens
of Austen, exact KLD from full logits): a fixed top-64 underestimates the mean KLD by 13 %, top-256
by 5.5 %, coverage 0.99 by 1.7 % (mean 860 tokens kept), coverage 0.995 by 0.9 %.
A worst-case upper bound is also computed (``kld_upper``, JSON only: the largest tail term any
reference distribution agreeing with the stored values could have: mass ``p_min`` (the smallest kept
probability) on the tail tokens the candidate finds least likely, by convexity and the rearrangement
inequality); it is rigorous but loose, typically tens of times the lower bound.
"""

from __future__ import annotations

import numpy as np

MIN_K = 32  # tokens kept per position at least, whatever the coverage


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def kld_bounds(ref_idx: np.ndarray, ref_logp: np.ndarray, logq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row lower and upper bounds of KL(P || Q) from P's kept tokens and Q's full log-probs.

    ``ref_idx``/``ref_logp``: [R, K], most likely first, ``-inf`` log-probs past a row's kept count;
    ``logq``: [R, V] float64. See the module docstring for why these are bounds.
    """
    rows = np.arange(ref_idx.shape[0])[:, None]
    kept = np.isfinite(ref_logp)
    p = np.where(kept, np.exp(ref_logp), 0.0)
    logq_k = logq[rows, ref_idx]
    top = np.where(kept, p * (np.where(kept, ref_logp, 0.0) - logq_k), 0.0).sum(axis=1)
    p_tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.where(kept, np.exp(logq_k), 0.0).sum(axis=1), 1e-300, 1.0)
    has_tail = p_tail > 1e-12
    safe_pt = np.where(has_tail, p_tail, 1.0)
    lower = top + np.where(has_tail, p_tail * (np.log(safe_pt) - np.log(q_tail)), 0.0)

    # Upper bound: mass p_min on the m tail tokens Q likes least, the remainder r on the next one.
    n_kept = kept.sum(axis=1)
    p_min = p[rows[:, 0], n_kept - 1]
    tail_logq = logq.copy()
    tail_logq[rows, ref_idx] = np.inf  # kept tokens are not in the tail (padding repeats a kept index)
    n_tail = logq.shape[1] - n_kept
    m = np.where(has_tail, np.floor(p_tail / p_min), 0).astype(np.int64)
    m = np.clip(m, 0, np.maximum(n_tail - 1, 0))
    r = np.where(has_tail, p_tail - m * p_min, 0.0)
    kth = int(min(m.max() + 1, logq.shape[1] - 1))
    part = np.partition(tail_logq, kth, axis=1)[:, : kth + 1]
    part.sort(axis=1)
    csum = np.concatenate([np.zeros((part.shape[0], 1)), np.cumsum(part, axis=1)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tail_hi = (m * p_min * np.log(p_min) - p_min * csum[rows[:, 0], m]
                   + np.where(r > 1e-15, r * (np.log(np.maximum(r, 1e-300)) - part[rows[:, 0], m]), 0.0))
    upper = top + np.where(has_tail, np.nan_to_num(tail_hi, posinf=np.inf), 0.0)
    lower = np.maximum(lower, 0.0)
    return lower, np.maximum(upper, lower)


def keep_most_likely(logits: np.ndarray, coverage: float, k_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row the most likely tokens covering ``coverage`` of the mass (MIN_K..k_max of them), padded to the
    widest row: (indices [R, K] int32, logits [R, K] float32 with -inf padding, counts [R] int32)."""
    k_max = min(k_max, logits.shape[1])
    top = np.argpartition(-logits, k_max - 1, axis=1)[:, :k_max]
    order = np.argsort(-np.take_along_axis(logits, top, 1), axis=1)
    top = np.take_along_axis(top, order, 1)
    tl = np.take_along_axis(logits, top, 1)
    m = logits.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    cum = np.cumsum(np.exp(tl - lse), axis=1)
    n = np.clip((cum < coverage).sum(axis=1) + 1, min(MIN_K, k_max), k_max)
    width = int(n.max())
    top, tl = top[:, :width], tl[:, :width].copy()
    pad = np.arange(width)[None, :] >= n[:, None]
    tl[pad] = -np.inf
    top = np.where(pad, top[:, :1], top)
    return top.astype(np.int32), tl.astype(np.float32), n.astype(np.int32)


def kld_histogram(kld: np.ndarray, bins: int = 40) -> dict:
    """Counts over log-spaced bins from 1e-6 to 10 (values below go in the first bin)."""
    edges = np.logspace(-6, 1, bins + 1)
    counts, _ = np.histogram(np.clip(kld, edges[0], edges[-1]), edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
