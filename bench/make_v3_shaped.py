"""Write a DeepSeek-V3-shaped block-FP8 checkpoint: the real counts at reduced (or real) widths.

Counts are DeepSeek-V3/R1's (https://huggingface.co/deepseek-ai/DeepSeek-V3, config.json and
model.safetensors.index.json): 61 decoder layers, the first 3 dense, then 256 routed + 1 shared
expert per layer (8 active), MLA attention (q LoRA, kv LoRA with a decoupled rope key), one MTP
layer (index 61: enorm/hnorm/eh_proj/shared_head plus a full MoE decoder layer), 163 shards and
``model.safetensors.index.json``. Every linear weight of the decoder is ``float8_e4m3fn`` with a
float32 ``weight_scale_inv`` per 128x128 block; embeddings, lm_head, norms, the router, eh_proj
and the MTP head are bf16 (the router's ``e_score_correction_bias`` float32), as shipped.

Widths are divided by ``--scale`` (heads too), so one generator gives:

* ``--scale 512``: a tiny variant (~70 MB at 61 layers; ``--layers 5`` for unit tests: ~3 MB),
* ``--scale 16``: a few-GB variant for benchmarks,
* ``--scale 1 --sparse``: the real widths (~690 GB of data) as *sparse* files: every header is real
  and every file has its real size (``os.truncate`` past the header, no blocks allocated), so
  ``dsq plan`` and anything else that reads headers only sees DeepSeek-V3 itself. Reading weights
  from it gives zeros.

Usage::

    python bench/make_v3_shaped.py OUT --scale 512            # tiny, real counts
    python bench/make_v3_shaped.py OUT --scale 512 --layers 5 # tiny, 3 dense + 2 MoE layers (+ MTP)
    python bench/make_v3_shaped.py OUT --scale 16             # a few GB
    python bench/make_v3_shaped.py OUT --scale 1 --sparse     # real widths, headers only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# DeepSeek-V3's config.json (the fields its modeling code reads), at scale 1.
V3_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}
V3_SHARDS = 163
BLOCK = 128
_WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_DTYPE_NAME = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def v3_config(scale: int = 1, layers: int | None = None) -> dict:
    """DeepSeek-V3's config with every width and the head count divided by ``scale``: widths stay
    multiples of 32, at least 32 (the int4/int8 presets quantize in blocks of 32), at least 1 head, a
    vocabulary of at least 256. ``layers`` overrides ``num_hidden_layers`` (the first 3 stay dense
    while layers > 3)."""
    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    cfg = json.loads(json.dumps(V3_CONFIG))
    for k in _WIDTHS:
        cfg[k] = max(32, math.ceil(cfg[k] / scale / 32) * 32) if scale > 1 else cfg[k]
    cfg["num_attention_heads"] = cfg["num_key_value_heads"] = max(1, 128 // scale)
    cfg["vocab_size"] = max(256, math.ceil(129280 / scale / 16) * 16) if scale > 1 else 129280
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        cfg["first_k_dense_replace"] = min(3, max(layers - 1, 0))
    return cfg


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _linear(name: str, rows: int, cols: int, fp8: bool = True) -> list[Spec]:
    if not fp8:
        return [Spec(name, (rows, cols), torch.bfloat16)]
    return [
        Spec(name, (rows, cols), torch.float8_e4m3fn),
        Spec(name + "_scale_inv", (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), torch.float32),
    ]


def _decoder_layer(cfg: dict, i: int) -> list[Spec]:
    h, p = cfg["hidden_size"], f"model.layers.{i}."
    heads, nope, rope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q_lora, kv_lora = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    out = [Spec(p + "input_layernorm.weight", (h,), torch.bfloat16)]
    a = p + "self_attn."
    out += _linear(a + "q_a_proj.weight", q_lora, h)
    out += [Spec(a + "q_a_layernorm.weight", (q_lora,), torch.bfloat16)]
    out += _linear(a + "q_b_proj.weight", heads * (nope + rope), q_lora)
    out += _linear(a + "kv_a_proj_with_mqa.weight", kv_lora + rope, h)
    out += [Spec(a + "kv_a_layernorm.weight", (kv_lora,), torch.bfloat16)]
    out += _linear(a + "kv_b_proj.weight", heads * (nope + v), kv_lora)
    out += _linear(a + "o_proj.weight", h, heads * v)
    out += [Spec(p + "post_attention_layernorm.weight", (h,), torch.bfloat16)]
    m = p + "mlp."
    if i < cfg["first_k_dense_replace"]:
        inter = cfg["intermediate_size"]
        return out + _linear(m + "gate_proj.weight", inter, h) + _linear(m + "up_proj.weight", inter, h) + _linear(
            m + "down_proj.weight", h, inter
        )
    e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    out += [Spec(m + "gate.weight", (e, h), torch.bfloat16), Spec(m + "gate.e_score_correction_bias", (e,), torch.float32)]
    for x in [*(f"experts.{j}." for j in range(e)), "shared_experts."]:
        w = inter * (cfg["n_shared_experts"] if x == "shared_experts." else 1)
        out += _linear(m + x + "gate_proj.weight", w, h) + _linear(m + x + "up_proj.weight", w, h)
        out += _linear(m + x + "down_proj.weight", h, w)
    return out


def tensor_specs(cfg: dict) -> list[Spec]:
    """Every tensor of the checkpoint in file order: embeddings, the decoder layers, the MTP layer,
    the final norm and lm_head (V3's own shards end with the MTP layer; the order does not matter)."""
    h, vocab, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    out = [Spec("model.embed_tokens.weight", (vocab, h), torch.bfloat16)]
    for i in range(n):
        out += _decoder_layer(cfg, i)
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        i, p = n + k, f"model.layers.{n + k}."
        out += [Spec(p + "embed_tokens.weight", (vocab, h), torch.bfloat16)]
        out += [Spec(p + "enorm.weight", (h,), torch.bfloat16), Spec(p + "hnorm.weight", (h,), torch.bfloat16)]
        out += _linear(p + "eh_proj.weight", h, 2 * h, fp8=False)
        out += _decoder_layer(dict(cfg, first_k_dense_replace=0), i)
        out += [Spec(p + "shared_head.norm.weight", (h,), torch.bfloat16)]
        out += [Spec(p + "shared_head.head.weight", (vocab, h), torch.bfloat16)]
    out += [Spec("model.norm.weight", (h,), torch.bfloat16), Spec("lm_head.weight", (vocab, h), torch.bfloat16)]
    return out


def _split(specs: list[Spec], shards: int) -> list[list[Spec]]:
    """Contiguous groups of about equal bytes; a weight stays in the shard of its scale, every shard
    gets at least one tensor."""
    groups: list[list[Spec]] = []
    for s in specs:  # a weight and its scale_inv travel together
        if s.name.endswith("_scale_inv"):
            groups[-1].append(s)
        else:
            groups.append([s])
    shards = min(shards, len(groups))
    total = sum(s.nbytes for g in groups for s in g)
    out: list[list[Spec]] = [[] for _ in range(shards)]
    done = prev = 0
    for k, g in enumerate(groups):
        # the shard where this group's first byte falls, one shard at a time (none left empty), and
        # forced forward when the groups left are just enough for the shards left
        want = min(int(done * shards / max(total, 1)), shards - 1)
        idx = 0 if k == 0 else min(max(want, prev), prev + 1)
        if k and shards - 1 - prev >= len(groups) - k:
            idx = prev + 1
        out[idx] += g
        prev = idx
        done += sum(s.nbytes for s in g)
    return out


def _data(spec: Spec, gen: torch.Generator) -> torch.Tensor:
    """Random values with the statistics of a trained model where it matters to a quantizer: weights
    ~N(0, 0.02) as FP8 codes times a per-block scale, norms near 1, a small router bias."""
    n = math.prod(spec.shape)
    if spec.dtype == torch.float8_e4m3fn:  # codes spread over the FP8 range, as per-block absmax scaling gives
        return (torch.randn(n, generator=gen) * 120).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(spec.shape)
    if spec.name.endswith("_scale_inv"):
        return (0.02 / 120 * (0.5 + torch.rand(n, generator=gen))).reshape(spec.shape)
    if spec.name.endswith("norm.weight"):
        return (0.8 + 0.4 * torch.rand(n, generator=gen)).to(spec.dtype).reshape(spec.shape)
    if spec.name.endswith("e_score_correction_bias"):
        return (0.1 * torch.randn(n, generator=gen)).to(spec.dtype).reshape(spec.shape)
    return (0.02 * torch.randn(n, generator=gen)).to(spec.dtype).reshape(spec.shape)


def _write_shard(path: Path, specs: list[Spec], gen: torch.Generator | None) -> None:
    """One safetensors file (https://github.com/huggingface/safetensors#format); ``gen`` None: the
    header only, the data region a hole of the right size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _DTYPE_NAME[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        if gen is None:
            f.truncate(8 + len(blob) + offset)
            return
        for s in specs:
            f.write(_data(s, gen).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def write_tokenizer(out: Path, vocab: int) -> None:
    """A small BPE (tokenizer.json + tokenizer_config.json) with at most ``vocab`` ids, trained on the
    shipped calib_data/prose.txt, so calibrated runs (``--method gptq``) can tokenize text for a
    checkpoint whose vocabulary is scaled down (256 ids at ``--scale`` 512). Characters it never saw
    map to ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).resolve().parents[1] / "calib_data" / "prose.txt").read_text()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<|endoftext|>"], show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
        "unk_token": "<unk>", "pad_token": "<|endoftext|>", "model_max_length": 4096,
    }))


def make_v3_shaped(out: str | Path, scale: int = 512, layers: int | None = None, shards: int = V3_SHARDS,
                   sparse: bool = False, seed: int = 0) -> Path:
    """Write the checkpoint into ``out`` (created); returns ``out``. ``sparse``: headers and file sizes
    only (see the module docstring). Deterministic for a given (scale, layers, shards, seed). A small
    tokenizer (``write_tokenizer``) comes with it, for calibrated runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = v3_config(scale, layers)
    groups = _split(tensor_specs(cfg), shards)
    names = [f"model-{i + 1:05d}-of-{len(groups):06d}.safetensors" for i in range(len(groups))]
    gen = None if sparse else torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for name, specs in zip(names, groups, strict=True):
        _write_shard(out / name, specs, gen)
        weight_map.update({s.name: name for s in specs})
    total = sum(s.nbytes for g in groups for s in g)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    write_tokenizer(out, cfg["vocab_size"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--scale", type=int, default=512, help="divide every width and the head count by this (1: real)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 61; the first 3 dense)")
    ap.add_argument("--shards", type=int, default=V3_SHARDS)
    ap.add_argument("--sparse", action="store_true", help="headers only; data regions are holes (for dsq plan)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = make_v3_shaped(a.out, a.scale, a.layers, a.shards, a.sparse, a.seed)
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    used = sum(os.stat(f).st_blocks * 512 for f in files)
    print(f"{out}: {len(files)} shards, {size / 1e9:.3f} GB apparent, {used / 1e9:.3f} GB on disk")


if __name__ == "__main__":
    main()
