"""`dsq eval` with a reference too large for memory: logits computed one decoder layer at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dsq.cli import app
from dsq.runtimes.torch_runtime import TorchRuntime

TEXT = Path(__file__).parent / "data" / "tiny_corpus.txt"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_layerwise_logits_equal_the_whole_model(model_dir, arch, one_torch_thread):
    path = model_dir(arch)
    ids = [[5, 17, 99, 3, 42, 7, 8, 250], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9]]
    whole = TorchRuntime.load(path, "cpu", layerwise=False)
    stream = TorchRuntime.load(path, "cpu", layerwise=True)
    assert stream.layerwise and "layer by layer" in stream.description
    for want, got in zip([whole.logits(i) for i in ids], stream.logits_batch(ids), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * float(np.abs(want).max()))
    with pytest.raises(Exception, match="generation needs the whole model"):
        stream.prefill([1, 2, 3])


def test_eval_with_a_layerwise_reference_matches_the_whole_one(model_dir, quantized_dir, tmp_path, monkeypatch):
    ref, q = model_dir("qwen2"), quantized_dir("qwen2", "int4")
    args = ["eval", str(q), "--ref", str(ref), "--text", str(TEXT), "--ctx", "48", "--chunks", "3", "--threads", "2"]
    res = runner_json(args + ["--cache-dir", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")])
    monkeypatch.setenv("DSQ_REF_LAYERWISE", "1")
    res2 = runner_json(args + ["--cache-dir", str(tmp_path / "b"), "--json", str(tmp_path / "b.json")])
    a, b = res["results"], res2["results"]
    assert "layer by layer" in b[0]["description"] and "layer by layer" not in a[0]["description"]
    assert b[0]["ppl"] == pytest.approx(a[0]["ppl"], rel=1e-4)
    assert b[1]["kld_mean"] == pytest.approx(a[1]["kld_mean"], rel=1e-2, abs=1e-6)
    assert b[1]["top1"] == pytest.approx(a[1]["top1"], abs=0.02)


def runner_json(args: list[str]) -> dict:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = Path(args[args.index("--json") + 1])
    return json.loads(out.read_text())
