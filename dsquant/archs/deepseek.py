"""DeepSeek-V2/V3: Multi-head Latent Attention, a dense first block(s), routed + shared experts; V3 adds
sigmoid group-limited routing with a score-correction bias, and a multi-token-prediction block."""

from __future__ import annotations

from .base import COMMON, DENSE_MLP, MLA, MTP, SHARED, Architecture, AwqGroup
from .roles import Role

_MOE = (Role.ROUTER, Role.ROUTER_BIAS, Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN) + SHARED
_ROLES = COMMON + (Role.ATTN_Q, Role.ATTN_O) + MLA + DENSE_MLP + _MOE
# DeepSeek-V2-Lite has no q LoRA: its query is a plain q_proj (ATTN_Q), listed above.

_AWQ = (
    # q_a_proj + kv_a_proj (V3) or q_proj + kv_a_proj (V2-Lite, no q LoRA) read the input norm.
    AwqGroup(Role.ATTN_NORM, (Role.MLA_Q_A, Role.ATTN_Q, Role.MLA_KV_A)),
    AwqGroup(Role.MLA_Q_A_NORM, (Role.MLA_Q_B,)),
    # kv_b reads the normed latent (kv_a_layernorm's output), never the rope part of kv_a.
    AwqGroup(Role.MLA_KV_A_NORM, (Role.MLA_KV_B,)),
    AwqGroup(Role.FFN_NORM, (Role.MLP_GATE, Role.MLP_UP)),  # dense layers only
    AwqGroup(Role.MLP_UP, (Role.MLP_DOWN,)),
    AwqGroup(Role.SHARED_UP, (Role.SHARED_DOWN,)),
)

_COMMON_FIELDS = dict(
    gguf_arch="deepseek2",
    attention="mla",
    gguf_hparams="mla_moe",
    # genai has no DeepSeek type; its generic decoder ("llama") drives our graph, whose MLA cache is laid out
    # as one KV head (see onnx_mla), so genai allocates and feeds back exactly the compressed latent.
    genai_type="llama",
    awq_groups=_AWQ,
)

DEEPSEEK_V2 = Architecture(
    model_type="deepseek_v2",
    roles=_ROLES,
    hf_classes=("DeepseekV2ForCausalLM",),
    decoder_layer="DeepseekV2DecoderLayer",
    rotary="DeepseekV2RotaryEmbedding",
    routers=(("greedy", "softmax_greedy"), ("group_limited_greedy", "softmax_group")),
    scoring="softmax",
    mlx_yarn_rope=True,  # mlx_lm's deepseek_v2 always builds its rotary embedding as YaRN
    **_COMMON_FIELDS,
)

DEEPSEEK_V3 = Architecture(
    model_type="deepseek_v3",
    roles=_ROLES + MTP,
    hf_classes=("DeepseekV3ForCausalLM",),
    decoder_layer="DeepseekV3DecoderLayer",
    rotary="DeepseekV3RotaryEmbedding",
    routers=((None, "sigmoid_group"),),  # V3 routes one way whatever topk_method says
    # transformers' V3 configs carry no scoring_func: the model type implies sigmoid
    scoring="sigmoid",
    mlx_requantized=(Role.MLA_KV_B,),  # mlx_lm splits kv_b_proj per head and re-runs mx.quantize on it
    **_COMMON_FIELDS,
)

RECORDS = (DEEPSEEK_V2, DEEPSEEK_V3)
