"""MLX export correctness gate: mlx_lm loads dsq's export unmodified and computes with dsq's values.

For every fixture architecture (dense Llama/Qwen2/Qwen3 and DeepSeek-V2/V3 MLA+MoE) and int4, int8 and
asymmetric int4 (g64; g128 with an int8 lm_head, so the config carries a per-layer entry):

* ``mlx_lm.load`` reads the folder as written; with ``dtype="float32"`` every weight is dsq's value, so the
  prefill logits match transformers on dsq's dequantized weights within ``ATOL`` (only summation order
  differs) and a greedy decode through mlx_lm's KV cache reproduces the reference's tokens;
* the default ``dtype="float16"`` export: MLX's dequantized weights equal dsq's exactly for symmetric
  int4/int8, and within the stated per-group bound for asymmetric int4 (the fp16 bias); MLX then computes
  in float16, so its logits match within ``FP16_ATOL``;
* the same weights dequantize to the same floats from the MLX, ONNX and GGUF exports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'dsq[mlx]')")
mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'dsq[mlx]')")

from test_onnx_export import NEW_TOKENS, PROMPT, reference_model, torch_greedy  # noqa: E402

from dsq.dsquant.errors import BadWeightsError, UnsupportedError  # noqa: E402
from dsq.dsquant.formats import FORMATS  # noqa: E402
from dsq.dsquant.quantized import QuantizedCheckpoint  # noqa: E402
from dsq.export.mlx_writer import bias_bound, export_mlx, to_mlx  # noqa: E402

from fixtures import tied_copy  # noqa: E402

ATOL = 1e-4  # float32 export: max |logit difference| (observed <= 1.1e-6); logits are O(1)
FP16_ATOL = 0.03  # float16 export: MLX computes activations in float16 (observed <= 0.0075)
RECIPES = {
    "asym64": 'default = "int4_asym_g64"\n',
    "asym128": 'default = "int4_asym_g128"\n[roles]\nlm_head = "int8_g32"\n',
    "channel": 'default = "int8_channel"\n',
    "experts8": 'base = "int4"\n[roles]\nexperts = "int8_g32"\n',
    "expertskeep": 'base = "int4"\n[roles]\nexperts = "keep"\n',
    "expert0": 'base = "int4"\n[[override]]\npattern = "model.layers.1.mlp.experts.0.*"\nformat = "int8_g32"\n',
}
DENSE = ("llama", "qwen2", "qwen3")
CASES = [(a, r) for a in DENSE for r in ("int4", "int8", "asym64", "asym128")] + [
    ("deepseek_v2", "int4"), ("deepseek_v3", "int4"), ("deepseek_v3", "asym64"), ("deepseek_v3", "experts8"),
    ("qwen3_moe", "int4"), ("qwen3_moe", "asym64"), ("qwen3_moe", "expertskeep"),
]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """recipe(name) -> a preset name, or the path of one of RECIPES written as TOML."""
    folder = tmp_path_factory.mktemp("mlx-recipes")

    def get(name: str) -> str:
        if name not in RECIPES:
            return name
        path = folder / f"{name}.toml"
        path.write_text(RECIPES[name])
        return str(path)

    return get


@pytest.fixture(scope="module")
def quantized(quantized_dir, recipe):
    return lambda arch, name: quantized_dir(arch, recipe(name))


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    cache: dict = {}

    def get(arch: str, name: str, dtype: str = "float16") -> tuple[Path, dict]:
        if (arch, name, dtype) not in cache:
            out = tmp_path_factory.mktemp(f"mlx-{arch}-{name}-{dtype}") / "mlx"
            cache[arch, name, dtype] = (out, export_mlx(quantized(arch, name), out, dtype=dtype))
        return cache[arch, name, dtype]

    return get


@pytest.fixture(scope="module")
def reference(quantized, tmp_path_factory):
    cache: dict = {}

    def get(arch: str, name: str):
        if (arch, name) not in cache:
            cache[arch, name] = reference_model(quantized(arch, name), tmp_path_factory.mktemp(f"ref-{arch}-{name}"))
        return cache[arch, name]

    return get


def mlx_greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Prefill, then n-1 single-token steps through mlx_lm's own KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    first = np.array(logits.astype(mx.float32))
    tokens = [int(np.argmax(first[0, -1]))]
    for _ in range(n - 1):
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
        tokens.append(int(np.argmax(np.array(logits[0, -1].astype(mx.float32)))))
    return tokens, first


def mlx_weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def mlx_dequantized(weights: dict, module: str, group_size: int, bits: int) -> np.ndarray:
    """MLX's own unpacking (mx.dequantize), computed in float32 so it adds no rounding of its own."""
    w = mx.dequantize(weights[module + ".weight"], weights[module + ".scales"].astype(mx.float32),
                      weights[module + ".biases"].astype(mx.float32), group_size=group_size, bits=bits)
    return np.array(w)


@pytest.mark.parametrize("arch,name", CASES)
def test_mlx_lm_loads_the_export_and_matches_transformers(arch, name, exported, reference, one_torch_thread):
    """float32 export: mlx_lm.load unmodified; prefill logits and a greedy decode match the torch reference."""
    out, report = exported(arch, name, "float32")
    model, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode("hello world") and report["max_bias_bound"] == 0.0
    tokens, logits = mlx_greedy(model, PROMPT, NEW_TOKENS)
    ref_tokens, ref_logits = torch_greedy(reference(arch, name), PROMPT, NEW_TOKENS)
    diff = float(np.abs(logits - ref_logits).max())
    assert diff <= ATOL, f"{arch}/{name}: max |logit diff| {diff:.2e} > {ATOL}"
    assert tokens == ref_tokens
    q = json.loads((out / "config.json").read_text())["quantization"]
    if name == "experts8":  # the int8 experts are named by the path mlx_lm stacks them into
        assert q["bits"] == 4 and q["model.layers.1.mlp.switch_mlp.up_proj"] == {"group_size": 32, "bits": 8}
        assert not any(".experts." in k for k in q)
        return
    group = {"int4": 32, "int8": 32, "asym64": 64, "asym128": 128, "expertskeep": 32}[name]
    assert q["group_size"] == group and q["bits"] == (8 if name == "int8" else 4)
    if name == "asym128":  # the int8_g32 lm_head is named with its own packing
        assert q["lm_head"] == {"group_size": 32, "bits": 8}


@pytest.mark.parametrize("arch,name", [(a, r) for a in DENSE for r in ("int4", "asym128")])
def test_float16_default_export_matches_within_fp16_compute(arch, name, exported, reference, one_torch_thread):
    out, _ = exported(arch, name)
    model, _ = mlx_lm.load(str(out))
    logits = np.array(model(mx.array([PROMPT])).astype(mx.float32))
    _, ref_logits = torch_greedy(reference(arch, name), PROMPT, 1)
    diff = float(np.abs(logits - ref_logits).max())
    assert diff <= FP16_ATOL, f"{arch}/{name}: max |logit diff| {diff:.2e} > {FP16_ATOL}"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("name", ["int4", "int8", "asym64", "asym128"])
def test_mlx_weights_are_dsqs_values(name, dtype, quantized, exported):
    """Every quantized weight, unpacked by MLX, is dsq's dequantized value: exactly, except the float16
    asymmetric bias -z*s, which moves each weight by at most its group's bias_bound (half an fp16 ulp)."""
    src = quantized("qwen2", name)
    out, report = exported("qwen2", name, dtype)
    weights = mlx_weights(out)
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    tdt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    checked, moved = 0, 0.0
    for wname, qt in QuantizedCheckpoint(src).iter_weights():
        mod = wname.removesuffix(".weight")
        if not hasattr(qt, "fmt"):
            assert weights[wname].dtype == getattr(mx, dtype)
            assert np.array_equal(np.array(weights[wname].astype(mx.float32)), qt.to(tdt).float().numpy()), wname
            continue
        packing = cfg.get(mod, cfg)
        assert packing["group_size"] == qt.fmt.block_cols and packing["bits"] == qt.fmt.bits
        assert weights[mod + ".scales"].dtype == getattr(mx, dtype)
        got = mlx_dequantized(weights, mod, packing["group_size"], packing["bits"])
        want = qt.dequantize().numpy()
        bound = bias_bound(qt, tdt).repeat_interleave(qt.fmt.block_cols, 1).numpy()
        err = np.abs(got - want)
        assert (err <= bound).all(), f"{wname}: {err.max():.3g} over the bound"
        if qt.zero is None or dtype == "float32":
            assert np.array_equal(got, want), wname
        moved = max(moved, float(err.max()))
        checked += 1
    # 2 layers x (q, k, v, o, gate, up, down); the asym recipes (no base preset) quantize lm_head too
    assert checked == 14 + name.startswith("asym")
    asym_fp16 = name.startswith("asym") and dtype == "float16"
    # the bound is not vacuous: fp16 does round some biases, by at most 2**-11 of |z*s| <= 15 * max scale
    assert (moved > 0) == asym_fp16
    assert report["max_bias_bound"] >= moved and (report["max_bias_bound"] > 0) == asym_fp16


def test_to_mlx_packing_is_mlx_quantize_order():
    """Codes packed by dsq unpack through mx.dequantize to w = scale * q + bias, for every format with a twin;
    an int8 bias -128*s past float16's range is refused in float16 and exact in float32."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g) * 0.05
    for fmt in ("int4_sym_g32", "int4_sym_g64", "int4_sym_g128", "int4_asym_g32", "int4_asym_g64",
                "int4_asym_g128", "int8_g32", "int8_g128"):
        qt = FORMATS[fmt].quantize(w, "w")
        packed, scales, biases = to_mlx(qt, "w", torch.float32)
        assert packed.dtype == torch.uint32 and packed.shape == (16, 256 * qt.fmt.bits // 32)
        got = mx.dequantize(mx.array(packed.view(torch.int32).numpy()).view(mx.uint32), mx.array(scales.numpy()),
                            mx.array(biases.numpy()), group_size=qt.fmt.block_cols, bits=qt.fmt.bits)
        assert np.array_equal(np.array(got), qt.dequantize().numpy()), fmt
    big = FORMATS["int8_g32"].quantize(w * 1e6, "big")  # scales ~ 1e3: 128 * s passes 65504
    with pytest.raises(BadWeightsError, match="big: .*overflows float16; export with dtype float32"):
        to_mlx(big, "big", torch.float16)
    assert torch.isfinite(to_mlx(big, "big", torch.float32)[2]).all()


def test_tied_embeddings_are_reused_as_the_output_layer(quantized_dir, tmp_path):
    """tie_word_embeddings: no lm_head tensor is written; mlx_lm uses the embedding, and the logits match."""
    src = tied_copy(quantized_dir("llama", "int4"), tmp_path / "tied")
    export_mlx(src, tmp_path / "mlx", dtype="float32")
    assert not any(k.startswith("lm_head") for k in mlx_weights(tmp_path / "mlx"))
    assert json.loads((tmp_path / "mlx" / "config.json").read_text())["tie_word_embeddings"] is True
    (tmp_path / "ref").mkdir()
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    tokens, logits = mlx_greedy(model, PROMPT, NEW_TOKENS)
    ref_tokens, ref_logits = torch_greedy(reference_model(src, tmp_path / "ref"), PROMPT, NEW_TOKENS)
    assert float(np.abs(logits - ref_logits).max()) <= ATOL
    assert tokens == ref_tokens


def test_formats_without_an_mlx_twin_are_refused(quantized, model_dir, tmp_path):
    """int8_channel (one scale per row) and block FP8 have no MLX affine layout: one line naming the
    tensor and what to do, and nothing written."""
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\..*int8_channel has no exact MLX layout.*--recipe int4"):
        export_mlx(quantized("llama", "channel"), tmp_path / "a")
    with pytest.raises(UnsupportedError, match=r"fp8_b128 has no exact MLX layout \(MLX's affine quantization has no FP8"):
        export_mlx(model_dir("llama-fp8"), tmp_path / "b")
    with pytest.raises(UnsupportedError, match=r"experts\.1\.down_proj\.weight: int4_sym_g32 but .*experts\.0\.down_proj"
                                               r"\.weight is int8_g32; mlx_lm stacks a layer's experts"):
        export_mlx(quantized("deepseek_v3", "expert0"), tmp_path / "d")
    with pytest.raises(UnsupportedError, match="bfloat16 cannot hold dsq's fp16 scales"):
        export_mlx(quantized("llama", "int4"), tmp_path / "c", dtype="bfloat16")
    assert not any(tmp_path.iterdir())


def test_side_file_linked_outside_is_refused_before_any_work(quantized, tmp_path):
    """Tokenizer files are copied through Checkpoint.side_files(): one linked out of the folder stops the
    export before any weight is written, naming the file."""
    from dsq.dsquant.errors import InputError

    src = tmp_path / "src"
    shutil.copytree(quantized("llama", "int4"), src)
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(InputError, match=r"tokenizer_config\.json: points outside the model directory"):
        export_mlx(src, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists() and not list(tmp_path.glob(".mlx.*"))


def test_float_checkpoint_exports_unquantized(model_dir, tmp_path):
    """A plain HF checkpoint becomes a float MLX folder (no quantization key) that mlx_lm loads."""
    report = export_mlx(model_dir("qwen3"), tmp_path / "mlx", dtype="float32")
    cfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert "quantization" not in cfg and all(f.startswith("float:") for f in report["formats"])
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert np.array(model(mx.array([PROMPT]))).shape == (1, len(PROMPT), 320)


def test_sharded_export_loads(quantized, tmp_path):
    """Past max_shard_bytes the weights split into model-0000i-of-0000n.safetensors plus an index; mlx_lm
    reads them all, and the values are those of the single-file export."""
    report = export_mlx(quantized("llama", "int4"), tmp_path / "mlx", max_shard_bytes=300_000)
    files = sorted(p.name for p in (tmp_path / "mlx").glob("*.safetensors"))
    assert len(files) > 2 and files == report["files"] and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "mlx" / "model.safetensors.index.json").read_text())
    weights = mlx_weights(tmp_path / "mlx")
    assert set(index["weight_map"]) == set(weights) and set(index["weight_map"].values()) == set(files)
    export_mlx(quantized("llama", "int4"), tmp_path / "one")
    single = mlx_weights(tmp_path / "one")
    assert all(np.array_equal(np.array(single[k]), np.array(v)) for k, v in weights.items())
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert np.isfinite(np.array(model(mx.array([PROMPT])).astype(mx.float32))).all()


def test_mlx_onnx_and_gguf_exports_carry_the_same_values(quantized_dir, exported, tmp_path):
    """The same values everywhere: each int4 (Q4_0 / MatMulNBits 4-bit) and int8 (Q8_0 / 8-bit) weight
    dequantizes to the same float32 values from dsq's checkpoint, the MLX folder, model.onnx and the .gguf
    (bytes too, except that MLX's scale*q + bias gives +0.0 where c*s of a negative scale gives -0.0)."""
    import onnx
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from onnx import numpy_helper

    from dsq.export.gguf_writer import export_gguf
    from dsq.export.onnx_export import export_onnx
    from dsq.export.onnx_weights import PackedNBits, unpack_matmulnbits

    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    for recipe, bits in (("int4", 4), ("int8", 8)):
        src = quantized_dir("qwen2", recipe)  # qwen2: llama.cpp's converter stores q/k unpermuted
        mlx_dir, _ = exported("qwen2", recipe)
        export_onnx(src, tmp_path / f"{recipe}-onnx")
        export_gguf(src, tmp_path / f"{recipe}.gguf")
        weights = mlx_weights(mlx_dir)
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"{recipe}-onnx" / "model.onnx")).graph.initializer}
        gguf = {t.name: t for t in GGUFReader(tmp_path / f"{recipe}.gguf").tensors}
        checked = 0
        for name, qt in QuantizedCheckpoint(src).iter_weights():
            if not hasattr(qt, "fmt"):
                continue
            mod = name.removesuffix(".weight")
            dsq_values = qt.dequantize().numpy()
            from_mlx = mlx_dequantized(weights, mod, 32, bits)
            B = inits[name + ".B"]
            n, nb, blob = B.shape
            from_onnx = unpack_matmulnbits(PackedNBits(B, inits[name + ".scales"], None, nb * blob * 8 // bits, n,
                                                       bits, blob * 8 // bits)).numpy()
            layer, rest = mod.removeprefix("model.layers.").split(".", 1)
            t = gguf[f"blk.{layer}.{gguf_names[rest]}.weight"]
            from_gguf = dequantize(t.data, t.tensor_type).reshape(qt.shape).astype(np.float32)
            assert dsq_values.tobytes() == from_onnx.tobytes() == from_gguf.tobytes(), name
            # MLX computes scale*q + bias: a zero code of a negative scale comes out +0.0 where c*s gives -0.0
            # (+ 0.0 maps -0.0 to +0.0; every other bit must agree)
            assert (from_mlx + 0.0).tobytes() == (dsq_values + 0.0).tobytes(), name
            checked += 1
        assert checked == 14


def test_cli_export_to_mlx(quantized_dir, tmp_path):
    """`dsq export --to mlx`: a folder mlx_lm loads; a refused format is one `error:` line, exit 2, nothing written."""
    from typer.testing import CliRunner

    from dsq.cli import app

    runner = CliRunner()
    out = tmp_path / "mlx"
    res = runner.invoke(app, ["export", str(quantized_dir("qwen3", "int4")), "--to", "mlx", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["model_type"] == "qwen3" and summary["dtype"] == "float16"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    res = runner.invoke(app, ["export", str(quantized_dir("qwen3", "int4")), "--to", "mlx", "-o", str(tmp_path / "x"),
                              "--ep", "cpu"])
    assert res.exit_code == 2 and "error: --ep is not an option of --to mlx" in res.output
    assert not (tmp_path / "x").exists()


def test_mlx_runtime_matches_torch_on_the_same_values(exported, quantized_dir):
    """The mlx runtime plugin: reads the export (and refuses other kinds), tokenizes like the torch runtime,
    its logits match torch on dsq's values (float32 compute on CPU), and prefill + decode through its cache
    agree with them."""
    from dsq.runtimes.base import GenerationStats
    from dsq.runtimes.mlx_runtime import MlxRuntime
    from dsq.runtimes.torch_runtime import TorchRuntime

    out, _ = exported("qwen2", "int4")  # float16 folder; the runtime computes in float32 on CPU
    assert MlxRuntime.available().ok and "cpu" in MlxRuntime.available().devices
    assert MlxRuntime.accepts(out) is None
    assert "reads an MLX-LM folder, but this is a Hugging Face directory" in MlxRuntime.accepts(quantized_dir("qwen2", "int4"))
    assert "reads a Hugging Face directory, but this is an MLX-LM folder" in TorchRuntime.accepts(out)
    with MlxRuntime.load(out) as rt, TorchRuntime.load(quantized_dir("qwen2", "int4")) as ref:
        text = "The quick brown fox jumps over the lazy dog."
        ids = ref.tokenize(text)
        assert rt.tokenize(text) == ids and rt.vocab_size == ref.vocab_size
        a, b = rt.logits(ids), ref.logits(ids)
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.abs(a - b).max() <= ATOL
        rt.prefill(ids[:-1])
        np.testing.assert_allclose(rt.decode(ids[-1]), a[-1], atol=1e-5)
        assert rt.description == "mlx on cpu (float32)"
        assert 0 in rt.eos_ids and rt.chat_template  # <|endoftext|>, template carried by the export
        runs = [GenerationStats(), GenerationStats()]
        for r, st in zip((rt, ref), runs, strict=True):
            list(r.generate(ids[:5], max_new_tokens=6, stats=st))
        assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 6
