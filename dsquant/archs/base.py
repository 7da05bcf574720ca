"""The architecture record: everything the pipeline needs to know about one ``model_type``, as data.

A record names facts by *kind* and strings only (GGUF architecture and hparam set, tensor transforms,
attention kind, transformers class names, AWQ groups as roles, onnxruntime-genai type, router kind and
scoring), so ``dsquant`` never imports gguf or onnx: each exporter keeps a table of mechanisms keyed by
those kinds (``tests/test_registries.py`` checks that every kind a record names exists there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from .roles import ROLES, Role, RoleInfo

# Role sets the records are built from.
COMMON = (Role.EMBED, Role.LM_HEAD, Role.OUTPUT_NORM, Role.ATTN_NORM, Role.FFN_NORM)
DENSE_ATTN = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O)
DENSE_MLP = (Role.MLP_GATE, Role.MLP_UP, Role.MLP_DOWN)
QKV_BIAS = (Role.ATTN_Q_BIAS, Role.ATTN_K_BIAS, Role.ATTN_V_BIAS)
QK_NORM = (Role.ATTN_Q_NORM, Role.ATTN_K_NORM)
MLA = (Role.MLA_Q_A, Role.MLA_Q_A_NORM, Role.MLA_Q_B, Role.MLA_KV_A, Role.MLA_KV_A_NORM, Role.MLA_KV_B)
ROUTED = (Role.ROUTER, Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)
SHARED = (Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN)
MTP = (Role.MTP_NORM, Role.MTP_PROJ, Role.MTP_EMBED, Role.MTP_HEAD)


@dataclass(frozen=True)
class AwqGroup:
    """Linears that read one input, and the op producing it (AWQ folds its scale into ``prev``).

    ``linears`` lists every reader of ``prev``'s output (those absent from a layer are ignored);
    ``when`` names a condition in ``calib.awq.CONDITIONS`` ("" = always).
    """

    prev: Role
    linears: tuple[Role, ...]
    when: str = ""


# AWQ groups of a Llama-style block (Lin et al. 2023's reference grouping): attention, then the dense MLP.
AWQ_ATTN = (
    AwqGroup(Role.ATTN_NORM, (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)),
    AwqGroup(Role.ATTN_V, (Role.ATTN_O,), "mha"),  # under GQA v rows are shared by several query heads
)
AWQ_DENSE = AWQ_ATTN + (
    AwqGroup(Role.FFN_NORM, (Role.MLP_GATE, Role.MLP_UP)),  # dense layers only (MoE layers lack them)
    AwqGroup(Role.MLP_UP, (Role.MLP_DOWN,)),
)


@dataclass(frozen=True)
class TensorRef:
    name: str
    role: Role
    layer: int | None = None
    expert: int | None = None

    @property
    def info(self) -> RoleInfo:
        return ROLES[self.role]


@dataclass(frozen=True)
class Architecture:
    """One architecture family member, by config.json ``model_type``.

    Every string field is a key into a mechanism table elsewhere (named beside it); ``roles`` says which
    tensors the model has (``roles.ROLES`` gives their HF names).
    """

    model_type: str  # config.json's model_type
    gguf_arch: str  # llama.cpp's LLM_ARCH name (general.architecture)
    roles: tuple[Role, ...]
    hf_classes: tuple[str, ...]  # transformers' *ForCausalLM class(es)
    decoder_layer: str  # transformers class running one block (calibration)
    rotary: str  # transformers rotary-embedding class (calibration, ONNX inv_freq)
    attention: str  # "gqa" | "mla": export.onnx_graph.ATTENTION / ATTENTION_IMPLS
    gguf_hparams: str  # export.gguf_meta.HPARAMS key: which hyper-parameter keys llama.cpp reads
    genai_type: str  # onnxruntime-genai model type (genai_config.json "type")
    awq_groups: tuple[AwqGroup, ...] = ()
    # role -> export.gguf_tensors.TRANSFORMS key applied before writing (llama's q/k RoPE row permutation)
    gguf_transforms: tuple[tuple[Role, str], ...] = ()
    # MoE routing: (config.json topk_method or None for "any") -> export.onnx_moe.ROUTERS key
    routers: tuple[tuple[str | None, str], ...] = ()
    scoring: str | None = None  # router scoring when config.json has no scoring_func (gguf_meta.GATING key)
    # MLX: roles mlx_lm splits and re-quantizes at load (written float); whether its rotary is always YaRN
    mlx_requantized: tuple[Role, ...] = ()
    mlx_yarn_rope: bool = False
    # config keys mlx_lm's ModelArgs requires under another name than transformers 5 writes: (mlx_lm key, HF key)
    mlx_keys: tuple[tuple[str, str], ...] = ()
    # mlx_lm's sanitize stacks only the routed experts' .weight (not scales/biases): the writer stacks quantized ones
    mlx_stack_experts: bool = False
    # transformers' registered tokenizer class for the type (tokenization_auto) where it changes behaviour, and
    # whether transformers uses it even over a declared tokenizer_class (its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
    hf_tokenizer: str | None = None
    hf_tokenizer_forced: bool = False
    notes: str = ""
    modeling: str = field(default="")  # transformers module; default transformers.models.<mt>.modeling_<mt>

    @property
    def hf_module(self) -> str:
        return self.modeling or f"transformers.models.{self.model_type}.modeling_{self.model_type}"

    @property
    def qkv_bias(self) -> bool:
        return Role.ATTN_Q_BIAS in self.roles

    @property
    def qk_norm(self) -> bool:
        return Role.ATTN_Q_NORM in self.roles

    @property
    def moe(self) -> bool:
        return Role.ROUTER in self.roles

    @property
    def transforms(self) -> dict[Role, str]:
        return dict(self.gguf_transforms)

    def router_kind(self, topk_method: str | None) -> str | None:
        """The router kind for a config's ``topk_method`` (None where the record routes one way only)."""
        table = dict(self.routers)
        return table.get(None, table.get(topk_method or "greedy"))

    @cached_property
    def _matchers(self) -> list[tuple[re.Pattern[str], Role]]:
        out = []
        for role in self.roles:
            for template in ROLES[role].names:
                pattern = re.escape(template).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
                out.append((re.compile(pattern + r"\Z"), role))
        return out

    def match(self, name: str) -> TensorRef | None:
        """The role (and block/expert index) of HF tensor ``name`` in this architecture, or None."""
        for pattern, role in self._matchers:
            m = pattern.match(name)
            if m:
                groups = m.groupdict()
                bid = int(groups["bid"]) if groups.get("bid") is not None else None
                xid = int(groups["xid"]) if groups.get("xid") is not None else None
                return TensorRef(name, role, bid, xid)
        return None
