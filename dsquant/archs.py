"""Architecture tables: HF tensor name -> role, as data (in the spirit of gguf-py's ``TensorNameMap``).

``ROLE_NAMES`` lists, per role, the HF name templates that carry it; ``{bid}`` is the decoder block
index and ``{xid}`` the routed-expert index. ``ARCHITECTURES`` says which roles each ``model_type``
has. Adding an architecture is a row in ``ARCHITECTURES`` (and name rows if its names are new).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from .errors import UnsupportedError


class Role(str, Enum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    OUTPUT_NORM = "output_norm"
    ATTN_NORM = "attn_norm"
    FFN_NORM = "ffn_norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_Q_BIAS = "attn_q_bias"
    ATTN_K_BIAS = "attn_k_bias"
    ATTN_V_BIAS = "attn_v_bias"
    ATTN_Q_NORM = "attn_q_norm"
    ATTN_K_NORM = "attn_k_norm"
    MLA_Q_A = "mla_q_a"
    MLA_Q_A_NORM = "mla_q_a_norm"
    MLA_Q_B = "mla_q_b"
    MLA_KV_A = "mla_kv_a"
    MLA_KV_A_NORM = "mla_kv_a_norm"
    MLA_KV_B = "mla_kv_b"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    # DeepSeek-V3's multi-token-prediction block (layer num_hidden_layers): kept as shipped.
    MTP_NORM = "mtp_norm"
    MTP_PROJ = "mtp_proj"
    MTP_EMBED = "mtp_embed"
    MTP_HEAD = "mtp_head"


@dataclass(frozen=True)
class RoleInfo:
    kind: str  # linear | embedding | norm | bias | router
    group: str  # what recipes address as a family: attention, mla, mlp, experts, shared_experts, ...


# Per role: what it is. Recipes decide on role, kind or group; the report groups by them.
ROLE_INFO: dict[Role, RoleInfo] = {
    Role.EMBED: RoleInfo("embedding", "embedding"),
    Role.LM_HEAD: RoleInfo("linear", "lm_head"),
    Role.OUTPUT_NORM: RoleInfo("norm", "norm"),
    Role.ATTN_NORM: RoleInfo("norm", "norm"),
    Role.FFN_NORM: RoleInfo("norm", "norm"),
    Role.ATTN_Q: RoleInfo("linear", "attention"),
    Role.ATTN_K: RoleInfo("linear", "attention"),
    Role.ATTN_V: RoleInfo("linear", "attention"),
    Role.ATTN_O: RoleInfo("linear", "attention"),
    Role.ATTN_Q_BIAS: RoleInfo("bias", "attention"),
    Role.ATTN_K_BIAS: RoleInfo("bias", "attention"),
    Role.ATTN_V_BIAS: RoleInfo("bias", "attention"),
    Role.ATTN_Q_NORM: RoleInfo("norm", "norm"),
    Role.ATTN_K_NORM: RoleInfo("norm", "norm"),
    Role.MLA_Q_A: RoleInfo("linear", "mla"),
    Role.MLA_Q_A_NORM: RoleInfo("norm", "norm"),
    Role.MLA_Q_B: RoleInfo("linear", "mla"),
    Role.MLA_KV_A: RoleInfo("linear", "mla"),
    Role.MLA_KV_A_NORM: RoleInfo("norm", "norm"),
    Role.MLA_KV_B: RoleInfo("linear", "mla"),
    Role.MLP_GATE: RoleInfo("linear", "mlp"),
    Role.MLP_UP: RoleInfo("linear", "mlp"),
    Role.MLP_DOWN: RoleInfo("linear", "mlp"),
    Role.ROUTER: RoleInfo("router", "router"),
    Role.ROUTER_BIAS: RoleInfo("bias", "router"),
    Role.EXPERT_GATE: RoleInfo("linear", "experts"),
    Role.EXPERT_UP: RoleInfo("linear", "experts"),
    Role.EXPERT_DOWN: RoleInfo("linear", "experts"),
    Role.SHARED_GATE: RoleInfo("linear", "shared_experts"),
    Role.SHARED_UP: RoleInfo("linear", "shared_experts"),
    Role.SHARED_DOWN: RoleInfo("linear", "shared_experts"),
    Role.MTP_NORM: RoleInfo("norm", "mtp"),
    Role.MTP_PROJ: RoleInfo("linear", "mtp"),
    Role.MTP_EMBED: RoleInfo("embedding", "mtp"),
    Role.MTP_HEAD: RoleInfo("linear", "mtp"),
}

_L = "model.layers.{bid}."

# Per role: the HF tensor names that carry it (all architectures together, like TensorNameMap).
ROLE_NAMES: dict[Role, tuple[str, ...]] = {
    Role.EMBED: ("model.embed_tokens.weight",),
    Role.LM_HEAD: ("lm_head.weight",),
    Role.OUTPUT_NORM: ("model.norm.weight",),
    Role.ATTN_NORM: (_L + "input_layernorm.weight",),
    Role.FFN_NORM: (_L + "post_attention_layernorm.weight",),
    Role.ATTN_Q: (_L + "self_attn.q_proj.weight",),
    Role.ATTN_K: (_L + "self_attn.k_proj.weight",),
    Role.ATTN_V: (_L + "self_attn.v_proj.weight",),
    Role.ATTN_O: (_L + "self_attn.o_proj.weight",),
    Role.ATTN_Q_BIAS: (_L + "self_attn.q_proj.bias",),
    Role.ATTN_K_BIAS: (_L + "self_attn.k_proj.bias",),
    Role.ATTN_V_BIAS: (_L + "self_attn.v_proj.bias",),
    Role.ATTN_Q_NORM: (_L + "self_attn.q_norm.weight",),
    Role.ATTN_K_NORM: (_L + "self_attn.k_norm.weight",),
    Role.MLA_Q_A: (_L + "self_attn.q_a_proj.weight",),
    Role.MLA_Q_A_NORM: (_L + "self_attn.q_a_layernorm.weight",),
    Role.MLA_Q_B: (_L + "self_attn.q_b_proj.weight",),
    Role.MLA_KV_A: (_L + "self_attn.kv_a_proj_with_mqa.weight",),
    Role.MLA_KV_A_NORM: (_L + "self_attn.kv_a_layernorm.weight",),
    Role.MLA_KV_B: (_L + "self_attn.kv_b_proj.weight",),
    Role.MLP_GATE: (_L + "mlp.gate_proj.weight",),
    Role.MLP_UP: (_L + "mlp.up_proj.weight",),
    Role.MLP_DOWN: (_L + "mlp.down_proj.weight",),
    Role.ROUTER: (_L + "mlp.gate.weight",),
    Role.ROUTER_BIAS: (_L + "mlp.gate.e_score_correction_bias",),
    Role.EXPERT_GATE: (_L + "mlp.experts.{xid}.gate_proj.weight",),
    Role.EXPERT_UP: (_L + "mlp.experts.{xid}.up_proj.weight",),
    Role.EXPERT_DOWN: (_L + "mlp.experts.{xid}.down_proj.weight",),
    Role.SHARED_GATE: (_L + "mlp.shared_experts.gate_proj.weight",),
    Role.SHARED_UP: (_L + "mlp.shared_experts.up_proj.weight",),
    Role.SHARED_DOWN: (_L + "mlp.shared_experts.down_proj.weight",),
    Role.MTP_NORM: (_L + "enorm.weight", _L + "hnorm.weight", _L + "shared_head.norm.weight"),
    Role.MTP_PROJ: (_L + "eh_proj.weight",),
    Role.MTP_EMBED: (_L + "embed_tokens.weight",),
    Role.MTP_HEAD: (_L + "shared_head.head.weight",),
}

_DENSE_ATTN = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O)
_COMMON = (Role.EMBED, Role.LM_HEAD, Role.OUTPUT_NORM, Role.ATTN_NORM, Role.FFN_NORM)
_DENSE_MLP = (Role.MLP_GATE, Role.MLP_UP, Role.MLP_DOWN)
_QKV_BIAS = (Role.ATTN_Q_BIAS, Role.ATTN_K_BIAS, Role.ATTN_V_BIAS)
_MLA = (Role.MLA_Q_A, Role.MLA_Q_A_NORM, Role.MLA_Q_B, Role.MLA_KV_A, Role.MLA_KV_A_NORM, Role.MLA_KV_B)
_MOE = (
    Role.ROUTER,
    Role.ROUTER_BIAS,
    Role.EXPERT_GATE,
    Role.EXPERT_UP,
    Role.EXPERT_DOWN,
    Role.SHARED_GATE,
    Role.SHARED_UP,
    Role.SHARED_DOWN,
)
_MTP = (Role.MTP_NORM, Role.MTP_PROJ, Role.MTP_EMBED, Role.MTP_HEAD)


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    gguf_arch: str  # llama.cpp's LLM_ARCH name
    roles: tuple[Role, ...]
    # DeepSeek-V2-Lite has no q LoRA: its query is a plain q_proj (ATTN_Q), listed in roles above.
    notes: str = ""
    hf_classes: tuple[str, ...] = field(default=())

    @cached_property
    def _matchers(self) -> list[tuple[re.Pattern[str], Role]]:
        out = []
        for role in self.roles:
            for template in ROLE_NAMES[role]:
                pattern = re.escape(template).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
                out.append((re.compile(pattern + r"\Z"), role))
        return out

    def match(self, name: str) -> TensorRef | None:
        for pattern, role in self._matchers:
            m = pattern.match(name)
            if m:
                groups = m.groupdict()
                bid = int(groups["bid"]) if groups.get("bid") is not None else None
                xid = int(groups["xid"]) if groups.get("xid") is not None else None
                return TensorRef(name, role, bid, xid)
        return None


@dataclass(frozen=True)
class TensorRef:
    name: str
    role: Role
    layer: int | None = None
    expert: int | None = None

    @property
    def info(self) -> RoleInfo:
        return ROLE_INFO[self.role]


#: Every supported architecture, by config.json ``model_type``.
ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "llama", _COMMON + _DENSE_ATTN + _DENSE_MLP, hf_classes=("LlamaForCausalLM",)),
        Architecture(
            "qwen2", "qwen2", _COMMON + _DENSE_ATTN + _QKV_BIAS + _DENSE_MLP, hf_classes=("Qwen2ForCausalLM",)
        ),
        Architecture(
            "qwen3",
            "qwen3",
            _COMMON + _DENSE_ATTN + (Role.ATTN_Q_NORM, Role.ATTN_K_NORM) + _DENSE_MLP,
            hf_classes=("Qwen3ForCausalLM",),
        ),
        Architecture(
            "deepseek_v2",
            "deepseek2",
            _COMMON + (Role.ATTN_Q, Role.ATTN_O) + _MLA + _DENSE_MLP + _MOE,
            hf_classes=("DeepseekV2ForCausalLM",),
        ),
        Architecture(
            "deepseek_v3",
            "deepseek2",
            _COMMON + (Role.ATTN_Q, Role.ATTN_O) + _MLA + _DENSE_MLP + _MOE + _MTP,
            hf_classes=("DeepseekV3ForCausalLM",),
        ),
    )
}


def get_architecture(config: dict, source: str = "config.json") -> Architecture:
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedError(f"{source}: no `model_type`; is this a Hugging Face causal-LM checkpoint?")
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedError(
            f"{source}: architecture `{model_type}` is not supported; supported: {', '.join(ARCHITECTURES)}"
        ) from None
