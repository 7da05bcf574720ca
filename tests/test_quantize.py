"""dsq quantize on every architecture x preset: the output loads in transformers and its logits equal
those of dsq's own dequantized model; the report says what was done to every tensor."""

from __future__ import annotations

import json

import pytest
import torch

from dsq.dsquant.archs import ARCHITECTURES
from dsq.dsquant.checkpoint import Checkpoint
from dsq.dsquant.formats import FORMATS
from dsq.dsquant.quantized import QuantizedCheckpoint

from fixtures import ARCHS

PRESETS = ("int4", "int8", "fp8")
PROMPT = torch.tensor([[5, 17, 33, 2, 101, 250, 64, 9, 300, 12, 77, 1]])


MOE = tuple(a for a in ARCHS if ARCHITECTURES[a].moe)  # experts fused into 3-D parameters by transformers


def load_quantized_with_transformers(out):
    """transformers' own loader for the format (compressed-tensors / FineGrainedFP8).

    Dense int models load compressed (compressed-tensors runs the quantized Linear, dequantizing in
    float32: exact). transformers 5 fuses MoE experts into 3-D parameters that compressed-tensors
    cannot target, so MoE models (and FP8, which has no CPU kernel) load with ``dequantize=True``,
    where compressed-tensors multiplies codes by the fp16 scale in fp16: weights then carry one fp16
    rounding (relative 2^-11), see ``tolerance``."""
    import transformers

    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    kw = {}
    if q["quant_method"] == "fp8":
        kw["quantization_config"] = transformers.FineGrainedFP8Config(
            dequantize=True, weight_block_size=tuple(q["weight_block_size"])
        )
    elif config["model_type"] in MOE:
        kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)
    if kw:  # dequantized on load: some kept tensors can stay bf16 (FP8 loader); a compressed model refuses .float()
        model = model.float()
    return model.eval()


def tolerance(out, want: torch.Tensor) -> float:
    config = json.loads((out / "config.json").read_text())
    fp16_dequant = config["model_type"] in MOE and config["quantization_config"]["quant_method"] != "fp8"
    return (2e-3 if fp16_dequant else 1e-5) * max(want.abs().max().item(), 1.0)


def load_dsq_reference(out, tmp_path):
    """dsq's dequantized weights written as a plain fp32 checkpoint and loaded by transformers."""
    import transformers
    from safetensors.torch import save_file

    ref = tmp_path / "ref"
    ref.mkdir()
    sd = QuantizedCheckpoint(out).dequantized_state_dict(torch.float32)
    save_file({k: v.contiguous() for k, v in sd.items()}, ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (ref / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).float().eval()


def partial_fp8_blocks(out) -> list[str]:
    """FP8 weights with a partial edge block in a dimension of more than one block (e.g. 192 rows)."""
    report = json.loads((out / "dsq-report.json").read_text())
    return [
        t["name"] for t in report["tensors"]
        if t["format"] == "fp8_b128" and any(d > 128 and d % 128 for d in t["shape"])
    ]


@pytest.mark.parametrize("recipe", PRESETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_output_with_dsq_logits(arch, recipe, quantized_dir, tmp_path):
    out = quantized_dir(arch, recipe)
    if partial_fp8_blocks(out):
        pytest.skip(
            "transformers 5.23's FP8 dequantize derives the block from the scale grid (rows // scale_rows) and "
            "misreads DeepSeek's partial edge blocks; test_fp8_layout_matches_transformers checks the rest"
        )
    with torch.no_grad():
        got = load_quantized_with_transformers(out)(PROMPT).logits
        want = load_dsq_reference(out, tmp_path)(PROMPT).logits
    assert torch.isfinite(got).all()
    # Same weights, same float32 graph: only summation order (and fp16 dequant for MoE) may differ.
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance(out, want))


@pytest.mark.parametrize("recipe", PRESETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_report_covers_every_tensor(arch, recipe, model_dir, quantized_dir):
    out = quantized_dir(arch, recipe)
    report = json.loads((out / "dsq-report.json").read_text())
    src = Checkpoint(model_dir(arch))
    assert [t["name"] for t in report["tensors"]] == [t.name for t in src.tensors]
    by_role = {}
    for t in report["tensors"]:
        by_role.setdefault(t["role"], set()).add(t["format"])
        if t["format"]:
            assert 0 < t["rel_rmse"] < (0.15 if recipe == "int4" else 0.04), t
            assert t["bytes_out"] < t["bytes_in"]
        else:
            assert t["rel_rmse"] is None and t["bytes_out"] == t["bytes_in"]
    # never quantized: norms, router, embeddings; lm_head kept by the presets
    for role in ("attn_norm", "ffn_norm", "output_norm", "embed", "lm_head", "router", "router_bias"):
        assert by_role.get(role, {None}) == {None}, role
    quantized = {f for fs in by_role.values() for f in fs if f}
    assert quantized == {{"int4": "int4_sym_g32", "int8": "int8_g32", "fp8": "fp8_b128"}[recipe]}
    assert report["summary"]["bytes_out"] < report["summary"]["bytes_in"]
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / f).is_file()


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_fp8_layout_matches_transformers(arch, quantized_dir):
    """Every weight transformers' FP8 loader reads (all but partial-edge-block ones) equals dsq's value."""
    out = quantized_dir(arch, "fp8")
    model = load_quantized_with_transformers(out)
    got = model.state_dict()
    want = QuantizedCheckpoint(out).dequantized_state_dict(torch.float32)
    partial = set(partial_fp8_blocks(out))
    assert partial, "fixture should exercise partial blocks"
    checked = 0
    for name, w in want.items():
        if name in got and name not in partial:
            torch.testing.assert_close(got[name].float(), w, rtol=0, atol=0, msg=name)
            checked += 1
    for layer in (1, 2):  # routed experts: fused by transformers into gate_up_proj [E, 2I, H]
        gate_up = torch.stack([
            torch.cat([want[f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up")])
            for e in range(8)
        ])
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.experts.gate_up_proj"].float(), gate_up, rtol=0, atol=0)
        checked += 1
    assert checked > 10


def test_moe_and_mla_roles_are_quantized(quantized_dir):
    report = json.loads((quantized_dir("deepseek_v3", "int4") / "dsq-report.json").read_text())
    roles = {t["role"]: t for t in report["tensors"] if t["format"]}
    for role in ("mla_q_a", "mla_q_b", "mla_kv_a", "mla_kv_b", "expert_gate", "expert_up", "expert_down",
                 "shared_gate", "shared_up", "shared_down", "mlp_gate", "attn_o"):
        assert role in roles, role
    experts = {(t["layer"], t["expert"]) for t in report["tensors"] if t["role"] == "expert_up"}
    assert experts == {(layer, e) for layer in (1, 2) for e in range(8)}


def test_block_fp8_input_is_dequantized_in_the_stream(model_dir):
    """A DeepSeek block-FP8 checkpoint reads as codes * weight_scale_inv, block by block."""
    from safetensors import safe_open

    ckpt = Checkpoint(model_dir("deepseek_v3-fp8"))
    assert ckpt.is_block_fp8
    fp8 = [t for t in ckpt.tensors if t.scale_info]
    assert fp8 and all(not t.name.endswith("_scale_inv") for t in ckpt.tensors)
    t = next(x for x in fp8 if x.shape[0] % 128 and x.shape[1] >= 128) if any(
        x.shape[0] % 128 for x in fp8) else fp8[0]
    with safe_open(t.info.file, "pt") as f:
        codes = f.get_tensor(t.name)
    with safe_open(t.scale_info.file, "pt") as f:
        scale = f.get_tensor(t.name + "_scale_inv")
    want = FORMATS["fp8_b128"].dequantize(
        type("Q", (), {"codes": codes, "scale": scale, "zero": None, "shape": tuple(codes.shape)})()
    )
    torch.testing.assert_close(ckpt.load(t), want, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["int4", "fp8"])
def test_quantize_block_fp8_input(recipe, quantized_dir, tmp_path):
    """FP8 in -> int4 out is requantized from the dequantized weights; FP8 in -> FP8 out keeps the values."""
    out = quantized_dir("deepseek_v3-fp8", recipe)
    report = json.loads((out / "dsq-report.json").read_text())
    assert report["source_format"] == "block-fp8"
    errs = [t["rel_rmse"] for t in report["tensors"] if t["format"] and t["source_dtype"].startswith("F8")]
    assert errs
    if recipe == "fp8":
        assert max(errs) == 0.0  # FP8 source codes and scales carried over unchanged
        return  # (its transformers load is covered by test_fp8_layout_matches_transformers)
    with torch.no_grad():
        got = load_quantized_with_transformers(out)(PROMPT).logits
        want = load_dsq_reference(out, tmp_path)(PROMPT).logits
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance(out, want))


MIXED_RECIPE = """
base = "int4"
default = "int4_asym_g128"
[roles]
lm_head = "int8_g32"
mla_kv_b = "int8_channel"
experts = "int4_sym_g64"
attn_v = "int8_channel"
[[override]]
pattern = "model.layers.0.*"
format = "keep"
[[override]]
pattern = "re:layers\\\\.1\\\\.(self_attn\\\\.o_proj|mlp\\\\.down_proj)"
format = "int8_g128"
"""


def test_recipe_overrides_by_role_group_and_name(model_dir, tmp_path):
    from dsq.dsquant.quantize import quantize_checkpoint

    recipe = tmp_path / "mixed.toml"
    recipe.write_text(MIXED_RECIPE)
    report = quantize_checkpoint(model_dir("deepseek_v3"), tmp_path / "out", str(recipe))
    fmt = {t["name"]: t["format"] for t in report["tensors"]}
    assert fmt["lm_head.weight"] == "int8_g32"
    assert fmt["model.layers.1.self_attn.kv_b_proj.weight"] == "int8_channel"
    assert fmt["model.layers.1.mlp.experts.3.up_proj.weight"] == "int4_sym_g64"
    assert fmt["model.layers.0.mlp.gate_proj.weight"] is None
    assert fmt["model.layers.1.self_attn.o_proj.weight"] == "int8_g128"
    assert fmt["model.layers.2.self_attn.o_proj.weight"] == "int4_asym_g128"
    assert fmt["model.layers.1.self_attn.q_a_proj.weight"] == "int4_asym_g128"


@pytest.mark.parametrize(
    ("default", "expected"),
    [
        # several symmetric formats in per-module config groups: transformers runs them compressed
        ("int4_sym_g64", {"int4_sym_g64", "int8_channel", "int8_g128", "int8_g32"}),
        # asymmetric: transformers 5.23's compressed path allocates weight_zero_point unpacked while the
        # format (compressed-tensors' own compress(), vLLM) stores it packed, so it loads with dequantize=True,
        # which takes one dense scheme: a single-format recipe
        ("int4_asym_g32", {"int4_asym_g32"}),
    ],
)
def test_formats_load_in_transformers(default, expected, model_dir, tmp_path):
    from dsq.dsquant.quantize import quantize_checkpoint

    recipe = tmp_path / "r.toml"
    body = MIXED_RECIPE.replace('default = "int4_asym_g128"', f'default = "{default}"')
    recipe.write_text(body if default.startswith("int4_sym") else f'default = "{default}"\n')
    out = tmp_path / "out"
    report = quantize_checkpoint(model_dir("llama"), out, str(recipe))
    assert {t["format"] for t in report["tensors"]} - {None} == expected
    if not default.startswith("int4_sym"):
        import transformers

        with torch.no_grad():
            qc = transformers.CompressedTensorsConfig(dequantize=True)
            got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=qc)(
                PROMPT).logits
            want = load_dsq_reference(out, tmp_path)(PROMPT).logits
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * max(want.abs().max().item(), 1.0))
        return
    with torch.no_grad():
        got = load_quantized_with_transformers(out)(PROMPT).logits
        want = load_dsq_reference(out, tmp_path)(PROMPT).logits
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance(out, want))
def test_group_that_does_not_divide_falls_back_to_a_smaller_group(tmp_path):
    """qwen3 fixture: q_a-free dense model with hidden 128; int4 g256 does not exist, so use a TOML asking
    g128 on a 64-wide input: v3's kv_b input is kv_lora_rank=32 -> falls back to g32 with a note."""
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.recipes import Recipe

    from fixtures import make_checkpoint

    ckpt = Checkpoint(make_checkpoint("deepseek_v3", tmp_path / "m"))
    plan = make_plan(ckpt, Recipe("t", "int4_sym_g128"))
    kv_b = next(e for e in plan.entries if e.name == "model.layers.1.self_attn.kv_b_proj.weight")
    assert kv_b.shape[1] == 32 and kv_b.format == "int4_sym_g32" and "multiple of 128" in kv_b.note


INT_FORMATS = [f for f in FORMATS if f.startswith("int")]


@pytest.mark.parametrize("name", INT_FORMATS)
def test_layout_matches_compressed_tensors_library(name):
    """dsq's packed tensors decompress, with compressed-tensors' own compressor and the scheme dsq writes in
    config.json, to exactly dsq's dequantized values (float32 scales, so no fp16 product rounding)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from dsq.dsquant.layouts import CompressedTensorsLayout

    layout = CompressedTensorsLayout()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g) * 0.03
    qt = FORMATS[name].quantize(w, "m.weight")
    stored = {k.removeprefix("m."): v for k, v in layout.encode("m.weight", qt).items()}
    stored["weight_scale"] = stored["weight_scale"].to(torch.float32)
    config = layout.quantization_config({"m.weight": name}, [])
    scheme = QuantizationScheme.model_validate(
        {**config["config_groups"]["group_0"], "weights": {**config["config_groups"]["group_0"]["weights"],
                                                            "scale_dtype": "float32"}}
    )
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    out = compressor.decompress(dict(stored), scheme)
    torch.testing.assert_close(out["weight"].float(), qt.dequantize(), rtol=0, atol=0)
    # and dsq reads its own layout back to the identical QuantizedTensor
    back = layout.decode(FORMATS[name], {f"m.{k}": v for k, v in stored.items()}, "m")
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale.to(qt.scale.dtype), qt.scale)
    assert (back.zero is None) == (qt.zero is None) and (qt.zero is None or torch.equal(back.zero, qt.zero))


@pytest.mark.parametrize(("arch", "recipe"), [("llama", "int4"), ("deepseek_v3-fp8", "fp8"), ("deepseek_v3-fp8", "int8")])
def test_row_slices_write_the_same_bytes(arch, recipe, model_dir, tmp_path, monkeypatch):
    """Processing in 128-row slices (how large tensors keep memory flat) changes no output byte, also
    for asymmetric zero points (packed 8 rows per int32) and FP8 sources (dequantized per block row)."""
    from dsq.dsquant import plan
    from dsq.dsquant import quantize as q

    if recipe == "int4":  # asymmetric: exercise the zero-point packing across slices
        recipe_file = tmp_path / "asym.toml"
        recipe_file.write_text('default = "int4_asym_g32"\n')
        recipe = str(recipe_file)
    whole = q.quantize_checkpoint(model_dir(arch), tmp_path / "whole", recipe)
    monkeypatch.setattr(plan, "SLICE_ELEMENTS", 1)
    assert len(plan.row_slices((512, 256))) == 4
    sliced = q.quantize_checkpoint(model_dir(arch), tmp_path / "sliced", recipe)
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "sliced" / f.name).read_bytes(), f.name
    for a, b in zip(whole["tensors"], sliced["tensors"], strict=True):
        if a["rel_rmse"] is None:
            assert b["rel_rmse"] is None
        else:
            # error sums accumulate in float32 per slice (ErrorStats): slicing moves them ~1e-6 relative
            assert a["rel_rmse"] == pytest.approx(b["rel_rmse"], rel=1e-5, abs=1e-12)
            assert a["max_abs_err"] == b["max_abs_err"]
