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


def imatrix_importance(path: str | Path) -> dict:
    """{GGUF tensor name: float32 importance, all of a tensor's matrices (experts) one after the other} from a
    llama.cpp imatrix file (GGUF or .dat), as llama_model_quantize takes it."""
    import numpy as np

    from dsq.dsquant.calib.imatrix_file import read_imatrix

    return {name: e.importance().reshape(-1).astype(np.float32) for name, e in read_imatrix(path).entries.items()}


def quantize_in_process(src: Path, dst: Path, ftype: str, nthread: int = 2, importance: dict | None = None) -> None:
    """llama.cpp's ``llama_model_quantize`` through llama-cpp-python (no CLI build needed): ``ftype`` is a
    ``LLAMA_FTYPE_MOSTLY_*`` name; ``importance`` ({GGUF name: float32 values}) goes in as ``params.imatrix``,
    the zero-terminated ``llama_model_imatrix_data`` array llama-quantize --imatrix builds."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = nthread
    keep = []  # the C arrays must outlive the call
    if importance:
        entries = []
        for name, imp in importance.items():
            data = (ctypes.c_float * imp.size)(*imp.tolist())
            keep.append(data)
            entries.append(llama_cpp.llama_model_imatrix_data(name.encode(), data, imp.size))
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))(*entries)
        keep.append(arr)
        params.imatrix = arr
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} ({ftype}) failed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["quantize"]:  # quantize SRC DST FTYPE NTHREAD [IMATRIX]: one process per measured step
        a = sys.argv[2:]
        quantize_in_process(Path(a[0]), Path(a[1]), a[2], int(a[3]), imatrix_importance(a[4]) if len(a) > 4 else None)
    else:
        for name, path in ensure_tools().items():
            print(f"{name}\t{path}")


def greedy_decode(llm, n: int) -> tuple[float, float]:
    """``n`` greedy llama.cpp decode steps after what ``llm`` (a llama_cpp.Llama built with ``logits_all``) has
    evaluated, one token per ``eval``: the loop onnx_bench.py and onnx_profile.py time. Returns (wall s, CPU s)."""
    import time

    import numpy as np

    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # scores[n_tokens - 1] is the last evaluated row
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - t, time.process_time() - c
