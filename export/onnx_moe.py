"""DeepSeek mixture-of-experts FFN from standard ops: the router, then a TopK/Gather dispatch per expert.

Routers (transformers' ``DeepseekV3TopkRouter`` / ``DeepseekV2TopkRouter`` / ``Qwen3MoeTopKRouter``), picked
from ``ROUTERS`` by the kind the architecture record names:

* ``sigmoid_group`` (V3): s = sigmoid(logits); choice = s + e_score_correction_bias; group score = sum of the
  top-2 choices per group; keep the best ``topk_group`` groups; top-k experts by choice within them;
  weights = s at those experts, divided by their sum when ``norm_topk_prob``; times ``routed_scaling_factor``.
* ``softmax_greedy`` (V2): s = softmax(logits); top-k; weights times ``routed_scaling_factor``.
* ``softmax_group`` (V2 ``group_limited_greedy``): group score = max per group, others' scores set to 0.
* ``softmax_topk`` (Qwen3-MoE): s = softmax(logits); top-k; divided by their sum when ``norm_topk_prob``.

onnxruntime's ``com.microsoft::MoE`` only routes with softmax, so dispatch is explicit: for each expert e,
the tokens that chose it are found with NonZero, gathered, run through its SwiGLU (MatMulNBits weights),
weighted and scattered back with ScatterND(add). Only routed tokens are computed (an expert nobody chose
runs on 0 rows); shared experts run on every token.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..dsquant.archs import ARCHITECTURES
from ..dsquant.errors import UnsupportedError
from .onnx_graph import Ctx
from .onnx_ops import NEG_INF, GraphBuilder, linear, swiglu_mlp

# (graph, ctx, router logits [N, E], layer prefix) -> (weights [N, k], expert indices [N, k])
RouterFn = Callable[[GraphBuilder, Ctx, str, str], tuple[str, str]]


def _group_mask(g: GraphBuilder, ctx: Ctx, grouped: str, group_scores: str) -> str:
    """Bool [N, n_group, 1]: the ``topk_group`` best groups of each token."""
    _, gidx = g.op("TopK", group_scores, g.const([ctx.cfg["topk_group"]]), axis=-1, outputs=2)
    zeros = g.op("Mul", group_scores, g.const(0.0, np.float32))
    ones = g.op("Add", g.op("Mul", g.op("Cast", gidx, to=1), g.const(0.0, np.float32)), g.const(1.0, np.float32))
    mask = g.op("ScatterElements", zeros, gidx, ones, axis=1)
    return g.unsqueeze(g.op("Cast", mask, to=9), [-1])


def _grouped(g: GraphBuilder, ctx: Ctx, scores: str) -> str:
    n_exp, n_group = ctx.cfg["n_routed_experts"], ctx.cfg["n_group"]
    return g.reshape(scores, [-1, n_group, n_exp // n_group])


def sigmoid_group(g: GraphBuilder, ctx: Ctx, logits: str, p: str) -> tuple[str, str]:
    cfg = ctx.cfg
    scores = g.op("Sigmoid", logits)
    choice = g.op("Add", scores, g.weights.float(f"{p}.gate.e_score_correction_bias"))
    grouped = _grouped(g, ctx, choice)
    top2, _ = g.op("TopK", grouped, g.const([2]), axis=-1, outputs=2)
    mask = _group_mask(g, ctx, grouped, g.op("ReduceSum", top2, g.const([-1]), keepdims=0))
    masked = g.reshape(g.op("Where", mask, grouped, g.const(NEG_INF, np.float32)), [0, -1])
    _, idx = g.op("TopK", masked, g.const([cfg["num_experts_per_tok"]]), axis=-1, outputs=2)
    w = g.op("GatherElements", scores, idx, axis=1)
    if cfg.get("norm_topk_prob", True):
        denom = g.op("Add", g.op("ReduceSum", w, g.const([-1]), keepdims=1), g.const(1e-20, np.float32))
        w = g.op("Div", w, denom)
    return g.op("Mul", w, g.const(cfg.get("routed_scaling_factor", 1.0), np.float32)), idx


def softmax_greedy(g: GraphBuilder, ctx: Ctx, logits: str, p: str) -> tuple[str, str]:
    cfg = ctx.cfg
    w, idx = g.op("TopK", g.op("Softmax", logits, axis=-1), g.const([cfg["num_experts_per_tok"]]), axis=-1, outputs=2)
    return g.op("Mul", w, g.const(cfg.get("routed_scaling_factor", 1.0), np.float32)), idx


def softmax_group(g: GraphBuilder, ctx: Ctx, logits: str, p: str) -> tuple[str, str]:
    cfg = ctx.cfg
    grouped = _grouped(g, ctx, g.op("Softmax", logits, axis=-1))
    mask = _group_mask(g, ctx, grouped, g.op("ReduceMax", grouped, g.const([-1]), keepdims=0))
    masked = g.reshape(g.op("Where", mask, grouped, g.const(0.0, np.float32)), [0, -1])
    w, idx = g.op("TopK", masked, g.const([cfg["num_experts_per_tok"]]), axis=-1, outputs=2)
    return g.op("Mul", w, g.const(cfg.get("routed_scaling_factor", 1.0), np.float32)), idx


def softmax_topk(g: GraphBuilder, ctx: Ctx, logits: str, p: str) -> tuple[str, str]:
    """Qwen3-MoE (``Qwen3MoeTopKRouter``): softmax, top-k, divided by their sum when ``norm_topk_prob``."""
    w, idx = g.op("TopK", g.op("Softmax", logits, axis=-1), g.const([ctx.cfg["num_experts_per_tok"]]), axis=-1,
                  outputs=2)
    if ctx.conf.norm_topk_prob:
        w = g.op("Div", w, g.op("ReduceSum", w, g.const([-1]), keepdims=1))
    return w, idx


# Router kinds; an architecture record names one per config.json topk_method (``Architecture.routers``).
ROUTERS: dict[str, RouterFn] = {
    "sigmoid_group": sigmoid_group,
    "softmax_greedy": softmax_greedy,
    "softmax_group": softmax_group,
    "softmax_topk": softmax_topk,
}


def router_for(cfg: dict) -> RouterFn:
    """The router of ``cfg``'s record for its ``topk_method``; UnsupportedError when it names none."""
    rec = ARCHITECTURES.get(cfg["model_type"])
    kind = rec.router_kind(cfg.get("topk_method")) if rec is not None else None
    if kind is None:
        known = dict(rec.routers) if rec is not None else {}
        raise UnsupportedError(
            f"config.json: MoE routing ({cfg['model_type']}, topk_method {cfg.get('topk_method')}) has no ONNX "
            f"graph; known: {known}"
        )
    return ROUTERS[kind]


def moe_ffn(g: GraphBuilder, ctx: Ctx, i: int, x: str) -> str:
    """Layer ``i``'s MoE FFN on hidden states ``x`` [batch, seq, hidden] -> [batch, seq, hidden]: the record's
    router, each routed expert on the tokens that chose it, plus shared experts when the config has them.
    Raises UnsupportedError (router_for) when the record names no router for the config's topk_method."""
    cfg, p = ctx.cfg, f"model.layers.{i}.mlp"
    flat = g.reshape(x, [-1, cfg["hidden_size"]])  # [N, hidden]
    weights, idx = router_for(cfg)(g, ctx, linear(g, flat, f"{p}.gate.weight"), p)

    acc = swiglu_mlp(g, flat, f"{p}.shared_experts") if ctx.conf.n_shared_experts else g.op(
        "Mul", flat, g.const(0.0, np.float32)
    )
    for e in range(ctx.conf.n_experts):
        hit = g.op("Cast", g.op("Equal", idx, g.const(e)), to=1)  # [N, k] 0/1 (an expert appears once per token)
        w_e = g.op("ReduceSum", g.op("Mul", hit, weights), g.const([1]), keepdims=0)  # [N]
        tok = g.op("NonZero", g.op("ReduceSum", hit, g.const([1]), keepdims=0))  # [1, n_e]
        tok = g.reshape(tok, [-1, 1])  # [n_e, 1]
        rows = g.op("GatherND", flat, tok)  # [n_e, hidden]
        y = swiglu_mlp(g, rows, f"{p}.experts.{e}")
        y = g.op("Mul", y, g.op("GatherND", g.unsqueeze(w_e, [1]), tok))
        acc = g.op("ScatterND", acc, tok, y, reduction="add")
    return g.op("Reshape", acc, g.op("Shape", x))
