"""llama-cpp and onnxruntime backends on dsq's own GGUF and ONNX exports of the tiny fixture:
logits match the torch runtime on the same quantized values, `dsq eval` gates them, `dsq run`/`chat` work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dsq.cli import app

runner = CliRunner()
TEXT = Path(__file__).parent / "data" / "tiny_corpus.txt"
FAST = ["--ctx", "48", "--chunks", "3", "--threads", "2"]


def _need(module: str, what: str):
    """Skip when an optional runtime package is not installed (dsq's own exporters are imported directly)."""
    return pytest.importorskip(module, reason=f"{what} is not installed")


@pytest.fixture(scope="module")
def gguf_int8(quantized_dir, tmp_path_factory):
    _need("llama_cpp", "llama-cpp-python")
    from dsq.export.gguf_writer import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "qwen2-int8.gguf"
    export_gguf(quantized_dir("qwen2", "int8"), out)
    return out


@pytest.fixture(scope="module")
def onnx_int4(quantized_dir, tmp_path_factory):
    _need("onnxruntime", "onnxruntime")
    from dsq.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "qwen2-int4"
    export_onnx(quantized_dir("qwen2", "int4"), out)
    return out


@pytest.mark.parametrize("which,recipe", [("gguf_int8", "int8"), ("onnx_int4", "int4")])
def test_native_runtime_matches_torch_on_same_values(which, recipe, request, quantized_dir):
    from dsq.runtimes.registry import load

    path = request.getfixturevalue(which)
    with load(quantized_dir("qwen2", recipe), "torch") as ref, load(path, n_ctx=64, threads=2) as rt:
        text = "The quick brown fox jumps over the lazy dog."
        ids = ref.tokenize(text)
        assert rt.tokenize(text) == ids and rt.vocab_size == ref.vocab_size
        a, b = rt.logits(ids), ref.logits(ids)
        assert a.shape == b.shape and a.dtype == np.float32
        # llama.cpp quantizes activations to 8 bits inside its Q8_0 matmuls; onnxruntime's MatMulNBits does not.
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
        rt.prefill(ids[:-1])
        np.testing.assert_allclose(rt.decode(ids[-1]), a[-1], atol=1e-4)
        assert 0 in rt.eos_ids and rt.chat_template  # <|endoftext|>, template carried by the export


def test_eval_gguf_and_onnx_gate(gguf_int8, onnx_int4, model_dir, tmp_path):
    js = tmp_path / "r.json"
    args = ["eval", str(gguf_int8), str(onnx_int4), "--ref", str(model_dir("qwen2")), "--text", str(TEXT), *FAST,
            "--cache-dir", str(tmp_path), "--json", str(js)]
    res = runner.invoke(app, [*args, "--max-kld", "0.5", "--min-top1", "0.3", "--max-ppl-ratio", "1.5"])
    assert res.exit_code == 0, res.output
    rows = json.loads(js.read_text())["results"]
    assert [r["runtime"] for r in rows] == ["torch", "llama-cpp", "onnxruntime"]
    assert rows[0]["verdict"] == "ref" and all(r["tokens"] == 3 * 47 for r in rows)
    assert all(r["passed"] and r["verdict"] == "PASS" for r in rows[1:])
    assert rows[1]["kld_mean"] < rows[2]["kld_mean"]  # int8 GGUF closer than int4 ONNX
    res = runner.invoke(app, [*args, "--max-ppl-ratio", "0.5"])
    assert res.exit_code == 1
    assert "[llama-cpp]" in res.output and "[onnxruntime]" in res.output and "--max-ppl-ratio" in res.output


@pytest.mark.parametrize("which", ["gguf_int8", "onnx_int4"])
def test_run_and_chat(which, request):
    path = str(request.getfixturevalue(which))
    res = runner.invoke(app, ["run", path, "-p", "The quick", "-n", "6", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert "prompt + " in res.output
    res = runner.invoke(app, ["chat", path, "-n", "5", "--temperature", "0"], input="hi\nhello again\n")
    assert res.exit_code == 0, res.output
    assert (("llama-cpp" if which == "gguf_int8" else "onnxruntime") + " on cpu") in res.output


def test_wrong_file_for_runtime(gguf_int8, onnx_int4):
    res = runner.invoke(app, ["run", str(onnx_int4), "-p", "x", "--runtime", "llama-cpp"])
    assert res.exit_code == 2 and "reads a GGUF file, but this is an ONNX model" in res.output
    res = runner.invoke(app, ["run", str(gguf_int8), "-p", "x", "--runtime", "onnxruntime"])
    assert res.exit_code == 2 and "reads an ONNX model, but this is a GGUF file" in res.output
