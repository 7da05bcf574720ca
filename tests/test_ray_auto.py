"""``dsq quantize --executor ray --ray-address auto`` against a cluster ``ray start --head`` made (issue 15).

The test starts the head itself (``ray start --head --block`` in a temporary directory, on free
ports, as a child process), quantizes the tiny V3-shaped bed through the CLI with ``--ray-address
auto``, checks the driver joined that cluster rather than starting its own, that the output is the
same bytes as ``--executor local``, and kills the head's process group (``ray stop`` would stop
every Ray cluster on the machine, other test runs' too).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from make_v3_shaped import make_v3_shaped  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


@pytest.fixture
def ray_head():
    """A one-node cluster from ``ray start --head`` (2 CPUs); yields its GCS address; stopped afterwards."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.is_file():
        pytest.skip("the `ray` command is not installed beside this Python")
    temp = tempfile.mkdtemp(prefix="dsqray-")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # `auto` must find the head by itself
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
         "--include-dashboard", "false", "--dashboard-agent-listen-port", str(_free_port()),
         "--temp-dir", temp, "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 90
        for line in head.stdout:  # --block prints its banner, then blocks
            lines.append(line.decode(errors="replace"))
            if "Ray runtime started" in lines[-1] or "--block" in lines[-1] or time.monotonic() > deadline:
                break
        if head.poll() is not None or not any("Ray runtime started" in x for x in lines):
            pytest.fail("ray start --head did not start:\n" + "".join(lines[-30:]))
        yield f"127.0.0.1:{port}"
    finally:
        # the head's processes (gcs_server, raylet, their workers) share its session's process group;
        # they do not all end promptly on SIGTERM, and nothing of this throwaway cluster needs saving
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_auto_joins_a_ray_start_head_cluster(ray_head, tmp_path, monkeypatch):
    import ray

    from dsq.cli import app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    src = make_v3_shaped(tmp_path / "DeepSeek-V3-tiny", scale=512, layers=4)
    for ex in ("local", "ray"):
        extra = ["--executor", "ray", "--ray-address", "auto"] if ex == "ray" else []
        r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / ex), "--recipe", "int4", *extra])
        assert r.exit_code == 0, r.output
    da, db = _digests(tmp_path / "local"), _digests(tmp_path / "ray")
    assert da and da == db
    # the head's cluster did the work: its GCS knows a finished job that ran from this process
    ray.init(address=ray_head, log_to_driver=False)
    try:
        jobs = ray.state.jobs()
        assert any(j.get("IsDead") and j.get("DriverPid") == os.getpid() for j in jobs), jobs
    finally:
        ray.shutdown()
