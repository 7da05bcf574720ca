"""Hyper-parameters for GGUF, read from config.json (keys as llama.cpp's loaders read them).

Which config.json field feeds which GGUF key is data (``COMMON``, ``MLA_MOE``; ``HPARAMS`` by the record's kind); a field
llama.cpp needs that the config lacks is an error naming it. Facts follow llama.cpp's converter
(``TextModel.set_gguf_parameters``, ``DeepseekV2Model.set_gguf_parameters``) and loader
(``src/models/deepseek2.cpp``), with two deliberate differences for DeepSeek:

* ``expert_gating_func`` is always written. Without it llama.cpp falls back to softmax, which is wrong
  for V3's sigmoid router (V3 configs from transformers carry no ``scoring_func``: the model type implies it).
* ``q_lora_rank`` is written as 0 when the model has no q LoRA (V2-Lite): llama.cpp only skips that key
  for models whose layer count it recognises as "lite".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from gguf import ExpertGatingFuncType, GGUFWriter, RopeScalingType

from dsq.dsquant.archs import Architecture, get_architecture
from dsq.dsquant.config import ModelConfig
from dsq.dsquant.errors import UnsupportedError

# (GGUFWriter method, config.json fields tried in order). All required.
COMMON: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("add_context_length", ("max_position_embeddings",)),
    ("add_embedding_length", ("hidden_size",)),
    ("add_block_count", ("num_hidden_layers",)),
    ("add_feed_forward_length", ("intermediate_size",)),
    ("add_head_count", ("num_attention_heads",)),
    ("add_layer_norm_rms_eps", ("rms_norm_eps",)),
    ("add_vocab_size", ("vocab_size",)),
)
MLA_MOE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("add_leading_dense_block_count", ("first_k_dense_replace",)),
    ("add_kv_lora_rank", ("kv_lora_rank",)),
    ("add_expert_feed_forward_length", ("moe_intermediate_size",)),
    ("add_expert_count", ("n_routed_experts",)),
    ("add_expert_used_count", ("num_experts_per_tok",)),
    ("add_expert_shared_count", ("n_shared_experts",)),
    ("add_rope_dimension_count", ("qk_rope_head_dim",)),
)
# Optional MoE routing fields: (method, field, cast).
MOE_OPTIONAL: tuple[tuple[str, str, Callable], ...] = (
    ("add_expert_group_count", "n_group", int),
    ("add_expert_group_used_count", "topk_group", int),
    ("add_expert_weights_scale", "routed_scaling_factor", float),
    ("add_expert_weights_norm", "norm_topk_prob", bool),
)
# Router scoring functions llama.cpp knows (a record's ``scoring`` and config.json's scoring_func are keys).
GATING = {"softmax": ExpertGatingFuncType.SOFTMAX, "sigmoid": ExpertGatingFuncType.SIGMOID}


def need(cfg: dict, keys: tuple[str, ...], source: str = "config.json"):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    raise UnsupportedError(f"{source}: missing `{keys[0]}`, which the GGUF metadata needs")


def rope_params(cfg: dict) -> dict:
    """RoPE settings by ``ModelConfig.rope``'s one merge rule (``rope_parameters`` over ``rope_scaling``)."""
    return ModelConfig.from_dict(cfg).rope


def head_dim(cfg: dict) -> int:
    """Per-head width (elements): config.json's head_dim, else hidden_size // num_attention_heads."""
    return int(ModelConfig.from_dict(cfg).head_dim)


def add_rope(w: GGUFWriter, cfg: dict, arch: str) -> list[tuple[str, np.ndarray]]:
    """RoPE base and scaling keys; returns extra tensors (llama3-style ``rope_freqs``)."""
    rope = rope_params(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "default":
        return []
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(need(rope, ("factor",), "config.json rope_scaling")))
        return []
    if kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(need(rope, ("factor",), "config.json rope_scaling")))
        w.add_rope_scaling_orig_ctx_len(int(need(rope, ("original_max_position_embeddings",), "config.json rope_scaling")))
        for method, key in (("add_rope_scaling_yarn_beta_fast", "beta_fast"), ("add_rope_scaling_yarn_beta_slow", "beta_slow")):
            if rope.get(key) is not None:
                getattr(w, method)(float(rope[key]))
        if arch == "deepseek2" and rope.get("mscale_all_dim") is not None:
            # llama.cpp divides this by 0.1 again when loading deepseek2 (its [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]).
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
        return []
    if kind == "llama3":
        return [("rope_freqs.weight", llama3_rope_factors(cfg, rope))]
    raise UnsupportedError(f"config.json: rope scaling type `{kind}` has no GGUF equivalent dsq writes")


def llama3_rope_factors(cfg: dict, rope: dict) -> np.ndarray:
    """Llama-3.1's per-frequency RoPE divisors, as llama.cpp's converter stores them in ``rope_freqs``."""
    dim = head_dim(cfg)
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _dense(w: GGUFWriter, cfg: dict, arch: Architecture) -> None:
    conf = ModelConfig.from_dict(cfg)
    w.add_head_count_kv(int(conf.n_kv_heads))
    w.add_rope_dimension_count(int(conf.head_dim))
    if conf.head_dim_given:
        w.add_key_length(int(conf.head_dim))
        w.add_value_length(int(conf.head_dim))


def _gating(cfg: dict, arch: Architecture) -> ExpertGatingFuncType:
    scoring = cfg.get("scoring_func") or arch.scoring or "softmax"
    if scoring not in GATING:
        raise UnsupportedError(f"config.json: scoring_func `{scoring}` has no llama.cpp gating function")
    return GATING[scoring]


def _dense_moe(w: GGUFWriter, cfg: dict, arch: Architecture) -> None:
    """GQA attention with routed experts (Qwen3-MoE): llama.cpp's ``Qwen2MoeModel.set_gguf_parameters``.

    llama.cpp's qwen3moe graph always renormalises the top-k weights (``build_moe_ffn(..., norm_w=true)``);
    a config with ``norm_topk_prob: false`` would run differently there, so it is refused."""
    _dense(w, cfg, arch)
    conf = ModelConfig.from_dict(cfg)
    if conf.norm_topk_prob is False:
        raise UnsupportedError(
            f"config.json: norm_topk_prob is false, but llama.cpp's {arch.gguf_arch} always renormalises the "
            "top-k expert weights; this model has no GGUF equivalent"
        )
    w.add_expert_count(int(need(cfg, ("n_routed_experts", "num_experts", "num_local_experts"))))
    w.add_expert_used_count(int(need(cfg, ("num_experts_per_tok",))))
    w.add_expert_feed_forward_length(int(need(cfg, ("moe_intermediate_size",))))


def _mla_moe(w: GGUFWriter, cfg: dict, arch: Architecture) -> None:
    # MLA runs as MQA over the compressed latent: one kv head of kv_lora + rope width (llama.cpp's layout).
    w.add_head_count_kv(1)
    for method, keys in MLA_MOE:
        getattr(w, method)(int(need(cfg, keys)))
    w.add_q_lora_rank(int(cfg.get("q_lora_rank") or 0))
    kv_lora, rope_dim = int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"])
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(int(need(cfg, ("qk_nope_head_dim",))) + rope_dim)
    w.add_value_length_mla(int(need(cfg, ("v_head_dim",))))
    for method, key, cast in MOE_OPTIONAL:
        if cfg.get(key) is not None:
            getattr(w, method)(cast(cfg[key]))
    w.add_expert_gating_func(_gating(cfg, arch))


# A record's ``gguf_hparams`` kind -> the writer of the keys llama.cpp's loader reads for it.
HPARAMS: dict[str, Callable[[GGUFWriter, dict, Architecture], None]] = {
    "dense": _dense,
    "dense_moe": _dense_moe,
    "mla_moe": _mla_moe,
}


def add_hparams(w: GGUFWriter, cfg: dict, arch: str) -> list[tuple[str, np.ndarray]]:
    """Write every hyper-parameter key of ``cfg`` (config.json) for GGUF architecture ``arch``, by the set its
    record names (``Architecture.gguf_hparams``); returns extra tensors the metadata implies (name, float32
    array), e.g. llama3's ``rope_freqs``.

    Raises UnsupportedError naming the config key llama.cpp needs and the config lacks, a model_type without a
    record, or a setting (scoring function, rope type) with no GGUF equivalent."""
    rec = get_architecture(cfg)
    if rec.gguf_arch != arch:
        raise UnsupportedError(f"config.json: model_type `{rec.model_type}` is GGUF `{rec.gguf_arch}`, not `{arch}`")
    for method, keys in COMMON:
        value = need(cfg, keys)
        getattr(w, method)(float(value) if method == "add_layer_norm_rms_eps" else int(value))
    HPARAMS[rec.gguf_hparams](w, cfg, rec)
    return add_rope(w, cfg, arch)
