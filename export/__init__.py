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


def export_model(model: str, to: str, output: str | Path | None = None, **options) -> tuple[Path, dict]:
    """Export ``model`` to target ``to``; ``options`` the target does not take are refused by name."""
    from ..dsquant.errors import InputError

    if to not in EXPORTERS:
        raise InputError(f"--to {to}: unknown target; choose one of: {', '.join(EXPORTERS)}")
    target, suffix = EXPORTERS[to]
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    accepted = inspect.signature(fn).parameters
    for key in options:
        if key not in accepted:
            raise InputError(f"--{key.replace('_', '-')} is not an option of --to {to}")
    out = Path(output) if output else Path(Path(model).name + suffix)
    return out, fn(model, out, **options)
