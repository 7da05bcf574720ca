"""Calibrated ``dsq quantize --method gptq|awq --executor ray`` (issue 15) on tiny checkpoints.

Layers stay sequential; inside a layer every linear's and every routed expert's quantization is a Ray
task and the layer forward is split over the calibration batches (ray_executor.RayCalibPool). The
output must be the same bytes as ``--executor local``'s, a run killed after a layer must resume from
``--work-dir``, and progress must count units. A 2-CPU local Ray cluster is started and stopped here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.slow
CALIB = ["--samples", "4", "--seqlen", "32"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _calibration_report(d: Path) -> dict:
    """The report's calibration section without wall times (which differ run to run)."""
    cal = json.loads((d / "dsq-report.json").read_text())["calibration"]
    for row in cal["layers"]:
        row.pop("seconds")
    return cal


def _quantize(model: Path, out: Path, method: str, executor: str, *extra: str) -> None:
    from dsq.cli import app

    r = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), "--recipe", "int4", "--method", method,
                                 *CALIB, "--executor", executor, *extra])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("arch, method", [("deepseek_v3", "gptq"), ("deepseek_v3", "awq")])
def test_calibrated_ray_run_is_byte_identical_to_local(ray_cluster, one_torch_thread, model_dir, tmp_path, arch, method):
    """MLA, a dense first layer, then routed experts (GPTQ per expert; AWQ scales each expert's down_proj)."""
    src = model_dir(arch)
    _quantize(src, tmp_path / "local", method, "local")
    _quantize(src, tmp_path / "ray", method, "ray")
    da, db = _digests(tmp_path / "local"), _digests(tmp_path / "ray")
    assert sorted(da) == sorted(db) and any(n.endswith(".safetensors") for n in da)
    assert [n for n in da if da[n] != db[n]] in ([], ["dsq-report.json"])  # only the report's timings may differ
    assert _calibration_report(tmp_path / "local") == _calibration_report(tmp_path / "ray")


def test_units_run_as_tasks_report_progress_and_resume_from_work_dir(ray_cluster, one_torch_thread, model_dir, tmp_path):
    """One task per quantized linear and per routed expert, plus the split forwards; progress names
    ``k/n units`` within each layer; a run stopped after layer 0 resumes at layer 1 and ends with the
    same bytes as an uninterrupted local run."""
    from dsq.dsquant.calib.hook import CalibSpec
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.dsquant.ray_executor import RayExecutor

    src = model_dir("deepseek_v3")
    _quantize(src, tmp_path / "local", "gptq", "local")
    spec = CalibSpec("gptq", samples=4, seqlen=32, work_dir=str(tmp_path / "work"))
    seen: list[tuple[int, int, str]] = []

    class Stop(Exception):
        pass

    def stop_after_layer_0(done: int, total: int, detail: str) -> None:
        seen.append((done, total, detail))
        if done == 1 and "rel. err" in detail:
            raise Stop

    ex = RayExecutor()
    with pytest.raises(Stop):
        quantize_checkpoint(src, tmp_path / "ray", "int4", calibration=spec, calib_progress=stop_after_layer_0,
                            executor=ex)
    assert not (tmp_path / "ray").exists()
    units = [d for _, _, d in seen if "units" in d]
    assert units and units[-1].endswith("units (linears, experts) done") and "layer 0:" in units[-1]
    k, n = units[-1].split(": ")[1].split(" ")[0].split("/")
    assert k == n and int(n) >= 5  # layer 0 (dense, MLA): its attention projections and MLP linears
    assert ex.calib is not None and ex.calib.tasks >= int(n) + 2  # + the split forwards

    ex = RayExecutor()
    report = quantize_checkpoint(src, tmp_path / "ray", "int4", calibration=spec, executor=ex)
    assert report["calibration"]["resumed_from_layer"] == 1
    experts = 8 * 2  # layers 1 and 2 are MoE with 8 routed experts each
    assert ex.calib.tasks >= experts
    da, db = _digests(tmp_path / "local"), _digests(tmp_path / "ray")
    assert [n for n in da if da[n] != db[n]] in ([], ["dsq-report.json"])


def _dies_once(marker: str):
    """A job function whose first call anywhere kills its worker process (os._exit); later calls double x."""

    def fn(x: int) -> int:
        import os

        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return 2 * x
        os.close(fd)
        os._exit(1)

    return fn


def _refusing():
    """A job function that raises dsq's InputError (made here so Ray pickles it by value)."""

    def fn(x: int) -> int:
        from dsq.dsquant.errors import InputError

        raise InputError(f"job {x}: refused")

    return fn


def test_calib_pool_retries_a_dead_worker_and_reraises_dsq_errors(ray_cluster, tmp_path):
    from dsq.dsquant.errors import InputError
    from dsq.dsquant.ray_executor import RayCalibPool

    pool = RayCalibPool(ray_cluster, task_cpus=1)
    marker = tmp_path / "killed-once"
    done: list[int] = []
    assert pool.map(_dies_once(str(marker)), [(x,) for x in range(5)], done.append) == [0, 2, 4, 6, 8]
    assert marker.exists() and done == [1, 2, 3, 4, 5]
    with pytest.raises(InputError, match="job 0: refused"):
        pool.map(_refusing(), [(0,)])


def _threads_and_resources():
    """A job reporting what its task got: torch's thread count and the Ray resources assigned to it
    (made here so Ray pickles it by value)."""

    def fn(x):
        import ray
        import torch

        return torch.get_num_threads(), ray.get_runtime_context().get_assigned_resources(), float(x.sum())

    return fn


def _apply():
    def run(layer, x):
        return layer(x)

    return run


def test_calib_tasks_run_their_num_cpus_threads_and_ask_for_memory(ray_cluster):
    """Each task asks Ray for task_cpus CPUs and runs torch on that many threads (whatever the driver
    runs), and asks for memory: the worker's base plus a multiple of the tensors it is given (an
    object-store reference counts as the tensor it names)."""
    from dsq.dsquant.plan import BASE_RSS_BYTES
    from dsq.dsquant.ray_executor import CALIB_WORK_FACTOR, RayCalibPool

    x = torch.ones(1024, 1024)  # 4 MiB
    for cpus in (1, 2):
        pool = RayCalibPool(ray_cluster, task_cpus=cpus)
        shared = pool.share(x)
        (threads, got, total), = pool.map(_threads_and_resources(), [(shared,)])
        assert threads == cpus and got["CPU"] == cpus and total == x.numel()
        assert got["memory"] == pool.max_task_memory == BASE_RSS_BYTES + CALIB_WORK_FACTOR * x.numel() * 4
    # a forward task: the layer once (a forward does not copy its weights), its batches three times
    pool = RayCalibPool(ray_cluster, task_cpus=1)
    lin, xs = torch.nn.Linear(256, 256), [torch.ones(4, 256), torch.ones(4, 256)]
    ys = pool.forward(_apply(), lin, xs)
    assert [y.shape for y in ys] == [(4, 256)] * 2 and torch.equal(ys[0], lin(xs[0]).detach())
    layer_bytes = sum(p.numel() * 4 for p in lin.parameters())
    assert pool.max_task_memory == BASE_RSS_BYTES + layer_bytes + CALIB_WORK_FACTOR * 4 * 256 * 4
    with pytest.raises(Exception, match="--task-cpus 0"):
        from dsq.dsquant.ray_executor import RayExecutor

        RayExecutor(task_cpus=0)


def _v3_tiny(root: Path) -> Path:
    """The V3-shaped bed at scale 512 (real expert counts), 3 dense layers + 1 MoE layer of 256 experts."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from make_v3_shaped import make_v3_shaped

    return make_v3_shaped(root / "DeepSeek-V3-tiny", scale=512, layers=4)


PROSE = str(Path(__file__).resolve().parents[1] / "calib_data" / "prose.txt")
V3_CALIB = ["--recipe", "int4", "--method", "gptq", *CALIB, "--calib", PROSE]


def test_killed_calibrated_driver_resumes_from_work_dir(ray_cluster, one_torch_thread, tmp_path):
    """`dsq quantize --method gptq --executor ray --work-dir W` SIGKILLed once layer 1 is saved in W
    leaves nothing at -o; the same command again resumes after the saved layers and ends with the
    same bytes as a local run (one torch thread, as each task has)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dsq.cli import app

    src, work, out = _v3_tiny(tmp_path), tmp_path / "work", tmp_path / "ray"
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "local"), *V3_CALIB])
    assert r.exit_code == 0, r.output
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "dsq.cli", "quantize", str(src), "-o", str(out), *V3_CALIB, "--executor", "ray",
           "--ray-address", address, "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    saved = 0
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            state = work / "state.json"
            saved = json.loads(state.read_text())["next_layer"] if state.is_file() else 0
            if saved >= 2:  # layers 0 and 1 are in the work dir
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 2 <= saved < 4, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".*ray*"))  # nothing half-written at or beside -o
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), *V3_CALIB, "--executor", "ray",
                                 "--work-dir", str(work)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "dsq-report.json").read_text())["calibration"]["resumed_from_layer"] == saved
    da, db = _digests(tmp_path / "local"), _digests(out)
    assert sorted(da) == sorted(db)
    assert [n for n in da if da[n] != db[n]] in ([], ["dsq-report.json"])
