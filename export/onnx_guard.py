"""The ONNX external-data guard: refuse a model whose external data would be read from outside its folder.

An ONNX file can keep tensor bytes in other files, named by a ``location`` string in the model
(https://onnx.ai/onnx/repo-docs/ExternalData.html). onnxruntime before 1.21 follows ``../../x``,
absolute paths and symlinks out of the folder (CVE-2022-25882, CVE-2024-27318, CVE-2025-51480), so a
crafted model could read any file the user can. dsq checks every location itself before any
onnxruntime session is created, whatever the installed onnxruntime version. Imports only ``onnx``
(no torch): the onnxruntime runtime calls it on every load.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..dsquant.errors import CorruptFileError, InputError
from ..dsquant.paths import resolve_model_file

MODEL_NAME = "model.onnx"


def check_onnx_file(model: str | Path) -> Path:
    """Check the ONNX file ``model`` and return it (as given: onnxruntime looks for external data next to it).

    Refuses (CorruptFileError naming the file and tensor) any external-data ``location`` that is absolute,
    has a ``..`` component, resolves outside the model's folder (symlink), is not a regular file, or whose
    ``offset``/``length`` run past the end of that file. Raises InputError if ``model`` is missing or not a
    regular file, CorruptFileError if it does not parse as ONNX.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = Path(model)
    path = resolve_model_file(model.parent, model.name)
    if path is None:
        raise InputError(f"{model}: no such file")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{model}: empty file (0 bytes); not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not ONNX
        raise CorruptFileError(f"{model}: not a readable ONNX model ({' '.join(str(e).split())[:200]})") from None
    for t in _get_all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        parts = set(PurePosixPath(loc).parts) | set(PureWindowsPath(loc).parts)
        if not loc or os.path.isabs(loc) or PureWindowsPath(loc).is_absolute() or ".." in parts:
            raise CorruptFileError(
                f"{model}: tensor `{t.name}` points its external data outside the folder ({loc!r}); refused"
            )
        try:
            target = resolve_model_file(model.parent, loc)
        except InputError:
            raise CorruptFileError(
                f"{model}: tensor `{t.name}` points its external data outside the folder ({loc!r} is a link out "
                "or not a regular file); refused"
            ) from None
        if target is None:
            raise CorruptFileError(f"{model}: tensor `{t.name}` needs external data file {loc!r}, which is missing")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0) or 0)
        except ValueError:
            raise CorruptFileError(f"{model}: tensor `{t.name}` has a non-numeric external-data offset/length") from None
        if offset < 0 or length < 0 or offset + length > target.stat().st_size:
            raise CorruptFileError(
                f"{model}: tensor `{t.name}` reads bytes [{offset}, {offset + length}) of {loc!r}, past its end"
            )
    return model


def check_model_dir(model_dir: str | Path) -> Path:
    """``check_onnx_file`` on ``model_dir/model.onnx`` (the folder dsq's exporter writes)."""
    model_dir = Path(model_dir)
    if resolve_model_file(model_dir, MODEL_NAME) is None:
        raise InputError(f"{model_dir}: no {MODEL_NAME}")
    return check_onnx_file(model_dir / MODEL_NAME)


def check_genai_dir(model_dir: str | Path) -> Path:
    """``check_onnx_file`` on the decoder an onnxruntime-genai folder names (``genai_config.json``
    ``model.decoder.filename``, default ``model.onnx``), which must itself lie inside the folder.
    Raises InputError for a missing/unreadable config or a name that leaves the folder."""
    import json

    model_dir = Path(model_dir)
    cfg_file = resolve_model_file(model_dir, "genai_config.json")
    if cfg_file is None:
        return check_model_dir(model_dir)
    try:
        decoder = json.loads(cfg_file.read_text(encoding="utf-8"))["model"]["decoder"]
        name = decoder.get("filename", MODEL_NAME) if isinstance(decoder, dict) else MODEL_NAME
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError(f"{cfg_file}: not a genai_config.json (no model.decoder)") from None
    if not isinstance(name, str) or resolve_model_file(model_dir, name) is None:
        raise InputError(f"{cfg_file}: model.decoder.filename {name!r} is not a file inside {model_dir}")
    return check_onnx_file(model_dir / name)


__all__ = ["check_onnx_file", "check_model_dir", "check_genai_dir"]
