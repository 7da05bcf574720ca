"""The decoder graph, built node by node from the architecture table (no tracing).

Inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq], ``position_ids`` [batch, seq],
``past_key_values.{i}.key/value``; outputs ``logits`` [batch, seq, vocab] and ``present.{i}.key/value``.
One graph serves prefill (past length 0) and decode (seq 1): every shape is dynamic.

What varies per architecture comes from its record (``dsquant.archs``) as an ``ArchSpec``: the attention
block (GQA or DeepSeek's MLA), q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3), the RoPE pair layout,
and which layers are mixture-of-experts (``ModelConfig.is_moe_layer``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..dsquant.archs import ARCHITECTURES
from ..dsquant.config import ModelConfig
from ..dsquant.errors import UnsupportedError
from .onnx_ops import (
    MS_DOMAIN,
    OPSET,
    GraphBuilder,
    Rope,
    apply_rope,
    attention_bias,
    fused_linears,
    grouped_attention,
    linear,
    rms_norm,
    rope_tables,
    swiglu_mlp,
)
from .onnx_weights import WeightTable

IR_VERSION = 10  # onnxruntime 1.2x loads IR <= 10/11; onnx 1.23 would write 12+ by default


@dataclass(frozen=True)
class Ctx:
    """What every layer block needs: the config, the shared RoPE tables and the attention bias."""

    cfg: dict
    spec: ArchSpec
    rope: Rope
    bias: str
    eps: float
    shared: dict[str, object] = field(default_factory=dict)  # per-graph values built once, on first use

    @cached_property
    def conf(self) -> ModelConfig:
        """``cfg`` resolved (head_dim, kv heads, experts, MoE layers)."""
        return ModelConfig.from_dict(self.cfg)


# An attention block: (graph, ctx, layer, hidden, past key, past value) -> (output, present key, present value).
AttentionFn = Callable[[GraphBuilder, Ctx, int, str, str, str], tuple[str, str, str]]


def head_dim(cfg: dict) -> int:
    """Per-head width: ``ModelConfig.head_dim``."""
    return ModelConfig.from_dict(cfg).head_dim


def kv_heads(cfg: dict) -> int:
    """Older Llama configs omit num_key_value_heads: plain multi-head attention (``ModelConfig.n_kv_heads``)."""
    return ModelConfig.from_dict(cfg).n_kv_heads


def qkv_projections(g: GraphBuilder, ctx: Ctx, p: str, x: str) -> list[str]:
    """q, k, v ([B, S, heads * D] each, biases added for Qwen2), as one fused MatMulNBits when they pack alike."""
    names = [f"{p}.{n}_proj.weight" for n in "qkv"]
    biases = [f"{p}.{n}_proj.bias" for n in "qkv"] if ctx.spec.qkv_bias else None
    return fused_linears(g, x, names, biases)


def gqa_attention(g: GraphBuilder, ctx: Ctx, i: int, x: str, past_k: str, past_v: str) -> tuple[str, str, str]:
    """Llama/Qwen2/Qwen3 attention; the cache holds post-RoPE K and V, [B, kv_heads, T, head_dim]."""
    cfg, p = ctx.cfg, f"model.layers.{i}.self_attn"
    n_heads, n_kv, d = cfg["num_attention_heads"], kv_heads(cfg), head_dim(cfg)
    qkv = dict(zip("qkv", qkv_projections(g, ctx, p, x), strict=True))

    def proj(name: str, heads: int) -> str:
        y = g.reshape(qkv[name], [0, 0, heads, d])  # [B, S, h, D]
        if ctx.spec.qk_norm and name in ("q", "k"):
            y = rms_norm(g, y, f"{p}.{name}_norm.weight", ctx.eps)
        return g.op("Transpose", y, perm=[0, 2, 1, 3])

    q = apply_rope(g, proj("q", n_heads), ctx.rope)
    k = apply_rope(g, proj("k", n_kv), ctx.rope)
    present_k = g.op("Concat", past_k, k, axis=2)
    present_v = g.op("Concat", past_v, proj("v", n_kv), axis=2)
    out = grouped_attention(g, q, present_k, present_v, ctx.bias, (n_heads, n_kv), (d, d), d**-0.5)
    return linear(g, out, f"{p}.o_proj.weight"), present_k, present_v


def gqa_contrib_attention(
    g: GraphBuilder, ctx: Ctx, i: int, x: str, past_k: str, past_v: str
) -> tuple[str, str, str]:
    """The same attention through ``com.microsoft::GroupQueryAttention`` (onnxruntime's fused kernel; the
    cache layout is identical). q/k norms and RoPE stay ours (do_rotary=0), so the math matches the plain
    path; the op masks causally from ``seqlens_k`` = (attention_mask row sums) - 1, i.e. it assumes
    right-padded batches (as onnxruntime-genai feeds it), not left padding."""
    cfg, p = ctx.cfg, f"model.layers.{i}.self_attn"
    n_heads, n_kv, d = cfg["num_attention_heads"], kv_heads(cfg), head_dim(cfg)
    if "seqlens_k" not in ctx.shared:
        total = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)
        ctx.shared["seqlens_k"] = g.op("Cast", g.op("Sub", total, g.const(1)), to=6)  # INT32
        length = g.reshape(g.dim("attention_mask", 1), g.const([], np.int64))
        ctx.shared["total_len"] = g.op("Cast", length, to=6)
        # our RoPE tables are [B, 1, S, D/2] (heads first); this op takes [B, S, heads * D]
        ctx.shared["rope_bshd"] = Rope(
            g.op("Transpose", ctx.rope.cos, perm=[0, 2, 1, 3]), g.op("Transpose", ctx.rope.sin, perm=[0, 2, 1, 3]),
            ctx.rope.half, ctx.rope.interleaved,
        )
    rope = ctx.shared["rope_bshd"]
    qkv = dict(zip("qkv", qkv_projections(g, ctx, p, x), strict=True))

    def proj(name: str, heads: int, rotate: bool) -> str:
        y = qkv[name]
        if not rotate:
            return y
        y = g.reshape(y, [0, 0, heads, d])
        if ctx.spec.qk_norm:
            y = rms_norm(g, y, f"{p}.{name}_norm.weight", ctx.eps)
        return g.reshape(apply_rope(g, y, rope), [0, 0, heads * d])

    out, present_k, present_v = g.op(
        "GroupQueryAttention",
        proj("q", n_heads, True), proj("k", n_kv, True), proj("v", n_kv, False), past_k, past_v,
        ctx.shared["seqlens_k"], ctx.shared["total_len"],
        outputs=3, domain=MS_DOMAIN, num_heads=n_heads, kv_num_heads=n_kv, scale=d**-0.5,
    )
    return linear(g, out, f"{p}.o_proj.weight"), present_k, present_v


def gqa_cache(cfg: dict) -> tuple[list, list]:
    shape = ["batch_size", kv_heads(cfg), "past_sequence_length", head_dim(cfg)]
    return shape, shape


def _mla():
    from . import onnx_mla

    return onnx_mla


@dataclass(frozen=True)
class ArchSpec:
    """What the graph builder reads from an architecture record (``arch_spec`` derives it)."""

    attention: str  # key of ATTENTION
    rotary_class: str  # transformers' rotary embedding class (the reference for inv_freq and scaling)
    qkv_bias: bool = False
    qk_norm: bool = False
    moe: bool = False
    module: str = ""  # transformers modeling module holding rotary_class

    def rope_interleaved(self, cfg: dict) -> bool:
        # DeepSeek-V2 always rotates interleaved pairs (complex form); V3 unless rope_interleave is false.
        return self.attention == "mla" and cfg.get("rope_interleave", True)


# attention kind -> (block, cache shapes (key, value) for a config)
ATTENTION: dict[str, tuple[Callable[[], AttentionFn], Callable[[dict], tuple[list, list]]]] = {
    "gqa": (lambda: gqa_attention, gqa_cache),
    "gqa_contrib": (lambda: gqa_contrib_attention, gqa_cache),
    "mla": (lambda: _mla().mla_attention, lambda cfg: _mla().mla_cache(cfg)),
}

# (architecture's attention, --attention choice) -> ATTENTION key. MLA has no fused onnxruntime kernel.
ATTENTION_IMPLS: dict[tuple[str, str], str] = {
    ("gqa", "plain"): "gqa",
    ("gqa", "contrib"): "gqa_contrib",
    ("mla", "plain"): "mla",
}

# RoPE types whose frequencies do not depend on the sequence length (one table serves every step).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def arch_spec(cfg: dict) -> ArchSpec:
    """The graph facts of ``cfg``'s architecture record.

    Raises UnsupportedError for a model_type without a record or an activation other than silu."""
    mt = cfg.get("model_type")
    rec = ARCHITECTURES.get(mt)
    if rec is None:
        raise UnsupportedError(f"config.json: model_type `{mt}` has no ONNX graph; supported: {', '.join(ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"config.json: hidden_act `{act}` is not supported by the ONNX export (silu only)")
    return ArchSpec(rec.attention, rec.rotary, rec.qkv_bias, rec.qk_norm, rec.moe, rec.hf_module)


def rotary(cfg: dict, spec: ArchSpec) -> tuple[np.ndarray, float]:
    """inv_freq and attention_scaling from transformers' own rotary class for this config."""
    import transformers

    rope_type = ModelConfig.from_dict(cfg).rope["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedError(
            f"config.json: rope_type `{rope_type}` depends on the sequence length; the ONNX export supports "
            f"{', '.join(STATIC_ROPE_TYPES)}"
        )
    mt = cfg["model_type"]
    config = transformers.AutoConfig.for_model(mt, **{k: v for k, v in cfg.items() if k != "model_type"})
    module = importlib.import_module(spec.module)
    emb = getattr(module, spec.rotary_class)(config)
    return emb.inv_freq.to(torch.float32).numpy(), float(emb.attention_scaling)


def _dense_or_moe(g: GraphBuilder, ctx: Ctx, i: int, x: str) -> str:
    if ctx.spec.moe and ctx.conf.is_moe_layer(i):
        from .onnx_moe import moe_ffn

        return moe_ffn(g, ctx, i, x)
    return swiglu_mlp(g, x, f"model.layers.{i}.mlp")


def attention_kind(cfg: dict, impl: str) -> str:
    spec = arch_spec(cfg)
    if (spec.attention, impl) not in ATTENTION_IMPLS:
        known = sorted(i for a, i in ATTENTION_IMPLS if a == spec.attention)
        raise UnsupportedError(f"attention `{impl}`: not available for {cfg['model_type']}; choose {', '.join(known)}")
    return ATTENTION_IMPLS[spec.attention, impl]


def build_decoder(cfg: dict, weights: WeightTable, attention: str = "plain") -> onnx.ModelProto:
    """The decoder graph of ``cfg``'s architecture over the initializers already in ``weights`` (by HF name).

    Inputs ``input_ids``/``position_ids`` [batch, sequence] and ``attention_mask`` [batch, total_sequence]
    int64, ``past_key_values.{i}.key/value`` float32 (cache shapes of the attention kind: [batch, kv_heads,
    past_sequence, head_dim] for GQA); outputs ``logits`` [batch, sequence, vocab] float32 and
    ``present.{i}.key/value`` [.., total_sequence, ..]. ``attention``: plain (standard ops) or contrib
    (GroupQueryAttention). Raises UnsupportedError for an architecture, activation, RoPE scaling or
    attention choice the exporter has no graph for, and for a weight the graph needs that ``weights`` lacks."""
    spec = arch_spec(cfg)
    kind = attention_kind(cfg, attention)
    attn_fn, cache_shapes = ATTENTION[kind][0](), ATTENTION[kind][1]
    g = GraphBuilder(weights)
    n_layers, eps = cfg["num_hidden_layers"], cfg.get("rms_norm_eps", 1e-6)
    key_shape, value_shape = cache_shapes(cfg)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg["vocab_size"]])]
    present_k_shape = [*key_shape[:2], "total_sequence_length", key_shape[3]]
    present_v_shape = [*value_shape[:2], "total_sequence_length", value_shape[3]]
    for i in range(n_layers):
        for kind, shape, pshape in (("key", key_shape, present_k_shape), ("value", value_shape, present_v_shape)):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, pshape))

    inv_freq, scaling = rotary(cfg, spec)
    rope = rope_tables(g, "position_ids", inv_freq, scaling, spec.rope_interleaved(cfg))
    bias = attention_bias(g, "attention_mask", g.dim("past_key_values.0.key", 2), g.dim("input_ids", 1))
    ctx = Ctx(cfg, spec, rope, bias, eps)

    x = g.op("Gather", weights.float("model.embed_tokens.weight"), "input_ids", axis=0)
    for i in range(n_layers):
        p = f"model.layers.{i}"
        h = rms_norm(g, x, f"{p}.input_layernorm.weight", eps)
        attn, pk, pv = attn_fn(g, ctx, i, h, f"past_key_values.{i}.key", f"past_key_values.{i}.value")
        g.op("Identity", pk, outputs=[f"present.{i}.key"])
        g.op("Identity", pv, outputs=[f"present.{i}.value"])
        x = g.op("Add", x, attn)
        h = rms_norm(g, x, f"{p}.post_attention_layernorm.weight", eps)
        x = g.op("Add", x, _dense_or_moe(g, ctx, i, h))
    x = rms_norm(g, x, "model.norm.weight", eps)
    g.op("Identity", linear(g, x, "lm_head.weight"), outputs=["logits"])

    graph = helper.make_graph(g.nodes, f"dsq_{cfg['model_type']}", inputs, outputs, weights.sink.protos)
    return helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="dsq",
    )
