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
    embedding_lookup,
    fused_linears,
    grouped_attention,
    linear,
    packed_linears,
    rms_norm,
    rope_tables,
    skip_rms_norm,
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


def _gqa_shared(g: GraphBuilder, ctx: Ctx) -> dict[str, object]:
    """Values every GroupQueryAttention node reads, built once per graph: seqlens_k = (attention_mask row sums)
    - 1 and the total length (int32), and the rotary cos/sin caches [max_position_embeddings, D/2] the op indexes
    by position (transformers' angles position * inv_freq in float32, times attention_scaling)."""
    if "seqlens_k" not in ctx.shared:
        total = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)
        ctx.shared["seqlens_k"] = g.op("Cast", g.op("Sub", total, g.const(1)), to=6)  # INT32
        length = g.reshape(g.dim("attention_mask", 1), g.const([], np.int64))
        ctx.shared["total_len"] = g.op("Cast", length, to=6)
        inv_freq, scaling = ctx.shared["inv_freq"], ctx.shared["rope_scaling"]
        angles = np.arange(ctx.cfg.get("max_position_embeddings", 4096), dtype=np.float32)[:, None] * inv_freq[None]
        ctx.shared["cos_cache"] = g.weights.sink.add("cos_cache", (np.cos(angles) * np.float32(scaling)).astype(np.float32))
        ctx.shared["sin_cache"] = g.weights.sink.add("sin_cache", (np.sin(angles) * np.float32(scaling)).astype(np.float32))
    return ctx.shared


def gqa_contrib_attention(
    g: GraphBuilder, ctx: Ctx, i: int, x: str, past_k: str, past_v: str
) -> tuple[str, str, str]:
    """The same attention through ``com.microsoft::GroupQueryAttention`` (onnxruntime's fused kernel; the
    cache layout is identical). Where the model allows it this is the form onnxruntime-genai's builder writes:
    the packed q|k|v MatMulNBits output goes straight in (no Split, no transposes) and the op applies RoPE
    itself from cos/sin caches (do_rotary=1), appending to the cache in place when past and present share a
    buffer (onnxruntime-genai's past_present_share_buffer). Qwen3's per-head q/k norms come before RoPE, so
    there q/k are normed and rotated here and the op gets them unrotated-off (do_rotary=0).

    The op masks causally from ``seqlens_k`` and takes positions from it too: it reads right-padded (or
    unpadded) batches, as onnxruntime-genai feeds it; :func:`left_padding_to_right` rotates left-padded rows into
    that form first. Positions are each row's token count (``position_ids`` is read only by Qwen3's RoPE outside
    the op): export with ``attention="plain"`` for custom positions."""
    cfg, p = ctx.cfg, f"model.layers.{i}.self_attn"
    n_heads, n_kv, d = cfg["num_attention_heads"], kv_heads(cfg), head_dim(cfg)
    sh = _gqa_shared(g, ctx)
    attrs = dict(outputs=3, domain=MS_DOMAIN, num_heads=n_heads, kv_num_heads=n_kv, scale=d**-0.5)
    names = [f"{p}.{n}_proj.weight" for n in "qkv"]
    biases = [f"{p}.{n}_proj.bias" for n in "qkv"] if ctx.spec.qkv_bias else None
    packed = None if ctx.spec.qk_norm else packed_linears(g, x, names, biases)
    if packed is not None:
        out, present_k, present_v = g.op(
            "GroupQueryAttention", packed[0], "", "", past_k, past_v, sh["seqlens_k"], sh["total_len"],
            sh["cos_cache"], sh["sin_cache"], do_rotary=1, rotary_interleaved=int(ctx.rope.interleaved), **attrs,
        )
        return linear(g, out, f"{p}.o_proj.weight"), present_k, present_v
    if "rope_bshd" not in sh:  # our RoPE tables are [B, 1, S, D/2] (heads first); this op takes [B, S, heads * D]
        sh["rope_bshd"] = Rope(
            g.op("Transpose", ctx.rope.cos, perm=[0, 2, 1, 3]), g.op("Transpose", ctx.rope.sin, perm=[0, 2, 1, 3]),
            ctx.rope.half, ctx.rope.interleaved,
        )
    rope = sh["rope_bshd"]
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
        sh["seqlens_k"], sh["total_len"], **attrs,
    )
    return linear(g, out, f"{p}.o_proj.weight"), present_k, present_v


def left_padding_to_right(g: GraphBuilder) -> tuple[str, str, Callable[[str], str]]:
    """Left-padded rows turned into right-padded ones for GroupQueryAttention, which reads each row's valid keys
    as cache positions [0, seqlens_k] (right padding) and rotates query s of a first prompt at position s.

    Each row of this step's ``input_ids`` / ``position_ids`` is rotated left by its count of leading zeros in the
    step's columns of ``attention_mask`` (ArgMax: the first 1; 0 for a right-padded, unpadded or decode row, where
    the rotation is the identity), so a left-padded prompt's tokens sit at 0..len-1 and its pads after them, as a
    right-padded prompt's do. Later steps need nothing: the op appends at seqlens_k = row sum - 1 either way, so
    the cache stays in that layout. Returns (ids, positions, unroll), ``unroll`` rotating a [B, S, H] hidden state
    back, so logits come out at the caller's positions (a pad position's logits are unspecified, as in
    transformers). A mask with holes (zeros after a 1 and before the last 1) is neither left nor right padding
    and is not supported."""
    seq = g.dim("input_ids", 1)  # [1]
    step_mask = g.op("Slice", "attention_mask", g.op("Neg", seq), g.const([np.iinfo(np.int64).max]), g.const([1]))
    lead = g.op("ArgMax", g.op("Cast", step_mask, to=6), axis=1, keepdims=1)  # [B, 1]: leading zeros (INT32 in)
    s = g.reshape(seq, g.const([], np.int64))
    cols = g.unsqueeze(g.op("Range", g.const(0), s, g.const(1)), [0])  # [1, S]
    fwd = g.op("Mod", g.op("Add", cols, lead), seq)  # [B, S]: source column of each rotated column
    back = g.op("Mod", g.op("Add", g.op("Sub", cols, lead), seq), seq)
    ids = g.op("GatherElements", "input_ids", fwd, axis=1)
    positions = g.op("GatherElements", "position_ids", fwd, axis=1)

    def unroll(h: str) -> str:
        idx = g.op("Expand", g.unsqueeze(back, [2]), g.op("Shape", h))
        return g.op("GatherElements", h, idx, axis=1)

    return ids, positions, unroll


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
    """The ATTENTION key for ``impl``: plain, contrib, or auto (contrib where onnxruntime has a fused kernel for
    the architecture's attention, plain otherwise). Raises UnsupportedError for an unavailable pair."""
    spec = arch_spec(cfg)
    if impl == "auto":
        impl = "contrib" if (spec.attention, "contrib") in ATTENTION_IMPLS else "plain"
    if (spec.attention, impl) not in ATTENTION_IMPLS:
        known = sorted(i for a, i in ATTENTION_IMPLS if a == spec.attention)
        raise UnsupportedError(f"attention `{impl}`: not available for {cfg['model_type']}; choose {', '.join(known)}")
    return ATTENTION_IMPLS[spec.attention, impl]


def build_decoder(cfg: dict, weights: WeightTable, attention: str = "auto") -> onnx.ModelProto:
    """The decoder graph of ``cfg``'s architecture over the initializers already in ``weights`` (by HF name).

    Inputs ``input_ids``/``position_ids`` [batch, sequence] and ``attention_mask`` [batch, total_sequence]
    int64, ``past_key_values.{i}.key/value`` float32 (cache shapes of the attention kind: [batch, kv_heads,
    past_sequence, head_dim] for GQA); outputs ``logits`` [batch, sequence, vocab] float32 and
    ``present.{i}.key/value`` [.., total_sequence, ..]. ``attention``: plain (standard ONNX ops, plus MatMulNBits /
    GatherBlockQuantized for quantized weights), contrib (onnxruntime's fused GroupQueryAttention and
    SkipSimplifiedLayerNormalization), or auto (contrib where available). Raises UnsupportedError for an architecture, activation, RoPE scaling or
    attention choice the exporter has no graph for, and for a weight the graph needs that ``weights`` lacks."""
    spec = arch_spec(cfg)
    impl = attention_kind(cfg, attention)
    attn_fn, cache_shapes = ATTENTION[impl][0](), ATTENTION[impl][1]
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

    ids, positions, unroll = "input_ids", "position_ids", None
    if impl == "gqa_contrib":
        ids, positions, unroll = left_padding_to_right(g)
    inv_freq, scaling = rotary(cfg, spec)
    rope = rope_tables(g, positions, inv_freq, scaling, spec.rope_interleaved(cfg))
    bias = attention_bias(g, "attention_mask", g.dim("past_key_values.0.key", 2), g.dim("input_ids", 1))
    ctx = Ctx(cfg, spec, rope, bias, eps, {"inv_freq": inv_freq, "rope_scaling": scaling,
                                           "mla_absorbed": attention != "plain"})
    # contrib: each residual add and the norm after it as one SkipSimplifiedLayerNormalization
    fused_norms = attention != "plain"

    def add_norm(x: str, y: str, weight: str) -> tuple[str, str]:
        if fused_norms:
            return skip_rms_norm(g, x, y, weight, eps)
        x = g.op("Add", x, y)
        return rms_norm(g, x, weight, eps), x

    x = embedding_lookup(g, "model.embed_tokens.weight", ids)
    h = rms_norm(g, x, "model.layers.0.input_layernorm.weight", eps)
    for i in range(n_layers):
        p = f"model.layers.{i}"
        attn, pk, pv = attn_fn(g, ctx, i, h, f"past_key_values.{i}.key", f"past_key_values.{i}.value")
        g.rename(pk, f"present.{i}.key")
        g.rename(pv, f"present.{i}.value")
        h, x = add_norm(x, attn, f"{p}.post_attention_layernorm.weight")
        nxt = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < n_layers else "model.norm.weight"
        h, x = add_norm(x, _dense_or_moe(g, ctx, i, h), nxt)
    if unroll is not None:
        h = unroll(h)
    g.rename(linear(g, h, "lm_head.weight"), "logits")

    nodes = g.live_nodes([o.name for o in outputs])
    used = {i for n in nodes for i in n.input}
    protos = [t for t in weights.sink.protos if t.name in used]  # small inline constants only the dropped nodes read
    graph = helper.make_graph(nodes, f"dsq_{cfg['model_type']}", inputs, outputs, protos)
    return helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="dsq",
    )
