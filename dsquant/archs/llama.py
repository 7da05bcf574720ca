"""Llama (and the DeepSeek-R1-Distill-Llama models, SmolLM2): GQA, SwiGLU, no biases."""

from __future__ import annotations

from .base import AWQ_DENSE, COMMON, DENSE_ATTN, DENSE_MLP, Architecture
from .roles import Role

LLAMA = Architecture(
    model_type="llama",
    gguf_arch="llama",
    roles=COMMON + DENSE_ATTN + DENSE_MLP,
    hf_classes=("LlamaForCausalLM",),
    decoder_layer="LlamaDecoderLayer",
    rotary="LlamaRotaryEmbedding",
    attention="gqa",
    gguf_hparams="dense",
    genai_type="llama",
    awq_groups=AWQ_DENSE,
    # llama.cpp's converter interleaves q/k rows per head (LlamaModel.permute); Qwen keeps HF's layout.
    gguf_transforms=((Role.ATTN_Q, "permute_q"), (Role.ATTN_K, "permute_k")),
)

RECORDS = (LLAMA,)
