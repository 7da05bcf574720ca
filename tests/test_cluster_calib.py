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
    # imatrix keeps only diagonals: no float64 X^T X, far less than GPTQ's statistics
    imx = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9), CalibRun("imatrix"))
    assert imx["phases"]["statistics_forward"] < eight["phases"]["statistics_forward"]
    # without --work-dir nothing is saved per layer
    assert estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9), CalibRun(work_dir=False))["phases"]["save"] == 0
    # GPUs: a hypothetical total on assumed rates, said to be one
    gpu = estimate_calibrated(plan, ClusterSpec(8, 2, 16 * 10**9, gpus=1), run)
    assert gpu["gpu_hypothetical"]["seconds"] > 0 and "hypothetical" in gpu["gpu_hypothetical"]["assumption"]
    with pytest.raises(InputError, match="needs about"):
        estimate_calibrated(plan, ClusterSpec(1, 2, 4 * 2**30 + 10**6), run)


def test_real_width_v3_driver_memory_counts_every_calibrated_tensor(tmp_path):
    """At DeepSeek-V3's widths the driver holds every calibrated tensor until the write: more than a
    256 GB node, and the estimate says so; a MoE layer's float32 copy is ~45 GB per forward task."""
    from dsq.dsquant.cluster_calib import CalibRun, estimate_calibrated
    from dsq.dsquant.cluster_plan import ClusterSpec

    plan = _plan(make_v3_shaped(tmp_path / "v3", scale=1, sparse=True))
    est = estimate_calibrated(plan, ClusterSpec(8, 32, 256 * 10**9), CalibRun())
    assert est["layers"] == 61 and est["per_layer"]["moe"]["layers"] == 58
    assert 40e9 < est["memory"]["forward_task"] - 48 * 8 * 512 * 7168 * 4 < 60e9
    assert not est["memory"]["driver_fits"] and any("does not fit" in a for a in est["assumptions"])
    big = estimate_calibrated(plan, ClusterSpec(8, 32, 2 * 10**12), CalibRun())
    assert big["memory"]["driver_fits"] and big["slots_per_node"]["forward"] > est["slots_per_node"]["forward"]


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
