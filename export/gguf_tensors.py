"""Which GGUF tensors a checkpoint becomes: names, shapes, the HF tensors each is built from, and how.

Names come from gguf-py (``gguf.TENSOR_NAMES``), keyed by dsq's roles in ``ROLE_TENSORS``; the
rewrites llama.cpp expects are transforms (``TRANSFORMS``) each architecture record names by role:

* ``llama`` q/k rows are permuted from HF's rotate-half RoPE layout to ggml's interleaved one
  (``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf). It moves whole rows, so a quantized
  weight's codes and per-row-block scales move with them and nothing is re-rounded.
* ``deepseek2`` ``kv_b_proj`` is split per head into ``attn_k_b`` (transposed to [n_head, kv_lora,
  nope]) and ``attn_v_b`` ([n_head, v_head, kv_lora]) as llama.cpp's MLA absorption path loads them
  (``DeepseekV2Model.modify_tensors``). v_b keeps whole rows (exact); k_b is transposed, so its
  blocks run along a new axis and it is re-quantized (Q8_0 by default to keep that error small).
  Routed experts are stacked per layer into ``ffn_{gate,up,down}_exps`` [n_expert, out, in]; the
  MTP block (layers >= num_hidden_layers) is left out, as llama.cpp's converter does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES

from dsq.dsquant.archs import Role
from dsq.dsquant.config import ModelConfig
from dsq.dsquant.errors import UnsupportedError
from dsq.dsquant.formats import QuantizedTensor
from dsq.dsquant.source import Source, SourceEntry

# dsq role -> (gguf-py tensor, suffix). Roles absent here are not written (MTP).
ROLE_TENSORS: dict[Role, tuple[MODEL_TENSOR, str]] = {
    Role.EMBED: (MODEL_TENSOR.TOKEN_EMBD, "weight"),
    Role.LM_HEAD: (MODEL_TENSOR.OUTPUT, "weight"),
    Role.OUTPUT_NORM: (MODEL_TENSOR.OUTPUT_NORM, "weight"),
    Role.ATTN_NORM: (MODEL_TENSOR.ATTN_NORM, "weight"),
    Role.FFN_NORM: (MODEL_TENSOR.FFN_NORM, "weight"),
    Role.ATTN_Q: (MODEL_TENSOR.ATTN_Q, "weight"),
    Role.ATTN_K: (MODEL_TENSOR.ATTN_K, "weight"),
    Role.ATTN_V: (MODEL_TENSOR.ATTN_V, "weight"),
    Role.ATTN_O: (MODEL_TENSOR.ATTN_OUT, "weight"),
    Role.ATTN_Q_BIAS: (MODEL_TENSOR.ATTN_Q, "bias"),
    Role.ATTN_K_BIAS: (MODEL_TENSOR.ATTN_K, "bias"),
    Role.ATTN_V_BIAS: (MODEL_TENSOR.ATTN_V, "bias"),
    Role.ATTN_Q_NORM: (MODEL_TENSOR.ATTN_Q_NORM, "weight"),
    Role.ATTN_K_NORM: (MODEL_TENSOR.ATTN_K_NORM, "weight"),
    Role.MLA_Q_A: (MODEL_TENSOR.ATTN_Q_A, "weight"),
    Role.MLA_Q_A_NORM: (MODEL_TENSOR.ATTN_Q_A_NORM, "weight"),
    Role.MLA_Q_B: (MODEL_TENSOR.ATTN_Q_B, "weight"),
    Role.MLA_KV_A: (MODEL_TENSOR.ATTN_KV_A_MQA, "weight"),
    Role.MLA_KV_A_NORM: (MODEL_TENSOR.ATTN_KV_A_NORM, "weight"),
    Role.MLP_GATE: (MODEL_TENSOR.FFN_GATE, "weight"),
    Role.MLP_UP: (MODEL_TENSOR.FFN_UP, "weight"),
    Role.MLP_DOWN: (MODEL_TENSOR.FFN_DOWN, "weight"),
    Role.ROUTER: (MODEL_TENSOR.FFN_GATE_INP, "weight"),
    Role.ROUTER_BIAS: (MODEL_TENSOR.FFN_EXP_PROBS_B, "bias"),
    Role.EXPERT_GATE: (MODEL_TENSOR.FFN_GATE_EXP, "weight"),
    Role.EXPERT_UP: (MODEL_TENSOR.FFN_UP_EXP, "weight"),
    Role.EXPERT_DOWN: (MODEL_TENSOR.FFN_DOWN_EXP, "weight"),
    Role.SHARED_GATE: (MODEL_TENSOR.FFN_GATE_SHEXP, "weight"),
    Role.SHARED_UP: (MODEL_TENSOR.FFN_UP_SHEXP, "weight"),
    Role.SHARED_DOWN: (MODEL_TENSOR.FFN_DOWN_SHEXP, "weight"),
}
EXPERT_ROLES = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)


def gguf_name(t: MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    return TENSOR_NAMES[t].format(bid=layer) + "." + suffix


# -- transforms: (value, config) -> value; row selections keep QuantizedTensors quantized ----------
def select_rows(value: QuantizedTensor | torch.Tensor, idx: torch.Tensor) -> QuantizedTensor | torch.Tensor:
    if isinstance(value, QuantizedTensor):
        if hasattr(value, "select_rows"):  # a GGUF-grid tensor (dsquant/kformats.py) carries more per-row parts
            return value.select_rows(idx)
        if value.fmt.block_rows != 1:  # a block spans rows (FP8 128x128): only floats can be permuted
            return value.dequantize()[idx]
        zero = value.zero[idx] if value.zero is not None else None
        return QuantizedTensor(value.format, (len(idx), value.shape[1]), value.codes[idx], value.scale[idx], zero)
    return value[idx]


def permute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's ``LlamaModel.permute``: per head, (2, d/2) -> (d/2, 2)."""
    return torch.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _permute_q(v, cfg: dict):
    return select_rows(v, permute_rows(v.shape[0], cfg["num_attention_heads"]))


def _permute_k(v, cfg: dict):
    return select_rows(v, permute_rows(v.shape[0], ModelConfig.from_dict(cfg).n_kv_heads))


def _mla_dims(cfg: dict) -> tuple[int, int, int]:
    return cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]


def _v_b(v, cfg: dict):
    n_head, nope, vd = _mla_dims(cfg)
    idx = (torch.arange(n_head)[:, None] * (nope + vd) + nope + torch.arange(vd)[None, :]).reshape(-1)
    return select_rows(v, idx)  # [n_head * v, kv_lora], the bytes of [n_head, v, kv_lora]


def _k_b(v, cfg: dict):
    n_head, nope, vd = _mla_dims(cfg)
    w = v.dequantize() if isinstance(v, QuantizedTensor) else v
    return w.reshape(n_head, nope + vd, w.shape[-1])[:, :nope].transpose(1, 2).contiguous()


# Transform kinds: a record's ``gguf_transforms`` names these (role -> kind) for its single-source tensors.
TRANSFORMS: dict[str, Callable] = {"permute_q": _permute_q, "permute_k": _permute_k, "k_b": _k_b, "v_b": _v_b}


@dataclass
class OutTensor:
    """One GGUF tensor: built from ``sources`` (stacked if several) through ``transform``."""

    name: str
    shape: tuple[int, ...]  # numpy order (outermost first)
    role: Role
    sources: tuple[SourceEntry, ...]
    transform: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def formats(self) -> set[str | None]:
        return {s.format for s in self.sources}

    @property
    def float_dtype(self) -> torch.dtype:
        return self.sources[0].float_dtype


def plan_tensors(src: Source) -> tuple[list[OutTensor], list[str]]:
    """The GGUF tensors for ``src`` in write order, plus notes on what was left out."""
    arch, cfg = src.arch, src.config
    n_layers = int(cfg["num_hidden_layers"])
    transforms = arch.transforms
    out: list[OutTensor] = []
    notes: list[str] = []
    experts: dict[tuple[int, Role], dict[int, SourceEntry]] = {}
    skipped_mtp = 0
    for e in src.entries.values():
        ref = e.ref
        if ref is None:
            raise UnsupportedError(
                f"{src.path}: tensor `{e.name}` is not part of the `{arch.model_type}` architecture table, "
                "so it has no GGUF name"
            )
        mtp = ref.layer is not None and ref.layer >= n_layers
        if mtp or (ref.role not in ROLE_TENSORS and ref.role != Role.MLA_KV_B):
            skipped_mtp += 1
            continue
        if ref.role in EXPERT_ROLES:
            experts.setdefault((ref.layer, ref.role), {})[ref.expert] = e
            continue
        if ref.role == Role.MLA_KV_B:
            n_head, nope, vd = _mla_dims(cfg)
            kv_lora = e.shape[1]
            out.append(OutTensor(gguf_name(MODEL_TENSOR.ATTN_K_B, "weight", ref.layer), (n_head, kv_lora, nope),
                                 ref.role, (e,), "k_b"))
            out.append(OutTensor(gguf_name(MODEL_TENSOR.ATTN_V_B, "weight", ref.layer), (n_head, vd, kv_lora),
                                 ref.role, (e,), "v_b"))
            continue
        t, suffix = ROLE_TENSORS[ref.role]
        out.append(OutTensor(gguf_name(t, suffix, ref.layer), e.shape, ref.role, (e,), transforms.get(ref.role)))
    n_expert = ModelConfig.from_dict(cfg).n_experts or None
    for (layer, role), by_id in sorted(experts.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
        if n_expert is None or sorted(by_id) != list(range(int(n_expert))):
            raise UnsupportedError(
                f"{src.path}: layer {layer} has experts {sorted(by_id)[:8]}... for {role.value}, "
                f"expected 0..{n_expert - 1 if n_expert else '?'} (config.json n_routed_experts)"
            )
        parts = tuple(by_id[i] for i in range(int(n_expert)))
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise UnsupportedError(f"{src.path}: layer {layer} {role.value} experts differ in shape: {sorted(shapes)}")
        t, suffix = ROLE_TENSORS[role]
        out.append(OutTensor(gguf_name(t, suffix, layer), (int(n_expert), *parts[0].shape), role, parts))
    if skipped_mtp:
        notes.append(f"left out {skipped_mtp} multi-token-prediction tensor(s) (layers >= {n_layers}), "
                     "as llama.cpp's converter does")
    out.sort(key=_order)
    return out, notes


def _order(t: OutTensor) -> tuple[int, str]:
    """token_embd first, blocks in order, output_norm/output last (the order llama.cpp's converter uses)."""
    if t.name.startswith("blk."):
        return int(t.name.split(".")[1]) + 1, t.name
    return (0 if t.name.startswith("token_embd") else 1 << 30), t.name


def build_value(t: OutTensor, src: Source) -> list[QuantizedTensor | torch.Tensor]:
    """The values of ``t`` as a list of row-blocks (one per stacked expert), transforms applied."""
    values = []
    for s in t.sources:
        v = src.load(s.name)
        if t.transform:
            v = TRANSFORMS[t.transform](v, src.config)
        values.append(v)
    return values
