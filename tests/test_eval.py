"""`dsq eval`: KLD maths, the reference-logit cache, thresholds -> exit codes, refusals, JSON/HTML reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dsq.cli import app
from dsq.runtimes.eval.kld import keep_most_likely, kld_bounds, log_softmax

runner = CliRunner()
TEXT = Path(__file__).parent / "data" / "tiny_corpus.txt"
FAST = ["--ctx", "48", "--chunks", "3", "--threads", "2"]


def _exact(lp, lq):
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


@pytest.mark.parametrize("coverage,k_max", [(0.9, 64), (0.99, 200), (0.5, 8)])
def test_kld_bounds_bracket_the_exact_value(coverage, k_max):
    rng = np.random.default_rng(0)
    logits_p = rng.normal(0, 3, (200, 300))
    lp = log_softmax(logits_p)
    lq = log_softmax(logits_p + rng.normal(0, 0.5, logits_p.shape))
    idx, tl, n = keep_most_likely(lp, coverage, k_max)
    lo, hi = kld_bounds(idx, tl.astype(np.float64), lq)
    exact = _exact(lp, lq)
    assert np.all(lo <= exact + 1e-9) and np.all(hi >= exact - 1e-9)
    assert n.min() >= min(32, k_max) and n.max() <= k_max
    # Rows whose kept tokens reach the coverage have a tail of at most 1 - coverage.
    kept_mass = np.exp(tl.astype(np.float64)).sum(axis=1)
    assert np.all((kept_mass >= coverage - 1e-6) | (n == k_max))


def test_kld_exact_when_every_token_is_kept():
    rng = np.random.default_rng(1)
    lp = log_softmax(rng.normal(0, 2, (20, 50)))
    lq = log_softmax(rng.normal(0, 2, (20, 50)))
    idx, tl, _ = keep_most_likely(lp, 1.0 + 1e-9, 50)
    lo, hi = kld_bounds(idx, tl.astype(np.float64), lq)
    np.testing.assert_allclose(lo, _exact(lp, lq), rtol=1e-5)
    np.testing.assert_allclose(hi, lo, rtol=1e-5)


def test_eval_gate_passes_loose_fails_impossible(model_dir, quantized_dir, tmp_path):
    ref = model_dir("qwen2")
    q8, q4 = quantized_dir("qwen2", "int8"), quantized_dir("qwen2", "int4")
    cache = tmp_path / "cache"
    js, page = tmp_path / "r.json", tmp_path / "r.html"
    args = ["eval", str(q8), str(q4), "--ref", str(ref), "--text", str(TEXT), *FAST, "--cache-dir", str(cache)]
    res = runner.invoke(app, [*args, "--max-kld", "1.0", "--min-top1", "0.3", "--max-ppl-ratio", "1.5",
                              "--json", str(js), "--html", str(page)])
    assert res.exit_code == 0, res.output
    rep = json.loads(js.read_text())
    assert rep["schema"] == "dsq.eval/1" and rep["passed"] and not rep["ref_cached"]
    assert rep["settings"]["coverage"] == 0.99 and rep["settings"]["top_k"] == 1024
    ref_row, r8, r4 = rep["results"]
    assert ref_row["is_reference"] and ref_row["tokens"] == 3 * 47
    for r in (r8, r4):
        assert r["runtime"] == "torch" and r["tokens"] == 3 * 47
        assert 0 < r["kld_mean"] <= r["kld_upper_mean"] and r["kld_median"] <= r["kld_p99"] <= r["kld_max"]
        assert 0 < r["top1"] <= 1 and sum(r["kld_hist"]["counts"]) == r["tokens"]
    assert r8["kld_mean"] < r4["kld_mean"]  # 8 bits stay closer to bf16 than 4 bits
    assert "<img" in page.read_text() and "data:image/png;base64," in page.read_text()
    assert "qwen2-int8" not in res.output or "PASS" in res.output

    # Impossible thresholds: exit 1, one message per failed check naming model, runtime and flag.
    res = runner.invoke(app, [*args, "--max-kld", "0", "--min-top1", "1.01", "--json", str(js)])
    assert res.exit_code == 1, res.output
    rep = json.loads(js.read_text())
    assert rep["ref_cached"] and not rep["passed"]  # second run reused the cached reference logits
    assert len(list(cache.glob("*.npz"))) == 1
    for r in rep["results"][1:]:
        assert any("--max-kld 0" in f for f in r["failures"]) and any("--min-top1" in f for f in r["failures"])
    assert "FAIL" in res.output and "[torch]" in res.output and "--max-kld" in res.output


def test_eval_reference_against_itself_is_zero(model_dir, tmp_path):
    ref = model_dir("qwen2")
    js = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", str(ref), "--ref", str(ref), "--text", str(TEXT), *FAST,
                              "--cache-dir", str(tmp_path), "--max-kld", "1e-9", "--min-top1", "1", "--json", str(js)])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())["results"][1]
    assert r["kld_max"] < 1e-9 and r["top1"] == 1.0 and abs(r["ppl_ratio"] - 1) < 1e-6


def test_eval_refuses_other_tokenizer(model_dir, quantized_dir, tmp_path):
    other = tmp_path / "other"
    # llama, not qwen2: for model_type qwen2 transformers (and so dsq) runs Qwen2Tokenizer's own pre-tokenizer
    shutil.copytree(quantized_dir("llama", "int8"), other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True  # same vocabulary, different splits
    (other / "tokenizer.json").write_text(json.dumps(tj))
    res = runner.invoke(app, ["eval", str(other), "--ref", str(model_dir("llama")), "--text", str(TEXT), *FAST,
                              "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2, res.output
    assert "tokenizer" in res.output and "meaningless" in res.output and "Traceback" not in res.output


def test_eval_refuses_short_text_and_missing_text(model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short for a chunk.")
    base = ["eval", str(model_dir("qwen2")), "--ref", str(model_dir("qwen2")), "--cache-dir", str(tmp_path)]
    res = runner.invoke(app, [*base, "--text", str(short), "--ctx", "64"])
    assert res.exit_code == 2 and "shorter than one chunk of --ctx 64" in res.output
    res = runner.invoke(app, [*base, "--text", str(tmp_path / "nope.txt")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_loop_detector_and_final_number():
    from dsq.runtimes.reasoning import final_number, has_loop

    assert has_loop([5, 6, 7] + [1, 2, 3, 4] * 4)
    assert has_loop([9] * 20)
    assert not has_loop([1, 2, 3, 4] * 3)  # three repeats: not yet a loop
    assert not has_loop([7, 7, 7, 7])  # too short a span to call a loop
    assert not has_loop(list(range(100)))
    assert final_number("<think>maybe 40 or 41</think>The answer is 1,024.") == "1024"
    assert final_number("no digits") is None


def test_eval_reasoning_check(model_dir, quantized_dir, tmp_path):
    ref = str(model_dir("qwen2"))
    js = tmp_path / "r.json"
    base = ["eval", ref, str(quantized_dir("qwen2", "int4")), "--ref", ref, "--text", str(TEXT), *FAST,
            "--cache-dir", str(tmp_path), "--json", str(js)]
    res = runner.invoke(app, [*base, "--min-answer-agree", "0.5"])
    assert res.exit_code == 2 and "needs --reasoning" in res.output
    res = runner.invoke(app, [*base, "--reasoning", "8", "--max-loops", "5"])
    assert res.exit_code == 0, res.output
    rows = json.loads(js.read_text())["results"]
    assert all(len(r["answers"]) == 5 and 0 <= r["loops"] <= 5 for r in rows)
    assert rows[1]["answer_agree"] == 1.0 and rows[1]["same_text"] == 1.0  # the reference as a candidate
    assert "math answers" in res.output
    assert len(list(tmp_path.glob("*-answers-8.json"))) == 1
