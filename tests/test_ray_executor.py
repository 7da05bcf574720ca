"""``dsq quantize --executor ray`` (issue 15) on a DeepSeek-V3-shaped block-FP8 checkpoint.

A local Ray cluster (2 CPUs) quantizes the tiny V3-shaped variant (bench/make_v3_shaped.py: the real
expert counts, 3 dense + 2 MoE layers + the MTP layer, 163 shards) and every output file must be the
same bytes as ``--executor local``'s; then a worker dies mid-run, then the driver is SIGKILLed
mid-run and a second run resumes from ``--work-dir``. The cluster is started and stopped here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_v3_shaped import make_v3_shaped, v3_config  # noqa: E402

pytestmark = pytest.mark.slow
SHARD_BYTES = 400_000  # several output shards, so units straddle shard boundaries


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def assert_same_output(a: Path, b: Path) -> None:
    """Every file the same bytes, except the report: its timing differs, and its error statistics are
    float32 sums whose order follows the process's thread count (the quantized bytes do not)."""
    da, db = _digests(a), _digests(b)
    assert sorted(da) == sorted(db)
    assert len([n for n in da if n.endswith(".safetensors")]) > 1
    differ = [n for n in da if da[n] != db[n]]
    assert differ in ([], ["dsq-report.json"]), differ
    ra, rb = (json.loads((d / "dsq-report.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r["summary"].pop("seconds")
        r["summary"].pop("mean_rel_rmse")
        r["summary"]["worst_rel_rmse"] = r["summary"]["worst_rel_rmse"][1]
        for t in r["tensors"]:
            t["rel_rmse"] = t["rel_rmse"] and round(t["rel_rmse"], 5)
            t["max_abs_err"] = t["max_abs_err"] and round(t["max_abs_err"], 5)
    assert ra == rb


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> Path:
    return make_v3_shaped(tmp_path_factory.mktemp("v3") / "DeepSeek-V3-tiny", scale=512, layers=5)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_int4(v3, tmp_path_factory) -> Path:
    from dsq.dsquant.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("local") / "int4"
    quantize_checkpoint(v3, out, "int4", max_shard_bytes=SHARD_BYTES)
    return out


def test_generator_has_deepseek_v3_counts(v3):
    """The fixture is V3-shaped: 163 shards and index, block-FP8 with scales, 256 routed + 1 shared
    experts in every MoE layer and the MTP layer, MLA projections."""
    from dsq.dsquant.checkpoint import Checkpoint

    ck = Checkpoint(v3)
    assert len(ck.files) == 163 and ck.is_block_fp8
    refs = [t.ref for t in ck.tensors]
    assert all(r is not None for r in refs)
    layers = {r.layer for r in refs if r.layer is not None}
    assert layers == set(range(6))  # 5 decoder layers + MTP
    for layer in (3, 4, 5):
        experts = {r.expert for r in refs if r.layer == layer and r.expert is not None}
        assert experts == set(range(256))
        assert any(r.layer == layer and r.role.value == "shared_up" for r in refs)
    assert not any(r.expert is not None for r in refs if r.layer in (0, 1, 2))
    assert {r.role.value for r in refs} >= {"mla_q_a", "mla_kv_b", "mtp_proj", "mtp_head", "router_bias"}
    fp8 = [t for t in ck.tensors if t.scale_info]
    assert fp8 and all(t.scale_info.shape == tuple(math.ceil(d / 128) for d in t.shape) for t in fp8)


def test_sparse_real_width_variant_plans_like_v3(tmp_path):
    """The header-only variant at real widths: real-sized (sparse) files, so `dsq plan` sees 671B."""
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.recipes import load_recipe

    out = make_v3_shaped(tmp_path / "v3", scale=1, sparse=True)
    files = sorted(out.glob("*.safetensors"))
    apparent = sum(f.stat().st_size for f in files)
    assert len(files) == 163
    assert abs(apparent - 688.6e9) / 688.6e9 < 0.002  # the published checkpoint: 163 files, 688.6 GB
    assert sum(f.stat().st_blocks * 512 for f in files) < apparent / 1000  # holes, not data
    plan = make_plan(Checkpoint(out), load_recipe("int4"))
    params = sum(e.tensor.numel for e in plan.entries)
    assert 670e9 < params < 690e9  # 671B + the 14B MTP module, as DeepSeek reports
    assert len({e.tensor.ref.layer for e in plan.entries if e.tensor.ref.layer is not None}) == 62


def test_ray_matches_local(ray_cluster, v3, local_int4, tmp_path):
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.dsquant.ray_executor import RayExecutor

    cfg = v3_config(512, 5)
    ex = RayExecutor()
    quantize_checkpoint(v3, tmp_path / "ray", "int4", max_shard_bytes=SHARD_BYTES, executor=ex)
    assert_same_output(local_int4, tmp_path / "ray")
    # units: per layer attention + mlp/router, per MoE layer (3 with MTP) 256 experts + the shared one,
    # and 9 tensors alone (embedding, norm, lm_head; the MTP layer's embedding, norms, eh_proj and head)
    moe = cfg["num_hidden_layers"] + 1 - cfg["first_k_dense_replace"]
    assert ex.units_total == 2 * (cfg["num_hidden_layers"] + 1) + moe * 257 + 9
    assert sum(v["bytes"] for v in ex.nodes.values()) > 0
    assert not list(tmp_path.glob(".*partial"))
    # each task asked Ray for the memory of its largest tensor's row slice (the plan's per-worker peak)
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.recipes import load_recipe

    assert ex.task_memory == make_plan(Checkpoint(v3), load_recipe("int4")).peak_rss_estimate


def test_cli_ray_fp8_matches_local(ray_cluster, v3, tmp_path):
    """Through the CLI (FP8 -> FP8 passes codes and scales through), one output shard."""
    from typer.testing import CliRunner

    from dsq.cli import app

    for ex in ("local", "ray"):
        r = CliRunner().invoke(app, ["quantize", str(v3), "-o", str(tmp_path / ex), "--recipe", "fp8", "--executor", ex])
        assert r.exit_code == 0, r.output
    da, db = _digests(tmp_path / "local"), _digests(tmp_path / "ray")
    assert [n for n in da if da[n] != db[n]] in ([], ["dsq-report.json"])
    r = CliRunner().invoke(app, ["quantize", str(v3), "-o", str(tmp_path / "x"), "--executor", "dask"])
    assert r.exit_code == 2 and "--executor dask" in r.output


def _dies_on_first_call(marker: str):
    """run_units, except that the first call anywhere kills its worker process (os._exit)."""
    from dsq.dsquant.ray_executor import run_units

    def unit_fn(source, layout, jobs):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return run_units(source, layout, jobs)
        os.close(fd)
        os._exit(1)

    return unit_fn


def test_killed_worker_is_retried(ray_cluster, v3, local_int4, tmp_path):
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.dsquant.ray_executor import RayExecutor

    marker = tmp_path / "killed-once"
    ex = RayExecutor(unit_fn=_dies_on_first_call(str(marker)))
    quantize_checkpoint(v3, tmp_path / "ray", "int4", max_shard_bytes=SHARD_BYTES, executor=ex)
    assert marker.exists()  # a worker did die
    assert_same_output(local_int4, tmp_path / "ray")


_DRIVER = """
import sys
from dsq.dsquant.quantize import quantize_checkpoint
from dsq.dsquant.ray_executor import RayExecutor
quantize_checkpoint(sys.argv[2], sys.argv[3], "int4", max_shard_bytes=int(sys.argv[5]),
                    executor=RayExecutor(address=sys.argv[1], work_dir=sys.argv[4], task_bytes=0))
"""


def test_killed_driver_resumes_from_work_dir(ray_cluster, v3, local_int4, tmp_path):
    """A driver SIGKILLed after some units leaves no output; a rerun with the same --work-dir skips
    the logged units and finishes with the same bytes."""
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.dsquant.ray_executor import DONE_LOG, RayExecutor

    work, out = tmp_path / "work", tmp_path / "ray"
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, address, str(v3), str(out), str(work), str(SHARD_BYTES)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    logged = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list(work.glob(f"ray-*/{DONE_LOG}"))
            logged = len(logs[0].read_text().splitlines()) if logs else 0
            if logged >= 20:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert logged >= 20, proc.stderr.read().decode()[-2000:]
    assert not out.exists()
    ex = RayExecutor(work_dir=work)
    quantize_checkpoint(v3, out, "int4", max_shard_bytes=SHARD_BYTES, executor=ex)
    assert ex.units_skipped >= 20 and ex.units_skipped < ex.units_total
    assert_same_output(local_int4, out)
    assert not list(work.glob("ray-*"))  # the state is dropped once the output is in place


def test_done_log_ignores_torn_and_foreign_records(tmp_path):
    """A kill mid-write leaves a torn last line; a record whose unit is not in the plan (or has another
    tensor count) is not trusted."""
    from dsq.dsquant.ray_executor import DONE_LOG, RayExecutor, Unit

    ex = RayExecutor(work_dir=tmp_path)
    ex.state_dir = tmp_path
    rec = {"unit": "layer 3 expert 0", "results": [[0, {}], [1, {}], [2, {}]]}
    (tmp_path / DONE_LOG).write_text(
        json.dumps(rec) + "\n" + json.dumps({"unit": "layer 3 expert 1", "results": [[3, {}]]}) + "\n"
        + json.dumps({"unit": "layer 9 mlp", "results": []}) + "\n" + '{"unit": "layer 3 expert 2", "resu'
    )
    units = [Unit("layer 3 expert 0", [0, 1, 2], 1), Unit("layer 3 expert 1", [3, 4, 5], 1), Unit("layer 3 expert 2", [6], 1)]
    assert list(ex._load_log(units)) == ["layer 3 expert 0"]
