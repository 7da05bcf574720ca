"""``dsq plan --cluster … --method gptq`` (issue 15): the calibrated run's estimate, from headers alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_v3_shaped import V3_CONFIG, make_v3_shaped  # noqa: E402


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> Path:
    return make_v3_shaped(tmp_path_factory.mktemp("v3") / "v3", scale=512, layers=5)


def test_forward_flops_match_deepseek_v3s_activated_parameters():
    """2 FLOPs per activated weight: DeepSeek-V3 reports 37B activated parameters per token; the layers'
    projections plus the lm_head (the embedding is a lookup) must come to that."""
    from dsq.dsquant.cluster_calib import forward_flops_per_token

    cfg = V3_CONFIG
    proj = [forward_flops_per_token(cfg, i >= cfg["first_k_dense_replace"], 0) / 2 for i in range(cfg["num_hidden_layers"])]
    active = sum(proj) + cfg["hidden_size"] * cfg["vocab_size"]
    assert 36e9 < active < 38.5e9
    # attention over the context grows with it: 128 heads x (192 + 128) x seqlen/2 x 2
    assert forward_flops_per_token(cfg, True, 512) - forward_flops_per_token(cfg, True, 0) == 128 * 320 * 512


def _plan(v3):
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.recipes import load_recipe

    return make_plan(Checkpoint(v3), load_recipe("int4"))


def test_calibrated_estimate_phases_nodes_memory_and_gpus(v3):
    from dsq.dsquant.cluster_calib import CalibRun, estimate_calibrated
    from dsq.dsquant.cluster_plan import ClusterSpec
    from dsq.dsquant.errors import InputError

    plan = _plan(v3)
    run = CalibRun("gptq", samples=128, seqlen=512)
    one = estimate_calibrated(plan, ClusterSpec(1, 2, 16 * 10**9), run, net_gbps=1e6)  # compute, not shipping
    eight = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9), run, net_gbps=1e6)
    for est in (one, eight):
        assert est["layers"] == 5 and set(est["per_layer"]) == {"dense", "moe"}
        assert est["per_layer"]["dense"]["layers"] == 3 and est["per_layer"]["dense"]["experts"] == 0
        assert est["total"]["seconds"] == pytest.approx(sum(est["phases"].values()) + est["lm_head_s"] + est["write_s"])
        assert est["phases"]["experts"] > 0 and est["total"]["bytes_written"] == plan.out_bytes
        assert "gpu_hypothetical" not in est
    # the experts spread over more nodes; the driver's statistics forward does not
    assert eight["phases"]["experts"] < one["phases"]["experts"] / 4
    assert eight["phases"]["statistics_forward"] == one["phases"]["statistics_forward"]
    assert one["total"]["network_bytes"] == 0 < eight["total"]["network_bytes"]  # one node ships nothing
    slow = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9), run, net_gbps=0.01)
    assert slow["total"]["seconds"] - eight["total"]["seconds"] == pytest.approx(
        eight["total"]["network_bytes"] / 0.01e9 - eight["total"]["network_bytes"] / 1e15, rel=1e-6)
    # imatrix keeps only diagonals: no X^T X, far less than GPTQ's statistics
    imx = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9), CalibRun("imatrix"))
    assert imx["phases"]["statistics_forward"] < eight["phases"]["statistics_forward"]
    # a small run: float32, drift tracked (a reference forward), as CalibOptions.resolve decides
    assert eight["calibration"]["compute_dtype"] == "float32" and eight["calibration"]["track_drift"] is True
    assert eight["phases"]["reference_forward"] == eight["phases"]["quantized_forward"] > 0
    nodrift = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9), CalibRun(track_drift=False), net_gbps=1e6)
    assert nodrift["phases"]["reference_forward"] == 0 and nodrift["total"]["seconds"] < eight["total"]["seconds"]
    # without --work-dir the layer files still go to a temporary directory, but not the streams
    tmp = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9), CalibRun(work_dir=False))
    assert 0 < tmp["phases"]["save"] < eight["phases"]["save"] and tmp["disk"]["where"] == "$TMPDIR"
    hidden = plan.checkpoint.config["hidden_size"]  # hidden.pt: both float32 streams
    assert eight["disk"]["layer_files_bytes"] - tmp["disk"]["layer_files_bytes"] == 2 * 128 * 512 * hidden * 4
    # GPUs: a hypothetical total on assumed rates, said to be one
    gpu = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9, gpus=1), run)
    assert gpu["gpu_hypothetical"]["seconds"] > 0 and "hypothetical" in gpu["gpu_hypothetical"]["assumption"]
    with pytest.raises(InputError, match="needs about"):
        estimate_calibrated(plan, ClusterSpec(1, 2, 4 * 2**30 + 10**6), run)


def test_real_width_v3_runs_without_drift_and_the_driver_holds_one_layer(tmp_path):
    """At DeepSeek-V3's widths the run is large: no reference forward; the driver holds one layer (not every
    calibrated tensor), so GPTQ fits a 256 GB node and the driver's memory does not grow with the number
    of layers; the calibrated tensors go to per-layer files instead. The forwards stay float32 under
    ``compute_dtype="auto"``: the router's ``e_score_correction_bias`` is float32 (as shipped), and
    CalibOptions.resolve wants every decoder tensor bfloat16; forced bfloat16 halves a forward task."""
    from dsq.dsquant.cluster_calib import CalibRun, estimate_calibrated
    from dsq.dsquant.cluster_plan import ClusterSpec

    plan = _plan(make_v3_shaped(tmp_path / "v3", scale=1, sparse=True))
    est = estimate_calibrated(plan, ClusterSpec(8, 32, 256 * 10**9), CalibRun())
    assert est["layers"] == 61 and est["per_layer"]["moe"]["layers"] == 58
    assert est["calibration"]["compute_dtype"] == "float32" and est["calibration"]["track_drift"] is False
    assert any("e_score_correction_bias (float32)" in a for a in est["assumptions"])
    assert est["phases"]["reference_forward"] == 0 < est["phases"]["quantized_forward"]
    # a MoE layer's float32 copy is ~45 GB per forward task
    assert 40e9 < est["memory"]["forward_task"] - 48 * 8 * 512 * 7168 * 4 < 60e9
    assert est["memory"]["driver_fits"] and est["memory"]["driver"] < 128e9
    assert not any("do not fit" in a for a in est["assumptions"])
    # ~0.56 byte per calibrated weight of int4 layer files, held on disk until the write
    layer_weights = sum(e.tensor.numel for e in plan.entries if e.tensor.ref and e.tensor.ref.layer is not None
                        and e.tensor.ref.layer < 61)
    assert 0.5 < est["disk"]["layer_files_bytes"] / layer_weights < 0.7 and est["disk"]["where"] == "--work-dir"
    few = estimate_calibrated(_plan(make_v3_shaped(tmp_path / "v3-5", scale=1, layers=5, sparse=True)),
                              ClusterSpec(8, 32, 256 * 10**9), CalibRun())
    assert few["memory"]["driver"] == est["memory"]["driver"]
    assert few["disk"]["layer_files_bytes"] < est["disk"]["layer_files_bytes"] / 8
    # forcing the drift back on adds the reference forward (as long as the quantized one) and its streams
    drift = estimate_calibrated(plan, ClusterSpec(8, 32, 256 * 10**9), CalibRun(track_drift=True))
    assert drift["phases"]["reference_forward"] == drift["phases"]["quantized_forward"]
    assert drift["memory"]["driver"] - est["memory"]["driver"] == 2 * 128 * 512 * 7168 * 4
    bf16 = estimate_calibrated(plan, ClusterSpec(8, 32, 256 * 10**9), CalibRun(compute_dtype="bfloat16"))
    assert 20e9 < bf16["memory"]["forward_task"] - 48 * 8 * 512 * 7168 * 2 < 30e9
    assert bf16["memory"]["driver"] < est["memory"]["driver"] / 1.5


def test_statistics_one_gram_per_distinct_input(tmp_path):
    """MLA's q_a/kv_a and the MLP's gate/up read one input each: a dense V3 layer's 8 linears have 6
    distinct inputs, and a routed expert's 3 have 2; the X^T X counts only the upper column blocks."""
    from dsq.dsquant.cluster_calib import _layers, stats_flops

    lays = _layers(_plan(make_v3_shaped(tmp_path / "v3", scale=1, layers=4, sparse=True)), 4)
    assert len(lays[0].linears) == 8 and sorted(lays[0].inputs.values()) == [512, 1536, 7168, 7168, 16384, 18432]
    assert len(lays[3].expert_shapes) == 3 and sorted(lays[3].expert_inputs.values()) == [2048, 7168]
    assert stats_flops(10, 4096) == 2 * 10 * 4096**2
    assert stats_flops(10, 18432) == pytest.approx(0.605 * 2 * 10 * 18432**2, rel=1e-3)


def test_cli_plan_cluster_method(v3):
    from typer.testing import CliRunner

    from dsq.cli import app

    r = CliRunner().invoke(app, ["plan", str(v3), "--cluster", "2x(cpus=8,mem=32GB,gpus=1)", "--method", "gptq",
                                 "--samples", "16", "--seqlen", "64", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)
    assert est["method"] == "gptq" and est["calibration"]["tokens"] == 16 * 64 and "gpu_hypothetical" in est
    r = CliRunner().invoke(app, ["plan", str(v3), "--cluster", "2x(cpus=8,mem=32GB)", "--method", "gptq"])
    assert r.exit_code == 0 and "in sequence" in r.output and "statistics" in r.output
    r = CliRunner().invoke(app, ["plan", str(v3), "--cluster", "2x(cpus=8,mem=32GB)", "--method", "magic"])
    assert r.exit_code == 2 and "--method 'magic'" in r.output
    r = CliRunner().invoke(app, ["plan", str(v3), "--method", "gptq"])
    assert r.exit_code == 2 and "give --cluster" in r.output
