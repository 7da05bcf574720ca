"""Tiny random-weight checkpoints built with transformers' own config/model classes.

One per supported architecture, saved as sharded safetensors with a real (small, trained) BPE
tokenizer, so every code path runs on the file layouts users have. Widths of 256 in the dense
fixtures exercise formats with 256-wide super-blocks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

VOCAB = 320

_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6)
_MLA_MOE = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
)

# name -> (config class name, kwargs). DeepSeek-V3: MLA, a dense first layer, routed + shared
# experts, sigmoid scoring with e_score_correction_bias and group-limited routing.
SPECS: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaConfig",
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32,
        ),
    ),
    # Qwen3-MoE: q/k norms, every layer routed (softmax top-2 of 8, renormalised), no shared experts.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(_MLA_MOE, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    ),
    "deepseek_v3": ("DeepseekV3Config", dict(_MLA_MOE, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
}
ARCHS = tuple(SPECS)


def make_tokenizer(out: Path) -> None:
    """A small byte-level BPE trained on shipped text, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).parent / "data" / "tiny_corpus.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 256,
                "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            }
        )
    )


def build_model(arch: str, seed: int = 0):
    import transformers

    cls_name, kwargs = SPECS[arch]
    config = getattr(transformers, cls_name)(**_COMMON, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init is std 0.02 everywhere; give norms some spread so they are not all-ones, and V3's routing
    # correction bias (a buffer, not a parameter) real values so exports must carry it to route alike.
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name and p.is_floating_point():
                p.uniform_(0.8, 1.2)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    return model.eval()


def save_model(model, out: Path, dtype: torch.dtype = torch.bfloat16, shards: int = 3) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(out, max_shard_size=max(math.ceil(total / shards), 1024))
    make_tokenizer(out)
    return out


def make_checkpoint(arch: str, out: Path, dtype: torch.dtype = torch.bfloat16, shards: int = 3) -> Path:
    return save_model(build_model(arch), out, dtype, shards)


def make_fp8_checkpoint(arch: str, out: Path) -> Path:
    """A DeepSeek-style block-FP8 checkpoint: every 2-D linear weight (not embeddings, lm_head, router)
    stored as float8_e4m3fn + weight_scale_inv per 128x128 block, quantization_config quant_method fp8."""
    from safetensors.torch import load_file, save_file

    from dsq.dsquant.formats import FORMATS

    make_checkpoint(arch, out)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fp8 = FORMATS["fp8_b128"]
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(out / shard)
        converted = {}
        for name, t in tensors.items():
            linear = t.ndim == 2 and name.endswith("proj.weight")
            if linear:
                qt = fp8.quantize(t.float(), name)
                converted[name] = qt.codes
                converted[name + "_scale_inv"] = qt.scale
                index["weight_map"][name + "_scale_inv"] = shard
            else:
                converted[name] = t
        save_file(converted, out / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def tied_copy(src: Path, dst: Path) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` made tie_word_embeddings: lm_head.weight dropped from the shards
    and the index (safetensors metadata kept), the flag set in config.json."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].pop("lm_head.weight", None)
        index.write_text(json.dumps(data))
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        if "lm_head.weight" in tensors:
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata()
            del tensors["lm_head.weight"]
            save_file(tensors, shard, metadata=meta)
    return dst
