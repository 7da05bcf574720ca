"""dsq export --to gguf on every fixture architecture: each GGUF tensor, dequantized by gguf-py, equals
dsq's dequantized value (after llama.cpp's permutation / split / stacking), metadata and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader
from gguf.quants import dequantize
from typer.testing import CliRunner

from dsq.dsquant.errors import DsqError, InputError, OutputError, UnsupportedError
from dsq.dsquant.quantized import QuantizedCheckpoint
from dsq.export.gguf_writer import export_gguf

from fixtures import ARCHS

# HF name (per layer after "model.layers.N.") -> GGUF name (after "blk.N."), written out here
# independently of the writer's table, from llama.cpp's tensor names.
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
          "model.norm.weight": "output_norm.weight"}
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def expected_tensors(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """What llama.cpp's converter would write, from a float state dict (its permute/split/stack rules)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    n_head = cfg["num_attention_heads"]
    for name, w in sd.items():
        if name in GLOBAL:
            out[GLOBAL[name]] = w
            continue
        if m := EXPERT.fullmatch(name):
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = w
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        bid, rest = int(m[1]), m[2]
        if bid >= cfg["num_hidden_layers"]:
            continue
        if cfg["model_type"] == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = n_head if "q_proj" in rest else cfg["num_key_value_heads"]
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        if rest == "self_attn.kv_b_proj.weight":
            nope, vd = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = w.view(n_head, nope + vd, w.shape[-1])
            k_b, v_b = torch.split(kv_b, [nope, vd], dim=1)
            out[f"blk.{bid}.attn_k_b.weight"] = k_b.transpose(1, 2)
            out[f"blk.{bid}.attn_v_b.weight"] = v_b
            continue
        out[f"blk.{bid}.{LAYER[rest]}"] = w
    for (bid, proj), by_id in experts.items():
        out[f"blk.{bid}.ffn_{proj}_exps.weight"] = torch.stack([by_id[i] for i in sorted(by_id)])
    return out


def gguf_tensors(path) -> dict[str, tuple[GT, np.ndarray]]:
    reader = GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type, np.array(values, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    return out


def field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


EXACT_TYPES = {GT.Q4_0, GT.Q8_0, GT.F32, GT.BF16}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", ["int4", "int8"])
def test_every_tensor_carries_dsq_values(arch, recipe, quantized_dir, tmp_path):
    src = quantized_dir(arch, recipe)
    out = tmp_path / "m.gguf"
    report = export_gguf(src, out)
    ck = QuantizedCheckpoint(src)
    want = expected_tensors(ck.dequantized_state_dict(), ck.config)
    got = gguf_tensors(out)
    assert set(got) == set(want)
    want_q = GT.Q4_0 if recipe == "int4" else GT.Q8_0
    rows = {r["name"]: r for r in report["tensors"]}
    for name, (gtype, values) in got.items():
        ref = want[name].float()
        assert values.shape == tuple(ref.shape), name
        if rows[name]["status"] == "exact" or gtype in (GT.F32, GT.BF16):
            assert torch.equal(torch.from_numpy(values), ref), name  # no re-rounding anywhere
        else:  # k_b: kv_b transposed, its blocks re-quantized to Q8_0 along the new rows
            assert name.endswith("attn_k_b.weight") and gtype == GT.Q8_0
            rel = float((torch.from_numpy(values) - ref).norm() / ref.norm())
            assert 0 < rel < 0.01, (name, rel)
            assert rows[name]["rel_error"] == pytest.approx(rel, rel=1e-3)
    linear_types = {rows[n]["type"] for n in rows if rows[n]["status"] == "exact"}
    assert linear_types == {want_q.name.lower()}
    assert report["exact"] == sum(r["status"] == "exact" for r in report["tensors"]) > 0


def test_deepseek_metadata(quantized_dir, tmp_path):
    out = tmp_path / "v3.gguf"
    export_gguf(quantized_dir("deepseek_v3", "int4"), out)
    r = GGUFReader(out)
    cfg = json.loads((quantized_dir("deepseek_v3", "int4") / "config.json").read_text())
    a = "deepseek2"
    assert field(r, "general.architecture") == a
    assert field(r, f"{a}.expert_gating_func") == 2  # sigmoid: V3's router, implied by the model type
    assert field(r, f"{a}.leading_dense_block_count") == cfg["first_k_dense_replace"]
    assert field(r, f"{a}.expert_count") == cfg["n_routed_experts"]
    assert field(r, f"{a}.expert_used_count") == cfg["num_experts_per_tok"]
    assert field(r, f"{a}.expert_shared_count") == cfg["n_shared_experts"]
    assert field(r, f"{a}.expert_group_count") == cfg["n_group"]
    assert field(r, f"{a}.expert_group_used_count") == cfg["topk_group"]
    assert field(r, f"{a}.expert_weights_scale") == pytest.approx(cfg["routed_scaling_factor"])
    assert field(r, f"{a}.attention.head_count_kv") == 1
    assert field(r, f"{a}.attention.kv_lora_rank") == cfg["kv_lora_rank"]
    assert field(r, f"{a}.attention.q_lora_rank") == cfg["q_lora_rank"]
    assert field(r, f"{a}.attention.key_length") == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert field(r, f"{a}.attention.key_length_mla") == cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    assert field(r, f"{a}.attention.value_length_mla") == cfg["v_head_dim"]
    assert field(r, f"{a}.rope.dimension_count") == cfg["qk_rope_head_dim"]
    names = {t.name for t in r.tensors}
    assert "blk.0.ffn_gate.weight" in names and "blk.0.ffn_gate_exps.weight" not in names  # dense lead layer
    assert "blk.1.exp_probs_b.bias" in names
    v2 = tmp_path / "v2.gguf"
    export_gguf(quantized_dir("deepseek_v2", "int4"), v2)
    r2 = GGUFReader(v2)
    assert field(r2, f"{a}.expert_gating_func") == 1  # softmax
    assert field(r2, f"{a}.attention.q_lora_rank") == 0  # no q LoRA: plain attn_q
    assert "blk.0.attn_q.weight" in {t.name for t in r2.tensors}


def test_qwen3_moe_metadata_and_refusal(quantized_dir, tmp_path):
    """Qwen3-MoE: GQA keys plus the expert counts llama.cpp's qwen3moe loader reads; a config that does not
    renormalise the top-k weights is refused (llama.cpp's qwen3moe graph always does)."""
    import shutil

    src = quantized_dir("qwen3_moe", "int4")
    out = tmp_path / "q3moe.gguf"
    export_gguf(src, out)
    r = GGUFReader(out)
    cfg = json.loads((src / "config.json").read_text())
    a = "qwen3moe"
    assert field(r, "general.architecture") == a
    assert field(r, f"{a}.expert_count") == cfg["num_local_experts"] == 8
    assert field(r, f"{a}.expert_used_count") == cfg["num_experts_per_tok"]
    assert field(r, f"{a}.expert_feed_forward_length") == cfg["moe_intermediate_size"]
    assert field(r, f"{a}.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field(r, f"{a}.attention.key_length") == cfg["head_dim"]
    names = {t.name for t in r.tensors}
    assert {"blk.1.ffn_gate_inp.weight", "blk.1.ffn_up_exps.weight", "blk.1.attn_k_norm.weight"} <= names
    assert not any("shexp" in n or n.endswith("ffn_up.weight") for n in names)
    bad = tmp_path / "nonorm"
    shutil.copytree(src, bad)
    (bad / "config.json").write_text(json.dumps(dict(cfg, norm_topk_prob=False)))
    with pytest.raises(UnsupportedError, match="norm_topk_prob"):
        export_gguf(bad, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_dense_metadata_and_tokenizer(quantized_dir, tmp_path):
    out = tmp_path / "q3.gguf"
    report = export_gguf(quantized_dir("qwen3", "int4"), out)
    r = GGUFReader(out)
    cfg = json.loads((quantized_dir("qwen3", "int4") / "config.json").read_text())
    assert field(r, "qwen3.attention.head_count") == cfg["num_attention_heads"]
    assert field(r, "qwen3.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field(r, "qwen3.attention.key_length") == cfg["head_dim"]
    assert field(r, "qwen3.context_length") == cfg["max_position_embeddings"]
    assert field(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert field(r, "qwen3.rope.freq_base") == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    tok = json.loads((quantized_dir("qwen3", "int4") / "tokenizer.json").read_text())
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]
    assert all(tokens[i] == s for s, i in tok["model"]["vocab"].items())
    assert field(r, "tokenizer.ggml.token_type")[0] == 3  # <|endoftext|>: control
    assert len(field(r, "tokenizer.ggml.merges")) == len(tok["model"]["merges"])
    assert "<|im_start|>" in field(r, "tokenizer.chat_template")
    assert report["tokenizer"]["special"]["eos"] == 0


def test_asymmetric_int4_becomes_q4_1_and_block128_is_split_exactly(model_dir, quantized_dir, tmp_path):
    recipe = tmp_path / "asym.toml"
    recipe.write_text('default = "int4_asym_g32"\n[[override]]\npattern = "*.mlp.down_proj*"\nformat = "int4_sym_g128"\n')
    src = quantized_dir("qwen2", str(recipe))
    out = tmp_path / "asym.gguf"
    report = export_gguf(src, out)
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["blk.0.attn_q.weight"]["type"] == "q4_1" and rows["blk.0.attn_q.weight"]["status"] == "exact"
    down = rows["blk.0.ffn_down.weight"]
    assert down["type"] == "q4_0" and down["status"] == "exact" and down["rel_error"] == 0  # 4 Q4_0 blocks per group
    assert report["requantized"] == 0
    from dsq.export.gguf_quants import q4_1_offset_bound

    ck = QuantizedCheckpoint(src)
    got = gguf_tensors(out)
    for name, qt in ck.iter_weights():
        if getattr(qt, "format", None) == "int4_asym_g32" and name.endswith("self_attn.q_proj.weight"):
            bid = name.split(".")[2]
            diff = (torch.from_numpy(got[f"blk.{bid}.attn_q.weight"][1]) - qt.dequantize()).abs()
            assert bool((diff <= q4_1_offset_bound(qt).repeat_interleave(32, 1) * 1.0001).all())


def test_float_checkpoint_with_recipe_and_forced_type(model_dir, tmp_path):
    out = tmp_path / "f.gguf"
    report = export_gguf(model_dir("llama"), out, recipe="int8")
    types = {r["name"]: r["type"] for r in report["tensors"]}
    assert types["blk.0.attn_q.weight"] == "q8_0" and types["output.weight"] == "bf16"  # recipe keeps lm_head
    status = {r["name"]: r["status"] for r in report["tensors"]}
    assert status["blk.0.attn_q.weight"] == "exact" and status["output.weight"] == "cast"  # int8_g32 is Q8_0
    assert not any("kept as floats" in n for n in report["notes"])
    forced = export_gguf(model_dir("llama"), tmp_path / "f16.gguf", type="f16")
    assert {r["type"] for r in forced["tensors"]} == {"f16", "f32"}
    plain = export_gguf(model_dir("llama"), tmp_path / "bf16.gguf")
    assert "bf16" in plain["types"] and any("kept as floats" in n for n in plain["notes"])


@pytest.mark.parametrize("arch,recipe", [("deepseek_v3", "int4"), ("llama", "fp8"), ("deepseek_v3-fp8", "int4")])
def test_export_recipe_is_quantize_then_export(arch, recipe, model_dir, quantized_dir, tmp_path):
    """`export --recipe R` quantizes through dsq's plan and quantizer: every tensor (type and bytes) is what
    `dsq quantize -r R` followed by an export writes, also where the GGUF type re-rounds (DeepSeek's
    transposed k_b goes to Q8_0 from the int4 values; FP8 to Q8_0 from the FP8 values), and from a DeepSeek
    block-FP8 source, which `dsq quantize` reads too."""
    direct = export_gguf(model_dir(arch), tmp_path / "direct.gguf", recipe=recipe)
    export_gguf(quantized_dir(arch, recipe), tmp_path / "via.gguf")
    a = {t.name: (t.tensor_type, bytes(t.data)) for t in GGUFReader(tmp_path / "direct.gguf").tensors}
    b = {t.name: (t.tensor_type, bytes(t.data)) for t in GGUFReader(tmp_path / "via.gguf").tensors}
    assert a.keys() == b.keys() and all(a[n] == b[n] for n in a), [n for n in a if a[n] != b.get(n)][:3]
    rerounded = {r["name"] for r in direct["tensors"] if r["status"] in ("requantized", "quantized")}
    assert rerounded == ({n for n in a if "attn_k_b" in n} if recipe == "int4" else
                         {r["name"] for r in direct["tensors"] if r["type"] == "q8_0"})


def test_bad_inputs_fail_cleanly(model_dir, quantized_dir, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(InputError, match="already quantized"):
        export_gguf(quantized_dir("llama", "int4"), out, recipe="int4")
    with pytest.raises(UnsupportedError, match="--type q9_9"):
        export_gguf(quantized_dir("llama", "int4"), out, type="q9_9")
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        export_gguf(quantized_dir("llama", "int4"), out)
    assert out.read_bytes() == b"keep me"
    # a pre-tokenizer llama.cpp has no built-in twin for: named field, nothing written
    import shutil

    bad = tmp_path / "badtok"
    shutil.copytree(model_dir("llama"), bad)  # not qwen2: transformers replaces a qwen2 pre-tokenizer with its own
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UnsupportedError, match="pre_tokenizer"):
        export_gguf(bad, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "bad.gguf").exists()


def test_cli_export_dispatch(quantized_dir, tmp_path):
    from dsq.cli import app

    out = tmp_path / "cli.gguf"
    res = CliRunner().invoke(app, ["export", str(quantized_dir("qwen2", "int8")), "--to", "gguf", "-o", str(out),
                                   "--json"])
    assert res.exit_code == 0, res.output
    text = res.output  # CliRunner mixes in stderr: anything logged there (e.g. progress) is not the report
    summary = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert summary["types"]["q8_0"] == 14 and out.is_file()
    res = CliRunner().invoke(app, ["export", str(quantized_dir("qwen2", "int8")), "--to", "tflite", "-o", str(out)])
    assert res.exit_code == 2 and "unknown target" in res.output
    assert issubclass(OutputError, DsqError)


def test_deepseek_fp8_checkpoint_is_requantized_to_q8_0_with_error_reported(model_dir, tmp_path):
    """Block-FP8 (128x128) has no GGUF twin: every FP8 weight goes to Q8_0, the report gives the added error."""
    src = model_dir("deepseek_v3-fp8")
    out = tmp_path / "fp8.gguf"
    report = export_gguf(src, out)
    assert report["requantized"] > 0 and report["exact"] == 0
    fp8_rows = [r for r in report["tensors"] if r["status"] == "requantized"]
    assert {r["type"] for r in fp8_rows} == {"q8_0"}
    assert all(0 < r["rel_error"] < 0.01 for r in fp8_rows)
    want = expected_tensors(QuantizedCheckpoint(src).dequantized_state_dict(), QuantizedCheckpoint(src).config)
    got = gguf_tensors(out)
    assert set(got) == set(want)
    for r in fp8_rows:
        ref = want[r["name"]].float()
        rel = float((torch.from_numpy(got[r["name"]][1]) - ref).norm() / ref.norm())
        assert rel == pytest.approx(r["rel_error"], rel=1e-3)


def test_split_output_follows_gguf_split_convention(quantized_dir, tmp_path):
    src = quantized_dir("qwen2", "int4")
    whole = tmp_path / "whole.gguf"
    export_gguf(src, whole)
    out = tmp_path / "m.gguf"
    report = export_gguf(src, out, split_max_size="300K")
    files = [tmp_path / f"m-{i:05d}-of-{len(report['files']):05d}.gguf" for i in range(1, len(report["files"]) + 1)]
    assert len(files) >= 3 and [str(f) for f in files] == report["files"] and not out.exists()
    merged: dict[str, np.ndarray] = {}
    for i, f in enumerate(files):
        r = GGUFReader(f)
        assert field(r, "split.no") == i and field(r, "split.count") == len(files)
        assert sum(t.n_bytes for t in r.tensors) <= 300_000 or len(r.tensors) == 1
        merged.update({t.name: np.array(t.data) for t in r.tensors})
    full = {t.name: np.array(t.data) for t in GGUFReader(whole).tensors}
    assert merged.keys() == full.keys() and all(np.array_equal(merged[k], full[k]) for k in full)
    with pytest.raises(OutputError):  # shards exist now: refused without overwrite, nothing touched
        export_gguf(src, out, split_max_size="300K")
    with pytest.raises(InputError, match="split-max-size"):
        export_gguf(src, tmp_path / "n.gguf", split_max_size="lots")


def test_r1_chat_template_with_think_survives_verbatim(model_dir, tmp_path):
    import shutil

    src = tmp_path / "r1"
    shutil.copytree(model_dir("qwen2"), src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set c = m['content'].split('</think>')[-1] %}"
        "<|im_start|>assistant\n{{ c }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    cfg["chat_template"] = template
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "r1.gguf"
    export_gguf(src, out)
    assert field(GGUFReader(out), "tokenizer.chat_template") == template
