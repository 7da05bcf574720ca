#!/usr/bin/env python3
"""llama.cpp's own command-line tools (``llama-quantize``, ``llama-imatrix``, ``llama-perplexity``), built once
from the llama.cpp sources vendored in llama-cpp-python's sdist and cached outside the repository.

llama-cpp-python exposes ``llama_model_quantize`` but not the imatrix tool, so the peer rows "Q4_K_M +
imatrix" and "IQ4_XS + imatrix" need llama.cpp's own binaries. The build is a plain CMake Release build
(``-DLLAMA_CURL=OFF -DGGML_NATIVE=ON``), one compile job under ``nice`` so it does not starve a shared machine;
it takes ~15-30 min on 2 cores and is reused afterwards (the cache key is the llama-cpp-python version).

    python bench/llamacpp_tools.py            # build if needed, print the three paths

Bench code only: tests never build or call these.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "dsq-bench"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def build_dir() -> Path:
    """Where the build lives: ~/.cache/dsq-bench/llama.cpp-build (next to the unpacked sdist)."""
    return CACHE / "llama.cpp-build"


def _sources() -> Path:
    sys.path.insert(0, str(HERE))
    from gguf_vs_llamacpp import llama_cpp_sources  # downloads the sdist with pip when not cached

    return llama_cpp_sources(None)


def tool_paths(build: Path | None = None) -> dict[str, Path]:
    """Name -> path of each built binary (they may not exist yet)."""
    build = build or build_dir()
    return {t: build / "bin" / t for t in TOOLS}


def ensure_tools(jobs: int = 1, log: Path | None = None) -> dict[str, Path]:
    """Build llama-quantize, llama-imatrix and llama-perplexity unless already built; return their paths.

    Raises RuntimeError (with the log's path) when cmake fails. ``jobs`` is cmake's -j (1 by default: the
    bench machine is shared)."""
    paths = tool_paths()
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths.values()):
        return paths
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed; it is needed to build llama.cpp's tools (apt-get install cmake)")
    src, build = _sources(), build_dir()
    build.mkdir(parents=True, exist_ok=True)
    log = log or build / "build.log"
    nice = ["nice", "-n", "15"] if shutil.which("nice") else []
    steps = [
        [*nice, "cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        [*nice, "cmake", "--build", str(build), "--config", "Release", f"-j{jobs}", "--target", *TOOLS],
    ]
    with open(log, "a") as fh:
        for cmd in steps:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building llama.cpp's tools failed: see {log}")
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"the llama.cpp build finished without {', '.join(missing)}: see {log}")
    return paths


if __name__ == "__main__":
    for name, path in ensure_tools().items():
        print(f"{name}\t{path}")
