"""DeepSeek-V2/V3 Multi-head Latent Attention from standard ops, caching the compressed latent.

Per token the cache holds what transformers' ``DeepseekV3Attention`` caches (``past_key_values.update(kv_nope,
k_rot)``): the RMS-normed latent ``c_kv`` [kv_lora_rank] followed by the RoPE'd shared key ``k_pe``
[qk_rope_head_dim], i.e. kv_lora_rank + qk_rope_head_dim values per token and layer (576 for V3) instead of
heads * (qk_head_dim + v_head_dim) for full K/V (40960 for V3). That latent row is stored split in two equal
halves as ``present.{i}.key`` and ``present.{i}.value`` ([batch, 1, T, (rank + rope) / 2] each): the two-tensor,
one-head cache onnxruntime-genai's generic decoder allocates and feeds back, with no padding bytes.

Each step up-projects the whole latent cache with ``kv_b_proj`` (the "naive" MLA form, as transformers'
``expand_kv``), keeping kv_b_proj's dsq integers in MatMulNBits; scores are q_nope.k_nope + q_pe.k_pe with
k_pe broadcast over heads, so no K copy with the rope part repeated per head is built.
"""

from __future__ import annotations

import math

import numpy as np

from ..dsquant.config import ModelConfig
from .onnx_graph import Ctx
from .onnx_ops import GraphBuilder, apply_rope, linear, rms_norm


def _split(cfg: dict) -> tuple[int, int]:
    width = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    return (width + 1) // 2, width


def mla_cache(cfg: dict) -> tuple[list, list]:
    half, width = _split(cfg)
    return (["batch_size", 1, "past_sequence_length", half], ["batch_size", 1, "past_sequence_length", width - half])


def mla_scale(cfg: dict) -> float:
    """Softmax scale: qk_head_dim^-0.5, times mscale^2 under YaRN (transformers' ``yarn_apply_mscale``)."""
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rope = ModelConfig.from_dict(cfg).rope
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        factor = rope["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def mla_attention(g: GraphBuilder, ctx: Ctx, i: int, x: str, past_k: str, past_v: str) -> tuple[str, str, str]:
    cfg, p, eps = ctx.cfg, f"model.layers.{i}.self_attn", ctx.eps
    n_heads, nope, rope_d = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    rank, v_dim = cfg["kv_lora_rank"], cfg["v_head_dim"]

    if cfg.get("q_lora_rank"):
        q = linear(g, rms_norm(g, linear(g, x, f"{p}.q_a_proj.weight"), f"{p}.q_a_layernorm.weight", eps),
                   f"{p}.q_b_proj.weight")
    else:  # DeepSeek-V2-Lite: a plain q_proj
        q = linear(g, x, f"{p}.q_proj.weight")
    q = g.op("Transpose", g.reshape(q, [0, 0, n_heads, nope + rope_d]), perm=[0, 2, 1, 3])  # [B, H, S, nope + rope]
    q_nope, q_pe = g.slice(q, 0, nope), apply_rope(g, g.slice(q, nope, nope + rope_d), ctx.rope)

    ckv = g.unsqueeze(linear(g, x, f"{p}.kv_a_proj_with_mqa.weight"), [1])  # [B, 1, S, rank + rope]
    latent = rms_norm(g, g.slice(ckv, 0, rank), f"{p}.kv_a_layernorm.weight", eps)
    k_pe = apply_rope(g, g.slice(ckv, rank, rank + rope_d), ctx.rope)
    row = g.op("Concat", latent, k_pe, axis=-1)  # [B, 1, S, rank + rope]
    half, width = _split(cfg)
    present_k = g.op("Concat", past_k, g.slice(row, 0, half), axis=2)
    present_v = g.op("Concat", past_v, g.slice(row, half, width), axis=2)
    cache = g.op("Concat", present_k, present_v, axis=-1)  # [B, 1, T, rank + rope]
    k_pe_all = g.slice(cache, rank, width)

    kv = linear(g, g.op("Squeeze", g.slice(cache, 0, rank), g.const([1])), f"{p}.kv_b_proj.weight")
    # kv: [B, T, H * (nope + v)]
    kv = g.op("Transpose", g.reshape(kv, [0, 0, n_heads, nope + v_dim]), perm=[0, 2, 1, 3])  # [B, H, T, nope + v]
    k_nope, v = g.slice(kv, 0, nope), g.slice(kv, nope, nope + v_dim)

    scores = g.op(
        "Add",
        g.op("MatMul", q_nope, g.op("Transpose", k_nope, perm=[0, 1, 3, 2])),
        g.op("MatMul", q_pe, g.op("Transpose", k_pe_all, perm=[0, 1, 3, 2])),  # broadcast over heads
    )
    scores = g.op("Add", g.op("Mul", scores, g.const(mla_scale(cfg), np.float32)), ctx.bias)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B, H, S, v]
    out = g.reshape(g.op("Transpose", out, perm=[0, 2, 1, 3]), [0, 0, n_heads * v_dim])
    return linear(g, out, f"{p}.o_proj.weight"), present_k, present_v
