"""Routed experts: capture their inputs through the router's top-k, count tokens, quantize per expert.

transformers 5.x holds a MoE layer's routed experts as two fused 3-D parameters of one module
(``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first, and ``mlp.experts.down_proj`` [E, H, I]),
not as ``nn.Linear`` modules, so Linear hooks never see them. A forward pre-hook on the experts
module records its inputs (the post-attention-norm hidden states) and the router's ``top_k_index``;
expert ``e``'s calibration inputs are then exactly the rows routed to it.

Coverage policy (issue 6): an expert routed fewer than ``expert_min_tokens`` tokens is calibrated
on its routed tokens *plus all of the layer's tokens* (statistics only; the forward pass keeps the
real routing), recorded as policy ``routed+all``. ``fail_below_tokens`` (``--min-expert-tokens``)
fails the run instead, naming the layer and experts. The router itself is never quantized.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError, UnsupportedError
from ..formats import FORMATS, QuantizedTensor
from .awq import search_scale
from .methods import METHODS, CalibOptions, InputStats, Method, use_stats

_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
PROJS = ("gate", "up", "down")


def expert_name(prefix: str, e: int, proj: str) -> str:
    return f"{prefix}mlp.experts.{e}.{proj}_proj.weight"


def _fused(layer: nn.Module) -> nn.Module | None:
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    return experts if experts is not None and hasattr(experts, "gate_up_proj") else None


def fuse_experts(layer: nn.Module, experts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors (local names ``mlp.experts.{e}.{gate,up,down}_proj.weight``) ->
    the fused module's ``gate_up_proj`` / ``down_proj`` parameters."""
    if not experts:
        return {}
    mod = _fused(layer)
    if mod is None:
        raise UnsupportedError(f"checkpoint has per-expert weights ({next(iter(experts))}) but the layer has no fused experts")
    n, two_i, h = mod.gate_up_proj.shape
    if tuple(mod.down_proj.shape) != (n, h, two_i // 2):
        raise UnsupportedError(f"unexpected fused expert layout gate_up {list(mod.gate_up_proj.shape)}")
    by: dict[tuple[int, str], torch.Tensor] = {}
    for local, t in experts.items():
        m = _EXPERT_RE.match(local)
        if m is None:
            raise UnsupportedError(f"unexpected expert tensor `{local}`")
        by[(int(m.group(1)), m.group(2))] = t
    missing = [(e, p) for e in range(n) for p in PROJS if (e, p) not in by]
    if missing:
        e, p = missing[0]
        raise UnsupportedError(f"checkpoint lacks `mlp.experts.{e}.{p}_proj.weight` ({len(missing)} expert tensors missing)")
    gate_up = torch.stack([torch.cat([by[(e, "gate")], by[(e, "up")]], dim=0) for e in range(n)])
    down = torch.stack([by[(e, "down")] for e in range(n)])
    return {"mlp.experts.gate_up_proj": gate_up, "mlp.experts.down_proj": down}


class ExpertCapture:
    """Records the experts module's inputs and routing during the calibration forward pass."""

    def __init__(self, experts: nn.Module, prefix: str) -> None:
        self.experts = experts
        self.prefix = prefix
        self.inputs: list[torch.Tensor] = []
        self.routes: list[torch.Tensor] = []
        self._hook = experts.register_forward_pre_hook(self._record)

    @classmethod
    def attach(cls, layer: nn.Module, prefix: str, formats: dict[str, str]) -> ExpertCapture | None:
        mod = _fused(layer)
        return cls(mod, prefix) if mod is not None else None

    def _record(self, _module: nn.Module, args: tuple) -> None:
        hidden, top_k_index = args[0], args[1]
        self.inputs.append(hidden.reshape(-1, hidden.shape[-1]).to(torch.float32).clone())
        self.routes.append(top_k_index.reshape(hidden.reshape(-1, hidden.shape[-1]).shape[0], -1).clone())

    def detach(self) -> None:
        self._hook.remove()

    @property
    def n_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    def counts(self) -> torch.Tensor:
        routes = torch.cat(self.routes).flatten()
        routes = routes[(routes >= 0) & (routes < self.n_experts)]
        return torch.bincount(routes, minlength=self.n_experts)

    def quantize(
        self, method: Method, formats: dict[str, str], opts: CalibOptions, layer: int,
        collect: dict | None = None, given: dict[str, torch.Tensor] | None = None, pool=None, on_done=None,
    ) -> tuple[dict[str, QuantizedTensor], list[dict]]:
        """Quantize every routed expert on its own tokens; write the dequantized weights back into
        the fused parameters; return the tensors and the coverage rows of this layer. ``collect`` /
        ``given``: as in ``calibrate_layer`` (per-expert statistics by the expert's HF weight name;
        their token count includes the ``routed+all`` fallback tokens). ``pool`` (pool.py; None: here)
        runs each expert as one job (:func:`quantize_expert`) on the layer's captured inputs, shared
        once; ``on_done(k)`` after the k-th expert."""
        from .pool import LOCAL

        pool = pool or LOCAL
        x_all = torch.cat(self.inputs)
        routes = torch.cat(self.routes)
        counts = self.counts()
        self.inputs.clear()
        self.routes.clear()
        short = [(e, int(c)) for e, c in enumerate(counts) if c < opts.fail_below_tokens]
        if short:
            listed = ", ".join(f"expert {e}: {c}" for e, c in short[:8])
            raise InputError(
                f"layer {layer}: {len(short)} routed expert(s) got fewer than --min-expert-tokens "
                f"{opts.fail_below_tokens} calibration tokens ({listed}); use more --samples, a longer --seqlen "
                "or broader --calib text, or lower --min-expert-tokens"
            )
        mod = self.experts
        inter = mod.gate_up_proj.shape[1] // 2
        x_ref, routes_ref = pool.share(x_all), pool.share(routes)

        def jobs():  # one at a time: the local pool never holds two experts' copies
            for e in range(self.n_experts):
                names = {p: expert_name(self.prefix, e, p) for p in PROJS}
                sub = None if given is None else {n: given[n] for n in names.values() if n in given}
                # clones: a job gets this expert's rows, not a view that would carry the fused tensor along
                f32 = {"dtype": torch.float32, "copy": True}  # a bfloat16 forward's experts are quantized from float32
                w = (mod.gate_up_proj.data[e, :inter].to(**f32), mod.gate_up_proj.data[e, inter:].to(**f32),
                     mod.down_proj.data[e].to(**f32))
                yield (e, x_ref, routes_ref, int(counts[e]), *w, mod.act_fn, method, formats, names, opts, sub,
                       collect is not None)

        out: dict[str, QuantizedTensor] = {}
        rows = []
        for e, (q, deq_gate, deq_up, deq_down, policy, col) in enumerate(pool.map(quantize_expert, jobs(), on_done)):
            out.update(q)
            if collect is not None:
                collect.update(col)
            mod.gate_up_proj.data[e] = torch.cat([deq_gate, deq_up])
            mod.down_proj.data[e] = deq_down
            rows.append({"layer": layer, "expert": e, "tokens": int(counts[e]), "policy": policy})
        return out, rows

    @staticmethod
    def _stats(method: Method, x: torch.Tensor, opts: CalibOptions) -> InputStats | None:
        if not method.needs_stats:
            return None
        st = InputStats(x.shape[-1], method.full_hessian, opts.awq_tokens if method.awq else 0)
        st.add(x)
        return st

    @staticmethod
    def _one(
        method: Method,
        formats: dict[str, str],
        name: str,
        w: torch.Tensor,
        stats: InputStats | None,
        opts: CalibOptions,
        out: dict[str, QuantizedTensor],
    ) -> torch.Tensor:
        if name not in formats:
            return w
        qt = method.linear(FORMATS[formats[name]], w, stats, opts)
        out[name] = qt
        return qt.dequantize()


def quantize_expert(
    e: int, x_all: torch.Tensor, routes: torch.Tensor, n: int, w_gate: torch.Tensor, w_up: torch.Tensor,
    w_down: torch.Tensor, act_fn: nn.Module, method: Method, formats: dict[str, str], names: dict[str, str],
    opts: CalibOptions, given: dict[str, torch.Tensor] | None, collect: bool,
) -> tuple[dict[str, QuantizedTensor], torch.Tensor, torch.Tensor, torch.Tensor, str, dict]:
    """One routed expert ``e`` (one unit of work): its calibration rows are those of ``x_all`` [tokens,
    hidden] that ``routes`` [tokens, top_k] sends to it (``n`` of them), plus all rows below
    ``opts.expert_min_tokens``. Returns (its QuantizedTensors by HF name, the dequantized gate, up and
    down weights, the coverage policy, the statistics to record when ``collect``)."""
    x = x_all[(routes == e).any(dim=-1)]
    policy = "routed"
    if n < opts.expert_min_tokens:
        x = torch.cat([x, x_all])
        policy = "routed+all"
    used = method
    if x.shape[0] == 0 and method.needs_stats:  # nothing to calibrate on: round to nearest
        used, policy = METHODS["rtn"], "rtn"
    w = {"gate": w_gate, "up": w_up}
    col: dict = {}
    if used.awq and x.shape[0] and names["up"] in formats and names["down"] in formats:
        # AWQ for the expert's down_proj: its input act(gate x) * up x scales by 1/s through up's rows
        h = act_fn(x @ w["gate"].T) * (x @ w["up"].T)
        keep = torch.linspace(0, h.shape[0] - 1, min(h.shape[0], opts.awq_tokens)).round().long()
        s, _, _ = search_scale(h[keep], [w_down], [formats[names["down"]]], opts.awq_grid)
        w["up"], w_down = w["up"] / s.unsqueeze(1), w_down * s
    st_in = ExpertCapture._stats(used, x, opts)
    if st_in is not None:  # gate and up read the same rows: one X^T X, taken by each quantized one
        st_in.users = max(1, sum(names[p] in formats for p in ("gate", "up")))
    deq = {}
    out: dict[str, QuantizedTensor] = {}
    for proj in ("gate", "up"):
        st = use_stats(names[proj], st_in, col if collect and names[proj] in formats else None, given)
        deq[proj] = ExpertCapture._one(used, formats, names[proj], w[proj], st, opts, out)
    h = act_fn(x @ deq["gate"].T) * (x @ deq["up"].T)
    st_down = use_stats(names["down"], ExpertCapture._stats(used, h, opts),
                        col if collect and names["down"] in formats else None, given)
    deq_down = ExpertCapture._one(used, formats, names["down"], w_down, st_down, opts, out)
    return out, deq["gate"], deq["up"], deq_down, policy, col


def coverage_summary(rows: list[dict]) -> list[dict]:
    """Per MoE layer: min / median / max tokens per expert and how many needed the fallback policy."""
    layers: dict[int, list[dict]] = {}
    for r in rows:
        layers.setdefault(r["layer"], []).append(r)
    out = []
    for layer, rs in sorted(layers.items()):
        tokens = sorted(r["tokens"] for r in rs)
        out.append(
            {
                "layer": layer,
                "experts": len(rs),
                "min_tokens": tokens[0],
                "median_tokens": tokens[len(tokens) // 2],
                "max_tokens": tokens[-1],
                "unrouted": sum(1 for t in tokens if t == 0),
                "fallback": sum(1 for r in rs if r["policy"] != "routed"),
            }
        )
    return out
