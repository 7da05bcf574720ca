"""What a user installs: dsq's wheel in a fresh virtual environment, with only its declared dependencies.

An editable install hides missing packages (the repository is on sys.path); this test builds the
wheel from a copy of the sources, installs it with pip into a new venv (torch==2.13.0 first, the CPU
build), imports every module of the installed package, and runs the README's main commands from a
folder outside the repository. Optional extras are not installed, so it also proves that a plain
``pip install dsq`` refuses an extra-only command with one line saying what to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

from fixtures import make_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_SKIP_COPY = {".venv", ".git", "out", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "tests", "bench"}

# Runs inside the fresh venv: import every module of the installed dsq; report what failed and why.
_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import dsq
from dsq.dsquant.extras import MODULE_EXTRA
seen, failed = [], {}
for m in pkgutil.walk_packages(dsq.__path__, "dsq."):
    try:
        importlib.import_module(m.name)
        seen.append(m.name)
    except ModuleNotFoundError as e:
        failed[m.name] = [e.name, (e.name or "").split(".")[0] in MODULE_EXTRA]
print(json.dumps({"file": dsq.__file__, "path": sys.path, "imported": seen, "failed": failed}))
"""


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, a clean environment, a work folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=lambda d, names: [n for n in names if n in _SKIP_COPY or n.endswith(".egg-info")])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    build = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", src], tmp, env)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list((tmp / "dist").glob("dsq-*.whl"))
    assert len(wheels) == 1, wheels
    venv_dir = tmp / "venv"
    made = _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv_dir], tmp, env)
    assert made.returncode == 0, made.stderr
    bin_dir = venv_dir / "bin"
    # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA wheel on a CPU machine
    pip = _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0", wheels[0]], tmp, env, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    work = tmp / "work"
    work.mkdir()
    return bin_dir, env, work


def test_wheel_holds_every_subpackage_and_imports(installed):
    bin_dir, env, work = installed
    r = _run([bin_dir / "python", "-c", _IMPORT_ALL], work, env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    assert Path(info["file"]).is_relative_to(bin_dir.parent), info["file"]  # the wheel, not the checkout
    assert not any(str(REPO) in p for p in info["path"]), "the repository leaked onto the venv's sys.path"
    # every package folder in the sources is a package in the wheel (the bug: dsq.dsquant.calib was missing)
    source_pkgs = {"dsq." + ".".join(p.parent.relative_to(REPO).parts) for p in REPO.glob("*/**/__init__.py")
                   if not ({"tests", "bench", ".venv", "build"} & set(p.relative_to(REPO).parts))}
    missing = source_pkgs - set(info["imported"]) - set(info["failed"])
    assert not missing, f"packages not in the wheel: {sorted(missing)}"
    # modules may only fail for an optional extra's package, never for a core one
    bad = {m: why for m, why in info["failed"].items() if not why[1]}
    assert not bad, f"modules that fail to import with the core dependencies: {bad}"
    for core in ("dsq.cli", "dsq.dsquant.quantize", "dsq.dsquant.calib.pipeline", "dsq.export.gguf_writer",
                 "dsq.runtimes.registry"):
        assert core in info["imported"]


def test_wheel_quantize_export_inspect(installed, tmp_path):
    bin_dir, env, work = installed
    model = make_checkpoint("qwen2", tmp_path / "model")
    dsq = bin_dir / "dsq"
    r = _run([dsq, "calib", "list"], work, env)
    assert r.returncode == 0 and "reasoning" in r.stdout, r.stderr
    r = _run([dsq, "calib", "list", "--json"], work, env)  # every set readable: the .gz data is in the wheel
    assert r.returncode == 0 and {"literature", "poetry_zh", "reasoning_zh"} <= {x["name"] for x in json.loads(r.stdout)}
    r = _run([dsq, "quantize", model, "-o", work / "q", "--recipe", "int4"], work, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "q" / "dsq-report.json").is_file()
    r = _run([dsq, "export", work / "q", "--to", "gguf", "-o", work / "m.gguf"], work, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "carried dsq's quantized values exactly" in r.stdout
    r = _run([dsq, "inspect", work / "m.gguf", "--json"], work, env)
    assert r.returncode == 0, r.stderr[-3000:]
    types = {t["type"] for t in json.loads(r.stdout)["tensors"]}
    assert "Q4_0" in types


def test_wheel_without_extras_names_the_extra(installed, tmp_path):
    """A core install has no onnx: `export --to onnx` says which extra to install, in one line."""
    bin_dir, env, work = installed
    probe = _run([bin_dir / "python", "-c", "import onnx"], work, env)
    if probe.returncode == 0:
        pytest.skip("onnx is importable in the fresh venv (a dependency pulled it in)")
    model = make_checkpoint("llama", tmp_path / "model")
    r = _run([bin_dir / "dsq", "export", model, "--to", "onnx", "-o", work / "x-onnx"], work, env)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'dsq[onnx]'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (work / "x-onnx").exists()


def test_every_extra_named_by_hints_exists():
    from dsq.dsquant.extras import MODULE_EXTRA

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(MODULE_EXTRA.values()) <= set(extras), set(MODULE_EXTRA.values()) - set(extras)


def test_readme_commands_are_the_makefile_targets():
    """README opens with the two commands a newcomer runs; both exist in the Makefile, and CI runs `make test`."""
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [ln.split("#")[0].strip() for ln in first_block.strip().splitlines()] == ["make demo", "make test"]
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
