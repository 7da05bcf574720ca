"""config.json as one typed, resolved object: the hyper-parameters every stage reads, with one rule each.

``ModelConfig.from_dict(cfg)`` validates ``cfg`` against the schema (``schema.ConfigSchema``: strict
types and ranges, InputError naming the key) and resolves what configs spell several ways:

* ``head_dim``: config.json's ``head_dim`` when given (Qwen3), else ``hidden_size // num_attention_heads``;
* ``n_kv_heads``: ``num_key_value_heads``, or ``num_attention_heads`` (older Llama configs omit it: MHA);
* RoPE (:meth:`ModelConfig.rope`): ``rope_scaling`` (transformers 4) merged under ``rope_parameters``
  (transformers 5; its keys win), ``rope_theta`` from there or the top level (default 10000), ``rope_type``
  from ``rope_type`` or the older ``type`` (default ``"default"``);
* experts: ``n_routed_experts`` (DeepSeek), ``num_experts`` (Qwen-MoE) or ``num_local_experts`` (what
  transformers 5 writes for Qwen3-MoE and Mixtral); which layers are MoE (:meth:`ModelConfig.is_moe_layer`)
  from ``first_k_dense_replace`` (DeepSeek) or ``mlp_only_layers`` / ``decoder_sparse_step`` (Qwen-MoE).

The dict stays available as ``raw`` for keys a writer copies verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .errors import InputError
from .schema import ConfigSchema, validate


@dataclass(frozen=True)
class ModelConfig:
    """Resolved config.json. Sizes are counts (heads, layers, experts) or widths in elements."""

    raw: dict = field(repr=False)
    model_type: str | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None  # resolved (see module docstring); None without hidden_size/heads
    head_dim_given: bool = False  # config.json states head_dim (GGUF writes key/value length only then)
    vocab_size: int | None = None
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool = False
    # MoE
    n_experts: int = 0  # routed experts (0: dense)
    n_shared_experts: int = 0
    experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool | None = None
    scoring_func: str | None = None
    topk_method: str | None = None
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        """Validate and resolve ``cfg`` (a parsed config.json).

        Raises InputError naming ``source`` and the key when a field has the wrong type or range
        (the checks of ``schema.ConfigSchema``); missing fields stay None (stages that need one say so).
        """
        s = validate(ConfigSchema, cfg, source, InputError)
        heads = s.num_attention_heads
        head_dim = s.head_dim or (s.hidden_size // heads if s.hidden_size and heads else None)
        experts = s.n_routed_experts or s.num_experts or s.num_local_experts or 0
        return cls(
            raw=cfg,
            model_type=s.model_type,
            hidden_size=s.hidden_size,
            intermediate_size=s.intermediate_size,
            n_layers=s.num_hidden_layers,
            n_heads=heads,
            n_kv_heads=s.num_key_value_heads or heads,
            head_dim=head_dim,
            head_dim_given=s.head_dim is not None,
            vocab_size=s.vocab_size,
            rms_norm_eps=s.rms_norm_eps,
            tie_word_embeddings=bool(s.tie_word_embeddings),
            n_experts=experts,
            n_shared_experts=s.n_shared_experts or 0,
            experts_per_tok=s.num_experts_per_tok,
            moe_intermediate_size=s.moe_intermediate_size,
            first_k_dense_replace=s.first_k_dense_replace or 0,
            decoder_sparse_step=s.decoder_sparse_step or 1,
            mlp_only_layers=tuple(s.mlp_only_layers or ()),
            norm_topk_prob=s.norm_topk_prob,
            scoring_func=s.scoring_func,
            topk_method=s.topk_method,
            q_lora_rank=s.q_lora_rank,
            kv_lora_rank=s.kv_lora_rank,
            qk_nope_head_dim=s.qk_nope_head_dim,
            qk_rope_head_dim=s.qk_rope_head_dim,
            v_head_dim=s.v_head_dim,
        )

    @cached_property
    def rope(self) -> dict[str, Any]:
        """RoPE settings, one merge rule: ``rope_scaling`` under ``rope_parameters``; always has
        ``rope_theta`` (float) and ``rope_type`` (str); scaling keys (factor, original_max_position_embeddings,
        beta_fast, mscale_all_dim, low_freq_factor, ...) as the config spells them."""
        cfg = self.raw
        rope = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
        return rope

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` (0-based) has routed experts rather than a dense MLP."""
        if not self.n_experts or i < self.first_k_dense_replace or i in self.mlp_only_layers:
            return False
        return (i + 1) % self.decoder_sparse_step == 0

