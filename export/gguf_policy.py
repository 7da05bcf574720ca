"""llama.cpp's per-tensor type policy (``llama-quantize``'s file types, "mixes"), written as data.

``llama_model_quantize`` (src/llama-quant.cpp: ``llama_tensor_get_type_impl``, ``use_more_bits``,
``tensor_type_fallback``) does not put every tensor of a "Q4_K_M" file in Q4_K: the output matrix gets Q6_K,
attn_v and ffn_down of some layers get more bits, 8-expert models bump attention, and rows that are not
whole blocks of the chosen type fall back to a smaller-block type. A user asking dsq for ``--type q4_k_m``
expects that file. This module holds the same decisions as tables:

* ``MIXES``: per llama.cpp file type, its default tensor type and an ordered rule list per tensor kind
  (first matching rule wins, like llama.cpp's else-if chain for that file type);
* ``OUTPUT_RULES``: the output matrix (and a tied token embedding, which is also the output matrix);
* ``POST_RULES``: the overrides llama.cpp applies after the chain (70B attn_v, 8-expert attn_v/attn_k);
* ``FALLBACK``: the type used when rows are not whole blocks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, ...),
  F16 when even that does not fit.

Conditions are named predicates over a tensor's position (``PREDICATES``): ``more_bits`` is llama.cpp's
``use_more_bits(i, n)`` = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2; for attn_v-like tensors i counts them in
llama.cpp's tensor order (layer, then name) and n is their number; for ffn_down/gate/up i is the layer (the
count of such tensors seen so far for dense models, the layer in the name for MoE) and n the block count.

Names follow ``llama-quantize``: ``q4_k`` is its alias for Q4_K_M (likewise q3_k -> Q3_K_M, q5_k -> Q5_K_M).
Not covered: the IQ mixes, TQ, MXFP4 and Q2_K_S (which needs an importance matrix), and Falcon's own branches
(dsq writes no Falcon). The ``imatrix`` predicate is llama.cpp's rule for when an importance matrix is given;
dsq's export does not pass one yet. Tested tensor by tensor against llama.cpp's own quantizer
(tests/test_gguf_policy.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as GT

from dsq.dsquant.config import ModelConfig

# -- tensor kinds, from GGUF names, in llama.cpp's order of tests (tensor_get_category) ----------------
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("attn_qkv.weight", "attn_v"),  # llama.cpp treats fused qkv and MLA's kv_b like attn_v
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),  # also ffn_up_exps / ffn_up_shexp
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)
_LAYER = re.compile(r"^blk\.(\d+)\.")


def tensor_kind(name: str) -> str:
    """llama.cpp's category of a GGUF tensor name: output, token_embd, attn_v, attn_k, ..., other."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((kind for pattern, kind in _KIND_PATTERNS if pattern in name), "other")


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the tensors dsq writes: 2-D/3-D weights, not norms or the
    MoE router (those keep the type they have in the input file)."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules read from the model besides the tensor list."""

    arch: str  # GGUF architecture (llama, qwen2, deepseek2, ...)
    n_layer: int  # block count
    n_head: int
    n_head_kv: int
    n_expert: int = 0  # routed experts (0 for dense models)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 1

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B: an 80-layer Llama with grouped-query attention, or an 80-layer Qwen2."""
        if self.n_layer != 80:
            return False
        return (self.arch == "llama" and self.n_expert != 8 and self.n_head != self.n_head_kv) or self.arch == "qwen2"

    @classmethod
    def from_config(cls, gguf_arch: str, cfg: dict) -> ModelFacts:
        """Facts of config.json ``cfg`` for GGUF architecture ``gguf_arch`` (kv heads and experts as
        ``ModelConfig`` resolves them). Raises KeyError for a config without num_hidden_layers/num_attention_heads."""
        conf = ModelConfig.from_dict(cfg)
        return cls(gguf_arch, int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"]), int(conf.n_kv_heads),
                   conf.n_experts)


@dataclass(frozen=True)
class Where:
    """A tensor's place, as the predicates see it."""

    i: int  # position (see module docstring)
    n: int
    facts: ModelFacts
    imatrix: bool


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


PREDICATES: dict[str, Callable[[Where], bool]] = {
    "more_bits": lambda w: use_more_bits(w.i, w.n),
    "first_eighth": lambda w: w.i < w.n // 8,
    "first_sixteenth": lambda w: w.i < w.n // 16,
    "first_2": lambda w: w.i < 2,
    "first_4": lambda w: w.i < 4,
    "gqa_4": lambda w: w.facts.n_gqa >= 4,
    "experts_8": lambda w: w.facts.n_expert == 8,
    "is_70b": lambda w: w.facts.is_70b,
    "imatrix": lambda w: w.imatrix,
}

# A rule: (conditions, all of which must hold; the type to use, or None for "stop here, keep the default").
Rule = tuple[tuple[str, ...], "GT | None"]
ALWAYS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mix:
    """One llama.cpp file type: default tensor type and rules per tensor kind."""

    name: str  # llama-quantize's name
    file_type: LlamaFileType
    default: GT
    rules: dict[str, tuple[Rule, ...]] = field(default_factory=dict)


_EXPERT8_ATTN_OUT = {"attn_output": ((("experts_8",), GT.Q5_K),)}

MIXES: dict[str, Mix] = {m.name.lower(): m for m in (
    Mix("Q4_0", LlamaFileType.MOSTLY_Q4_0, GT.Q4_0, {"ffn_down": ((("first_eighth", "imatrix"), GT.Q4_1),)}),
    Mix("Q4_1", LlamaFileType.MOSTLY_Q4_1, GT.Q4_1),
    Mix("Q5_0", LlamaFileType.MOSTLY_Q5_0, GT.Q5_0, {"ffn_down": ((("first_eighth", "imatrix"), GT.Q5_1),)}),
    Mix("Q5_1", LlamaFileType.MOSTLY_Q5_1, GT.Q5_1),
    Mix("Q8_0", LlamaFileType.MOSTLY_Q8_0, GT.Q8_0),
    Mix("Q2_K", LlamaFileType.MOSTLY_Q2_K, GT.Q2_K, {
        "attn_v": ((("gqa_4",), GT.Q4_K), (ALWAYS, GT.Q3_K)),
        "ffn_down": ((ALWAYS, GT.Q3_K),),
        "attn_output": ((("experts_8",), GT.Q5_K), (ALWAYS, GT.Q3_K)),
    }),
    Mix("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, GT.Q3_K, _EXPERT8_ATTN_OUT),
    Mix("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, GT.Q3_K, {
        "attn_v": ((("first_2",), GT.Q5_K), (ALWAYS, GT.Q4_K)),
        "ffn_down": ((("first_sixteenth",), GT.Q5_K), (ALWAYS, GT.Q4_K)),
        "attn_output": ((("experts_8",), GT.Q5_K), (ALWAYS, GT.Q4_K)),
    }),
    Mix("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, GT.Q3_K, {
        "attn_v": ((ALWAYS, GT.Q5_K),),
        "ffn_down": ((ALWAYS, GT.Q5_K),),
        "attn_output": ((("experts_8",), None), (ALWAYS, GT.Q5_K)),  # 8 experts: Q3_K_L is not in that list
    }),
    Mix("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, GT.Q4_K, {
        "attn_v": ((("first_4",), GT.Q5_K),),
        "ffn_down": ((("first_eighth",), GT.Q5_K),),
        **_EXPERT8_ATTN_OUT,
    }),
    Mix("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, GT.Q4_K, {
        "attn_v": ((("more_bits",), GT.Q6_K),),
        "ffn_down": ((("more_bits",), GT.Q6_K),),
        **_EXPERT8_ATTN_OUT,
    }),
    Mix("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, GT.Q5_K),
    Mix("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, GT.Q5_K, {
        "attn_v": ((("more_bits",), GT.Q6_K),),
        "ffn_down": ((("more_bits",), GT.Q6_K),),
    }),
    Mix("Q6_K", LlamaFileType.MOSTLY_Q6_K, GT.Q6_K),
)}

#: llama-quantize's aliases: a bare K type means its _M mix.
ALIASES: dict[str, str] = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}

# Applied after the mix's rules, in order, each on the type reached so far: (kind, conditions, only when the
# type is one of these (None: any), new type). llama.cpp: the 70B attn_v bump and the 8-expert Q8_0 bumps.
POST_RULES: tuple[tuple[str, tuple[str, ...], frozenset[GT] | None, GT], ...] = (
    ("attn_v", ("is_70b",), frozenset({GT.Q3_K, GT.Q4_K}), GT.Q5_K),
    ("attn_v", ("experts_8",), None, GT.Q8_0),
    ("attn_k", ("experts_8",), None, GT.Q8_0),
)

# The output matrix (and a tied token embedding): Q8_0 when rows are not whole blocks of the default type or
# the default is Q8_0, Q6_K otherwise. Conditions here read the default type and the row length.
OUTPUT_RULES: tuple[tuple[str, GT], ...] = (
    ("rows_not_whole_default_blocks", GT.Q8_0),
    ("default_is_q8_0", GT.Q8_0),
    ("always", GT.Q6_K),
)

#: llama.cpp's tensor_type_fallback for rows that are not whole blocks of the chosen type.
FALLBACK: dict[GT, GT] = {
    GT.Q2_K: GT.Q4_0, GT.Q3_K: GT.Q4_0, GT.TQ1_0: GT.Q4_0, GT.TQ2_0: GT.Q4_0,
    GT.Q4_K: GT.Q5_0, GT.Q5_K: GT.Q5_1, GT.Q6_K: GT.Q8_0,
    GT.IQ1_S: GT.IQ4_NL, GT.IQ1_M: GT.IQ4_NL, GT.IQ2_XXS: GT.IQ4_NL, GT.IQ2_XS: GT.IQ4_NL,
    GT.IQ2_S: GT.IQ4_NL, GT.IQ3_XXS: GT.IQ4_NL, GT.IQ3_S: GT.IQ4_NL, GT.IQ4_XS: GT.IQ4_NL,
}


# The float file types llama-quantize also takes (every 2-D weight cast, no policy).
FLOAT_TYPES = (GT.F16, GT.BF16, GT.F32)


def _type_names() -> tuple[str, ...]:
    """What ``--type`` accepts, in llama-quantize's order: each mix, an alias just before the mixes it stands
    among (q4_k before q4_k_s, q4_k_m), then the float types."""
    names: list[str] = []
    for mix in MIXES:
        names += [a for a in ALIASES if mix.startswith(a + "_") and a not in names]
        names.append(mix)
    return (*names, *(t.name.lower() for t in FLOAT_TYPES))


#: What ``--type`` accepts and the CLI lists (torch-free, so ``dsq --help`` reads it from here).
TYPE_NAMES: tuple[str, ...] = _type_names()


def block_of(t: GT) -> int:
    return GGML_QUANT_SIZES[t][0]


def get_mix(name: str) -> Mix | None:
    """The mix for a --type name (aliases resolved), None if it is not one."""
    key = name.lower()
    return MIXES.get(ALIASES.get(key, key))


@dataclass(frozen=True)
class Choice:
    type: GT
    why: str  # which rule chose it, for the report


def _weight_order(name: str) -> tuple[int, str]:
    """llama.cpp visits tensors sorted by layer (non-layer tensors first), then by name."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def _first(rules: Iterable[Rule], where: Where) -> tuple[bool, GT | None, str]:
    for conds, t in rules:
        if all(PREDICATES[c](where) for c in conds):
            return True, t, " & ".join(conds) or "always"
    return False, None, ""


def _fit(t: GT, row: int, why: str) -> Choice:
    """llama.cpp's fallback when ``row`` is not whole blocks of ``t``."""
    if row % block_of(t) == 0:
        return Choice(t, why)
    fb = FALLBACK.get(t)
    if fb is not None and row % block_of(fb) == 0:
        return Choice(fb, f"{why}; rows of {row} are not whole blocks of {block_of(t)}: {t.name} -> {fb.name}")
    # llama.cpp goes to F16 when the fallback does not fit either, and refuses types with no fallback
    # (block-32 types); dsq writes F16 in both cases.
    return Choice(GT.F16, f"{why}; rows of {row} are not whole blocks of {block_of(t)}: {t.name} -> F16")


def plan_types(mix: Mix, tensors: list[tuple[str, tuple[int, ...]]], facts: ModelFacts,
               imatrix: bool = False, pure: bool = False) -> dict[str, Choice]:
    """llama.cpp's type for every quantizable tensor of a model under ``mix``.

    ``tensors``: (GGUF name, shape in numpy order, rows last) for every tensor of the file; the ones llama.cpp
    does not quantize (norms, biases, 1-D tensors, the MoE router) are absent from the result (they keep their
    input type). ``pure``: llama-quantize --pure, the default type everywhere (fallbacks still apply).
    """
    names = {n for n, _ in tensors}
    tied = "output.weight" not in names
    order = sorted((n for n, s in tensors if is_quantizable(n, s)), key=_weight_order)
    shapes = dict(tensors)
    n_attn_v = sum(tensor_kind(n) == "attn_v" for n in order)
    seen: dict[str, int] = {}
    out: dict[str, Choice] = {}
    for name in order:
        kind, row = tensor_kind(name), shapes[name][-1]
        if pure:
            out[name] = _fit(mix.default, row, f"{mix.name} --pure")
            continue
        if kind == "output" or (tied and kind == "token_embd"):
            t, why = _output_type(mix, row)
            out[name] = _fit(t, row, why)
            continue
        i = seen.get(kind, 0)
        seen[kind] = i + 1
        if kind == "attn_v":
            where = Where(i, n_attn_v, facts, imatrix)
        elif kind.startswith("ffn_") and facts.n_expert > 1:  # llama.cpp reads the layer from the name
            where = Where(_weight_order(name)[0], facts.n_layer, facts, imatrix)
        else:
            where = Where(i, facts.n_layer, facts, imatrix)
        hit, t, why = _first(mix.rules.get(kind, ()), where)
        t = t if hit and t is not None else mix.default
        why = f"{mix.name} {kind}: {why}" if hit else f"{mix.name} default"
        for k, conds, only, new in POST_RULES:
            if k == kind and (only is None or t in only) and all(PREDICATES[c](where) for c in conds):
                t, why = new, f"{why}; then {' & '.join(conds)} -> {new.name}"
        out[name] = _fit(t, row, why)
    return out


def _output_type(mix: Mix, row: int) -> tuple[GT, str]:
    facts = {
        "rows_not_whole_default_blocks": row % block_of(mix.default) != 0,
        "default_is_q8_0": mix.default == GT.Q8_0,
        "always": True,
    }
    cond, t = next((c, t) for c, t in OUTPUT_RULES if facts[c])
    return t, f"{mix.name} output matrix: {cond.replace('_', ' ')}"
