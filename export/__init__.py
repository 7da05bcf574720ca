"""dsq.export: writers that re-pack dsq's quantized values for runtimes (GGUF, ONNX), never re-rounding.

``EXPORTERS`` is the one table of targets; ``export_model`` dispatches to one lazily, so importing
this package costs nothing.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

# --to target -> ("module:function", default output suffix). Each function takes (src, out, **options)
# and returns a report dict.
EXPORTERS: dict[str, tuple[str, str]] = {
    "gguf": ("dsq.export.gguf_writer:export_gguf", ".gguf"),
    "onnx": ("dsq.export.onnx_export:export_onnx", "-onnx"),
    "mlx": ("dsq.export.mlx_writer:export_mlx", "-mlx"),
}


def default_output(model: str, to: str) -> Path:
    """Where ``dsq export MODEL --to TO`` writes without ``-o``: beside a local MODEL, else in the current folder."""
    suffix = EXPORTERS[to][1]
    p = Path(model)
    if p.exists():
        p = p.resolve()
        return p.with_name(p.name + suffix)
    return Path(p.name + suffix)  # a hub id: org/name -> ./name.gguf


def export_model(model: str, to: str, output: str | Path | None = None, progress=None, check: bool = False,
                 **options) -> tuple[Path, dict]:
    """Export ``model`` to target ``to``; ``options`` the target does not take are refused by name.

    ``progress(done, total, detail)`` is passed to targets that report progress. ``check``: then run
    ``dsq check`` on the output against ``model`` (``report["check"]``, see
    :func:`dsq.runtimes.check.check_after_export`). Returns (output path, the target's report dict).
    Raises InputError for an unknown target or option, and whatever the target raises (its DsqErrors:
    see ``export_gguf``, ``export_onnx``, ``export_mlx``).
    """
    from ..dsquant.errors import InputError

    if to not in EXPORTERS:
        raise InputError(f"--to {to}: unknown target; choose one of: {', '.join(EXPORTERS)}")
    target, _ = EXPORTERS[to]
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    accepted = inspect.signature(fn).parameters
    for key in options:
        if key not in accepted:
            raise InputError(f"--{key.replace('_', '-')} is not an option of --to {to}")
    out = Path(output) if output else default_output(model, to)
    if progress is not None and "progress" in accepted:
        options["progress"] = progress
    report = fn(model, out, **options)
    if check:
        from ..runtimes.check import check_after_export

        report["check"] = check_after_export(model, out, report)
    return out, report
