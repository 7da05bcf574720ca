"""Qwen2 (DeepSeek-R1-Distill-Qwen), Qwen3 and Qwen3-MoE: GQA; Qwen2 adds q/k/v biases, Qwen3 per-head
q/k RMSNorm; Qwen3-MoE routes every (sparse) layer's tokens to top-k of its experts by softmax, no shared
experts."""

from __future__ import annotations

from .base import AWQ_ATTN, AWQ_DENSE, COMMON, DENSE_ATTN, DENSE_MLP, QK_NORM, QKV_BIAS, ROUTED, Architecture

QWEN2 = Architecture(
    model_type="qwen2",
    gguf_arch="qwen2",
    roles=COMMON + DENSE_ATTN + QKV_BIAS + DENSE_MLP,
    hf_classes=("Qwen2ForCausalLM",),
    decoder_layer="Qwen2DecoderLayer",
    rotary="Qwen2RotaryEmbedding",
    attention="gqa",
    gguf_hparams="dense",
    genai_type="qwen2",
    hf_tokenizer="Qwen2Tokenizer",
    hf_tokenizer_forced=True,
    awq_groups=AWQ_DENSE,
)

QWEN3 = Architecture(
    model_type="qwen3",
    gguf_arch="qwen3",
    roles=COMMON + DENSE_ATTN + QK_NORM + DENSE_MLP,
    hf_classes=("Qwen3ForCausalLM",),
    decoder_layer="Qwen3DecoderLayer",
    rotary="Qwen3RotaryEmbedding",
    attention="gqa",
    gguf_hparams="dense",
    genai_type="qwen3",
    hf_tokenizer="Qwen2Tokenizer",
    awq_groups=AWQ_DENSE,
)

QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    gguf_arch="qwen3moe",
    # every layer routed (mlp_only_layers empty, decoder_sparse_step 1, as in the released models): llama.cpp's
    # qwen3moe has no dense-MLP tensors
    roles=COMMON + DENSE_ATTN + QK_NORM + ROUTED,
    hf_classes=("Qwen3MoeForCausalLM",),
    decoder_layer="Qwen3MoeDecoderLayer",
    rotary="Qwen3MoeRotaryEmbedding",
    attention="gqa",
    gguf_hparams="dense_moe",
    genai_type="qwen3",
    hf_tokenizer="Qwen2Tokenizer",
    # routed experts: each down_proj's scale goes into its up_proj (moe_coverage); their gate/up inputs are not
    # scaled (the norm also feeds the router)
    awq_groups=AWQ_ATTN,
    routers=((None, "softmax_topk"),),
    scoring="softmax",
    mlx_keys=(("num_experts", "num_local_experts"),),  # transformers 5 writes num_local_experts
    mlx_stack_experts=True,  # mlx_lm's qwen3_moe sanitize stacks expert .weight only
)

RECORDS = (QWEN2, QWEN3, QWEN3_MOE)
