"""ONNX export: refused inputs fail at export time with one clear DsqError and leave nothing behind;
a folder whose external data points outside itself is refused at load. Plus the other source kinds:
block-FP8 (dequantized at export) and an unquantized HF directory quantized in memory by a recipe."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from dsq.dsquant.errors import CorruptFileError, InputError, OutputError, UnsupportedError
from dsq.export.onnx_export import export_onnx, load_session


def _logits(out) -> np.ndarray:
    s = load_session(out)
    ids = np.array([[5, 17, 33, 2, 99]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5)[None]}
    for i in s.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros([1 if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape],
                                     np.float32)
    return s.run(["logits"], feeds)[0]


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(ep="coreml"), UnsupportedError, "coreml"),
        (dict(ep="dml"), UnsupportedError, "bits=8"),  # int8 MatMulNBits: no DirectML kernel
        (dict(ep="tpu"), UnsupportedError, "--ep tpu"),
        (dict(int4_block=64), UnsupportedError, "re-round"),
        (dict(int4_block=48), UnsupportedError, "--int4-block 48"),
        (dict(recipe="int4"), InputError, "already quantized"),
        (dict(attention="fused"), UnsupportedError, "attention `fused`"),
        (dict(accuracy_level=7), UnsupportedError, "accuracy_level 7"),
        (dict(ep="coreml", attention="contrib"), UnsupportedError, "no com.microsoft kernels"),
    ],
)
def test_refused_at_export_with_nothing_written(quantized_dir, tmp_path, kwargs, error, words):
    recipe = "int8" if kwargs.get("ep") == "dml" else "int4"
    out = tmp_path / "onnx"
    with pytest.raises(error, match=words):
        export_onnx(quantized_dir("llama", recipe), out, **kwargs)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mla_has_no_contrib_attention(quantized_dir, tmp_path):
    with pytest.raises(UnsupportedError, match="deepseek_v3"):
        export_onnx(quantized_dir("deepseek_v3", "int4"), tmp_path / "o", attention="contrib")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_and_existing_output(quantized_dir, tmp_path):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedError, match="gpt2"):
        export_onnx(bad, tmp_path / "o1")
    (tmp_path / "o2").mkdir()
    with pytest.raises(OutputError, match="overwrite"):
        export_onnx(quantized_dir("llama", "int4"), tmp_path / "o2")


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(quantized_dir, tmp_path, location):
    out = tmp_path / "onnx"
    export_onnx(quantized_dir("llama", "int4"), out, external_threshold=0)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    (tmp_path / "outside.data").write_bytes((out / "model.onnx.data").read_bytes())
    onnx.save(model, str(out / "model.onnx"))
    with pytest.raises(CorruptFileError, match="outside the folder"):
        load_session(out)


def test_fp8_is_dequantized_at_export(quantized_dir, tmp_path):
    from dsq.dsquant.quantized import QuantizedCheckpoint

    src = quantized_dir("llama", "fp8")
    report = export_onnx(src, tmp_path / "onnx")
    assert any("fp8" in n and "dequantized" in n for n in report["notes"])
    assert report["matmulnbits"] == []
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, t in QuantizedCheckpoint(src).iter_weights():
        if hasattr(t, "fmt"):
            assert np.array_equal(inits[name + ".T"], t.dequantize().t().numpy()), name


def test_hf_dir_with_recipe_equals_quantize_then_export(model_dir, tmp_path):
    """An unquantized source is quantized in memory by the recipe (--int4-block picks the group): the
    result is the same graph with the same values as `dsq quantize` followed by an export."""
    from dsq.dsquant.quantize import quantize_checkpoint

    recipe = tmp_path / "g64.toml"
    recipe.write_text('default = "int4_sym_g64"\n[roles]\nlm_head = "keep"\n')
    direct = export_onnx(model_dir("llama"), tmp_path / "direct", int4_block=64)
    quantize_checkpoint(model_dir("llama"), tmp_path / "q", str(recipe))
    export_onnx(tmp_path / "q", tmp_path / "via")
    assert direct["matmulnbits"] == ["int4_sym_g64->bits4"]
    np.testing.assert_array_equal(_logits(tmp_path / "direct"), _logits(tmp_path / "via"))


def test_cli_export_to_onnx(quantized_dir, tmp_path):
    """`dsq export --to onnx`: a folder onnxruntime loads; a refused EP is one `error:` line, exit 2, nothing written."""
    from typer.testing import CliRunner

    from dsq.cli import app

    runner = CliRunner()
    out = tmp_path / "onnx"
    res = runner.invoke(app, ["export", str(quantized_dir("qwen3", "int4")), "--to", "onnx", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["model_type"] == "qwen3" and _logits(out).shape == (1, 5, 320)
    bad = tmp_path / "bad"
    res = runner.invoke(app, ["export", str(quantized_dir("qwen3", "int4")), "--to", "onnx", "-o", str(bad), "--ep", "coreml"])
    assert res.exit_code == 2 and "error: --ep coreml" in res.output and "Traceback" not in res.output
    assert not bad.exists()


def test_coreml_gets_the_plain_graph(model_dir, tmp_path):
    """--ep coreml from a float checkpoint: attention auto resolves to standard ops only (CoreML has no
    com.microsoft kernels), so nothing in the graph is outside the ONNX domain."""
    import onnx

    report = export_onnx(model_dir("qwen2"), tmp_path / "o", ep="coreml")
    assert report["attention_impl"] == "gqa"
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert {n.domain for n in model.graph.node} == {""}
