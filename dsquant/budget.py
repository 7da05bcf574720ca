"""Size-budget search: per-tensor quantization types that minimise the predicted KL divergence of the model's
output under a byte budget (``--target-size`` / ``--target-bpw``). Format-agnostic; the GGUF side (candidate
types, their bytes and errors, the file's fixed bytes) is export/gguf_budget.py.

Sensitivity (``fisher_rows``). For a small change ``δ`` of the weights, the KL divergence of the model's
next-token distribution from the original's is, to second order, ``½ δᵀ F δ`` with F the Fisher information
of that distribution (the KL's Hessian at δ = 0). Summed over the positions of a sequence, F is the
expectation, over tokens *sampled from the model itself*, of the outer product of the sequence's gradient of
``log p`` (teacher forcing on the calibration text; the per-position score terms are uncorrelated, so the
sequence gradient's square is the sum of the positions' Fisher matrices). dsq keeps its diagonal, per
weight, and only for a seeded sample of each tensor's rows (the rows are exchangeable for this purpose), so
the cost is one forward and ``draws`` backward passes over the calibration tokens, with no weight gradients
computed: the per-sequence gradient of a linear's sampled rows is formed in a hook from the layer's input and
the gradient at its output. The predicted KL of quantizing tensor t to type c is then
``½ · (rows / sampled rows) · Σ F_ij (ŵ_ij − w_ij)² / positions`` (nats per token), and a file's prediction
is the sum over tensors: cross terms between tensors' rounding errors are dropped (they average out), as
in HAWQ-V2/V3's and "Fisher-based mixed precision" (Kim et al., 2022) additive objectives. This is a proxy;
``export.gguf_budget.measure_kl`` computes the real KL of a choice, and ``bench/gguf_peers.py`` reports the two side by side.

Choice (``choose``). A multiple-choice knapsack: each tensor takes one of its options (type, bytes, predicted
KL), the total (plus the file's fixed bytes) must not exceed the target, the sum of predicted KLs is
minimised. Solved exactly by dynamic programming over bytes counted in units of ``total / RESOLUTION``
(each option's bytes rounded *up* to a unit, so the file never exceeds the target; the unit depends on the
options only, not on the target, so a larger budget never gives a higher predicted KL). Ties go to the
cheaper option, then to the earlier tensor name: the choice is deterministic.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import InputError

RESOLUTION = 1 << 17  # byte units of the knapsack (its error: at most one unit per tensor)
_DP_CELLS = 1 << 28  # the DP's choice table stays under ~256 MB

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_target_size(value: str | int, flag: str = "--target-size") -> int:
    """Bytes from ``123456``, ``105MB``, ``105M``, ``1.5GB``, ``100MiB``, ``2 GiB`` (K/M/G/T decimal, KiB/MiB/... binary).

    Raises InputError naming ``flag`` for anything else, or a size under one byte."""
    m = _SIZE.match(str(value))
    if not m:
        raise InputError(f"{flag} {value}: expected a size like 105MB, 1.5GB, 100MiB or a number of bytes")
    number, prefix, binary, _ = m.groups()
    base = 1024 if binary else 1000
    n = int(float(number) * base ** "_kmgt".index(prefix.lower() or "_"))
    if n < 1 or (binary and not prefix):
        raise InputError(f"{flag} {value}: expected a size like 105MB, 1.5GB, 100MiB or a number of bytes")
    return n


def target_from_bpw(bpw: float, n_weights: int, flag: str = "--target-bpw") -> int:
    """File bytes for ``bpw`` bits per weight over ``n_weights`` (every tensor's elements, as the export report's
    ``bits_per_weight`` counts them). Raises InputError for a non-positive value."""
    if not float(bpw) > 0:
        raise InputError(f"{flag} {bpw}: expected a positive number of bits per weight, like 4.8")
    return int(float(bpw) * n_weights / 8)


def human(n: int) -> str:
    """Decimal megabytes with 3 decimals, as users write --target-size."""
    return f"{n / 1e6:.3f} MB"


@dataclass(frozen=True)
class Option:
    """One way to store one tensor."""

    type: str
    bytes: int  # in the file, padding included
    kl: float  # predicted KL divergence it adds, nats per token


@dataclass
class Selection:
    """The chosen type per tensor, with the totals the choice predicts."""

    types: dict[str, str]
    bytes: int  # the whole file: fixed bytes + every chosen option
    predicted_kl: float
    target: int
    kl: dict[str, float] = field(default_factory=dict)  # predicted KL per tensor


def pareto(options: list[Option]) -> list[Option]:
    """The options no other beats on both bytes and KL, by bytes ascending (ties: the first type listed)."""
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.kl)):
        if not front or o.kl < front[-1].kl:
            front.append(o)
    return front


def choose(options: dict[str, list[Option]], fixed_bytes: int, target: int, flag: str = "--target-size") -> Selection:
    """Per tensor one option, the file (``fixed_bytes`` + chosen bytes) at most ``target``, the sum of predicted
    KLs minimal (see the module docstring for the method and its guarantees).

    Raises InputError naming ``flag`` when even the smallest option everywhere does not fit."""
    names = sorted(options)
    fronts = {n: pareto(options[n]) for n in names}
    if any(not f for f in fronts.values()):
        raise ValueError("every tensor needs at least one option")
    smallest = fixed_bytes + sum(f[0].bytes for f in fronts.values())
    if smallest > target:
        raise InputError(
            f"{flag}: {human(target)} is too small; the smallest file dsq can write for this model is "
            f"{human(smallest)} (every tensor at its smallest candidate type); ask for at least that"
        )
    largest = fixed_bytes + sum(f[-1].bytes for f in fronts.values())
    if largest <= target or len(names) == 0:
        picks = {n: fronts[n][-1] for n in names}
    else:
        picks = _knapsack(names, fronts, target - smallest)
    return Selection(
        types={n: o.type for n, o in picks.items()},
        bytes=fixed_bytes + sum(o.bytes for o in picks.values()),
        predicted_kl=float(sum(o.kl for o in picks.values())),
        target=target,
        kl={n: o.kl for n, o in picks.items()},
    )


def _knapsack(names: list[str], fronts: dict[str, list[Option]], spare: int) -> dict[str, Option]:
    """Exact DP over extra bytes above every tensor's smallest option, in whole units (rounded up)."""
    span = sum(f[-1].bytes - f[0].bytes for f in fronts.values())
    cells = max(1, min(RESOLUTION, _DP_CELLS // max(len(names), 1)))
    unit = max(1, math.ceil(span / cells))
    budget = spare // unit
    best = np.zeros(budget + 1)  # best[b]: least KL of the tensors so far using at most b units
    picks = np.zeros((len(names), budget + 1), dtype=np.uint8)
    costs: list[list[int]] = []
    for i, n in enumerate(names):
        front = fronts[n]
        cost = [math.ceil((o.bytes - front[0].bytes) / unit) for o in front]
        costs.append(cost)
        new = np.full(budget + 1, np.inf)
        for j, (o, c) in enumerate(zip(front, cost, strict=True)):
            if c > budget:
                break
            cand = best[: budget + 1 - c] + o.kl
            better = cand < new[c:]  # strict: on a tie the cheaper option (listed first) stays
            new[c:][better] = cand[better]
            picks[i, c:][better] = j
        best = new
    out: dict[str, Option] = {}
    b = budget
    for i in range(len(names) - 1, -1, -1):
        j = int(picks[i, b])
        out[names[i]] = fronts[names[i]][j]
        b -= costs[i][j]
    return out


# -- sensitivity -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """One use of a model parameter to measure, and the rows of it to measure it on.

    ``use`` "linear": the weight of ``nn.Linear`` modules (every row matters on every token: ``rows`` is a
    uniform sample, scaled up to all rows); "embedding": the input embedding (only the rows of tokens that
    occur matter: ``rows`` are those tokens, not scaled). A tied embedding has one probe of each use; their
    predicted KLs add (the cross term of the two uses is left out, like those between tensors)."""

    key: str  # the caller's name for it, unique per probe
    param: str  # the transformers parameter (``model.layers.0.self_attn.q_proj.weight``)
    rows: torch.Tensor  # row indices, ascending
    use: str = "linear"

    @property
    def scaled(self) -> bool:
        return self.use == "linear"


def sample_rows(key: str, n_rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` of ``n_rows`` row indices (all when ``k >= n_rows``), seeded by ``seed`` and the tensor's name, so the
    same tensor always gets the same rows."""
    if k >= n_rows:
        return torch.arange(n_rows)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randperm(n_rows, generator=g)[:k].sort().values


def fisher_rows(model: nn.Module, ids: torch.Tensor, probes: list[Probe], draws: int = 2, batch: int = 4,
                seed: int = 0, log: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal Fisher information of the model's next-token distribution, per sampled row and input column of
    each probe's parameter, summed over the calibration sequences ``ids`` [S, T] and averaged over ``draws``
    sampled label sets. -> ({key: [len(rows), in] float32}, scored positions S·T).

    The parameter may be used by an ``nn.Linear`` (its sampled output rows) and/or as the input embedding (the
    rows of the tokens that occur): a tied embedding gets both contributions, added per sequence before
    squaring, since they are one parameter. Gradients flow to activations only (no weight gradients)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    by_param: dict[int, Probe] = {}
    emb_probe = None
    embed = model.get_input_embeddings()
    for p in probes:
        if p.param not in params:
            raise InputError(f"{p.key}: the model has no parameter {p.param}")
        if p.use == "embedding":
            if params[p.param] is not embed.weight:
                raise InputError(f"{p.key}: {p.param} is not the model's input embedding")
            emb_probe = p
        else:
            by_param[id(params[p.param])] = p
    fisher = {p.key: torch.zeros(len(p.rows), params[p.param].shape[1]) for p in probes}
    pending: dict[str, torch.Tensor] = {}

    def add(key: str, g: torch.Tensor) -> None:
        pending[key] = pending[key] + g if key in pending else g

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) in by_param:
            probe = by_param[id(mod.weight)]

            def fwd(m, inp, out, probe=probe):
                x = inp[0].detach().float()
                if out.requires_grad:
                    out.register_hook(lambda g: add(probe.key, torch.einsum(
                        "btr,bti->bri", g[..., probe.rows].float(), x)))

            hooks.append(mod.register_forward_hook(fwd))
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    try:
        for b0 in range(0, ids.shape[0], batch):
            chunk = ids[b0: b0 + batch]
            x = embed(chunk).detach().float().requires_grad_(True)
            logp = torch.log_softmax(model(inputs_embeds=x).logits.float(), dim=-1)
            probs = logp.detach().exp().reshape(-1, logp.shape[-1])
            for d in range(draws):
                y = torch.multinomial(probs, 1, generator=gen).reshape(chunk.shape)
                loss = -logp.gather(-1, y[..., None]).sum()
                (gx,) = torch.autograd.grad(loss, x, retain_graph=d < draws - 1)
                if emb_probe is not None:
                    onehot = (chunk[..., None] == emb_probe.rows).float()  # [B, T, rows]
                    add(emb_probe.key, torch.einsum("btr,btd->brd", onehot, gx))
                for key, g in pending.items():
                    fisher[key] += g.pow(2).sum(0) / draws
                pending.clear()
            if log:
                log(f"sensitivity: {min(b0 + batch, ids.shape[0])}/{ids.shape[0]} sequences")
    finally:
        for h in hooks:
            h.remove()
    return fisher, int(ids.numel())


def predicted_kl(fisher: torch.Tensor, sq_err: torch.Tensor, n_rows: int, positions: int, scaled: bool = True) -> float:
    """``½ · (n_rows / sampled rows if scaled) · Σ F ⊙ err² / positions``: the predicted KL (nats/token) of a
    tensor whose measured rows change by ``sq_err`` (squared, same shape as ``fisher``)."""
    scale = n_rows / fisher.shape[0] if scaled else 1.0
    return 0.5 * scale * float((fisher * sq_err).sum()) / positions
