"""``dsq plan --cluster`` (issue 15): the per-node estimate for ``--executor ray``, from headers alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_v3_shaped import make_v3_shaped  # noqa: E402


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> Path:
    return make_v3_shaped(tmp_path_factory.mktemp("v3") / "v3", scale=512, layers=5)


def test_parse_cluster():
    from dsq.dsquant.cluster_plan import ClusterSpec, parse_cluster
    from dsq.dsquant.errors import InputError

    assert parse_cluster("8x(cpus=32,mem=256GB)") == ClusterSpec(8, 32, 256 * 10**9, 0)
    assert parse_cluster(" 2 x ( cpus=4, mem=16GiB, gpus=1 )") == ClusterSpec(2, 4, 16 * 2**30, 1)
    for bad, why in [("8(cpus=32,mem=1GB)", "expected"), ("8x(cpus=32)", "needs cpus= and mem="),
                     ("8x(cpus=32,mem=lots)", "not a size"), ("8x(cpus=32,mem=1GB,tpus=2)", "unknown"),
                     ("0x(cpus=32,mem=1GB)", "at least one node")]:
        with pytest.raises(InputError, match=why):
            parse_cluster(bad)


def test_estimate_spreads_every_unit_once(v3):
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.cluster_plan import ClusterSpec, estimate, tensor_seconds
    from dsq.dsquant.errors import InputError
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.ray_executor import unit_key
    from dsq.dsquant.recipes import load_recipe

    plan = make_plan(Checkpoint(v3), load_recipe("int4"))
    one = estimate(plan, ClusterSpec(1, 4, 64 * 10**9))
    four = estimate(plan, ClusterSpec(4, 4, 64 * 10**9))
    assert four["units"] == one["units"] == len({unit_key(e) for e in plan.entries})
    for est in (one, four):
        assert sum(r["units"] for r in est["nodes"]) == est["units"]
        assert sum(r["tensors"] for r in est["nodes"]) == len(plan.entries)
        assert est["total"]["bytes_written"] == plan.out_bytes
        assert est["total"]["cpu_seconds"] == pytest.approx(sum(tensor_seconds(e) for e in plan.entries))
    # four nodes: the compute splits about evenly (many small units), so about a quarter of one node's
    c1, c4 = one["nodes"][0]["compute_s"], max(r["compute_s"] for r in four["nodes"])
    assert c1 / 4 <= c4 < c1 / 4 * 1.1
    # memory limits workers per node: 4 CPUs but room for 2 workers
    tight = estimate(plan, ClusterSpec(1, 4, int(4 * 2**30 + 2.5 * plan.peak_rss_estimate)))
    assert tight["nodes"][0]["workers"] == 2
    with pytest.raises(InputError, match="one worker needs"):
        estimate(plan, ClusterSpec(1, 4, 4 * 2**30))


def test_cli_plan_cluster(v3):
    from typer.testing import CliRunner

    from dsq.cli import app

    r = CliRunner().invoke(app, ["plan", str(v3), "--cluster", "2x(cpus=8,mem=32GB)", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)
    assert len(est["nodes"]) == 2 and est["cluster"]["cpus"] == 8
    r = CliRunner().invoke(app, ["plan", str(v3), "--cluster", "2x(cpus=8)"])
    assert r.exit_code == 2 and "needs cpus= and mem=" in r.output
