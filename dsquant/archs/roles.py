"""Tensor roles: what each HF tensor *is*, one table (in the spirit of gguf-py's ``TensorNameMap``).

``ROLES`` gives, per role, its kind (linear | embedding | norm | bias | router), the group recipes
address it by (attention, mla, mlp, experts, shared_experts, ...) and the HF name templates that carry
it; ``{bid}`` is the decoder block index and ``{xid}`` the routed-expert index. Architecture records
(``llama.py``, ``qwen.py``, ``deepseek.py``) say which roles a ``model_type`` has; every other stage
names tensors through this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
    names: tuple[str, ...] = ()  # HF tensor name templates ({bid}: block, {xid}: routed expert)


LAYER = "model.layers.{bid}."  # the prefix of every per-block name below
_L = LAYER

#: The one role table: kind, group and HF names. Recipes decide on role, kind or group; the report groups by them.
ROLES: dict[Role, RoleInfo] = {
    Role.EMBED: RoleInfo("embedding", "embedding", ("model.embed_tokens.weight",)),
    Role.LM_HEAD: RoleInfo("linear", "lm_head", ("lm_head.weight",)),
    Role.OUTPUT_NORM: RoleInfo("norm", "norm", ("model.norm.weight",)),
    Role.ATTN_NORM: RoleInfo("norm", "norm", (_L + "input_layernorm.weight",)),
    Role.FFN_NORM: RoleInfo("norm", "norm", (_L + "post_attention_layernorm.weight",)),
    Role.ATTN_Q: RoleInfo("linear", "attention", (_L + "self_attn.q_proj.weight",)),
    Role.ATTN_K: RoleInfo("linear", "attention", (_L + "self_attn.k_proj.weight",)),
    Role.ATTN_V: RoleInfo("linear", "attention", (_L + "self_attn.v_proj.weight",)),
    Role.ATTN_O: RoleInfo("linear", "attention", (_L + "self_attn.o_proj.weight",)),
    Role.ATTN_Q_BIAS: RoleInfo("bias", "attention", (_L + "self_attn.q_proj.bias",)),
    Role.ATTN_K_BIAS: RoleInfo("bias", "attention", (_L + "self_attn.k_proj.bias",)),
    Role.ATTN_V_BIAS: RoleInfo("bias", "attention", (_L + "self_attn.v_proj.bias",)),
    Role.ATTN_Q_NORM: RoleInfo("norm", "norm", (_L + "self_attn.q_norm.weight",)),
    Role.ATTN_K_NORM: RoleInfo("norm", "norm", (_L + "self_attn.k_norm.weight",)),
    Role.MLA_Q_A: RoleInfo("linear", "mla", (_L + "self_attn.q_a_proj.weight",)),
    Role.MLA_Q_A_NORM: RoleInfo("norm", "norm", (_L + "self_attn.q_a_layernorm.weight",)),
    Role.MLA_Q_B: RoleInfo("linear", "mla", (_L + "self_attn.q_b_proj.weight",)),
    Role.MLA_KV_A: RoleInfo("linear", "mla", (_L + "self_attn.kv_a_proj_with_mqa.weight",)),
    Role.MLA_KV_A_NORM: RoleInfo("norm", "norm", (_L + "self_attn.kv_a_layernorm.weight",)),
    Role.MLA_KV_B: RoleInfo("linear", "mla", (_L + "self_attn.kv_b_proj.weight",)),
    Role.MLP_GATE: RoleInfo("linear", "mlp", (_L + "mlp.gate_proj.weight",)),
    Role.MLP_UP: RoleInfo("linear", "mlp", (_L + "mlp.up_proj.weight",)),
    Role.MLP_DOWN: RoleInfo("linear", "mlp", (_L + "mlp.down_proj.weight",)),
    Role.ROUTER: RoleInfo("router", "router", (_L + "mlp.gate.weight",)),
    Role.ROUTER_BIAS: RoleInfo("bias", "router", (_L + "mlp.gate.e_score_correction_bias",)),
    Role.EXPERT_GATE: RoleInfo("linear", "experts", (_L + "mlp.experts.{xid}.gate_proj.weight",)),
    Role.EXPERT_UP: RoleInfo("linear", "experts", (_L + "mlp.experts.{xid}.up_proj.weight",)),
    Role.EXPERT_DOWN: RoleInfo("linear", "experts", (_L + "mlp.experts.{xid}.down_proj.weight",)),
    Role.SHARED_GATE: RoleInfo("linear", "shared_experts", (_L + "mlp.shared_experts.gate_proj.weight",)),
    Role.SHARED_UP: RoleInfo("linear", "shared_experts", (_L + "mlp.shared_experts.up_proj.weight",)),
    Role.SHARED_DOWN: RoleInfo("linear", "shared_experts", (_L + "mlp.shared_experts.down_proj.weight",)),
    Role.MTP_NORM: RoleInfo("norm", "mtp", (_L + "enorm.weight", _L + "hnorm.weight", _L + "shared_head.norm.weight")),
    Role.MTP_PROJ: RoleInfo("linear", "mtp", (_L + "eh_proj.weight",)),
    Role.MTP_EMBED: RoleInfo("embedding", "mtp", (_L + "embed_tokens.weight",)),
    Role.MTP_HEAD: RoleInfo("linear", "mtp", (_L + "shared_head.head.weight",)),
}

# Views of ROLES kept for the modules that read one column.
ROLE_INFO: dict[Role, RoleInfo] = ROLES
ROLE_NAMES: dict[Role, tuple[str, ...]] = {r: info.names for r, info in ROLES.items()}


def hf_name(role: Role, layer: int | None = None, expert: int | None = None) -> str:
    """The HF tensor name of ``role`` in block ``layer`` (routed expert ``expert``): its first template filled.

    Raises ValueError when the template needs a block or expert index that was not given.
    """
    template = ROLES[role].names[0]
    if ("{bid}" in template and layer is None) or ("{xid}" in template and expert is None):
        raise ValueError(f"role {role.value}: name `{template}` needs a block/expert index")
    return template.format(bid=layer, xid=expert)


def module_path(role: Role, expert: int | None = None) -> str:
    """The module that holds ``role``'s tensor, relative to its decoder layer (``self_attn.q_proj``,
    ``input_layernorm``): what transformers' ``<Arch>DecoderLayer.get_submodule`` takes.

    Raises ValueError for a role outside the decoder blocks (embeddings, lm_head, final norm).
    """
    template = ROLES[role].names[0]
    if not template.startswith(LAYER):
        raise ValueError(f"role {role.value} is not inside a decoder layer")
    local = template[len(LAYER):].rsplit(".", 1)[0]
    return local.format(xid=expert) if "{xid}" in local else local
