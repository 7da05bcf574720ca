"""Which files a model folder may name: the one rule for every file dsq reads or copies from a model.

A model folder names files (index shards, ``chat_template.jinja``, tokenizer files, ONNX external
data). Each must resolve inside that folder, so a crafted folder cannot make dsq read, copy or embed
``/etc/passwd`` or ``~/.ssh/id_rsa`` through a symlink, an absolute path or ``..``. One exception
keeps Hugging Face downloads working: in the hub cache a snapshot is a folder of relative symlinks
into the repository's blob store::

    ~/.cache/huggingface/hub/models--ORG--NAME/snapshots/REV/config.json -> ../../blobs/HASH

so inside ``models--ORG--NAME/snapshots/REV`` links may resolve anywhere inside the same
``models--ORG--NAME`` folder (huggingface_hub's cache layout:
https://huggingface.co/docs/huggingface_hub/guides/manage-cache).

Only regular files are accepted: a named pipe, device or directory where a file is expected is
refused before it is opened (opening a FIFO blocks until someone writes to it).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InputError


def allowed_root(model_dir: str | Path) -> Path:
    """The folder files named by ``model_dir`` must resolve into: the folder itself (resolved), or for a
    hub-cache snapshot ``.../models--ORG--NAME/snapshots/REV``, the ``models--ORG--NAME`` folder."""
    root = Path(model_dir).resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_model_file(model_dir: str | Path, name: str | os.PathLike) -> Path | None:
    """The file ``name`` of the model folder ``model_dir``, resolved (symlinks followed), or None if absent.

    ``name`` is relative to ``model_dir`` (as in an index's ``weight_map`` or a side file list).
    Returns the resolved path, which lies inside ``model_dir`` (or, for a hub-cache snapshot, inside
    its ``models--ORG--NAME`` folder). Raises :class:`~dsquant.errors.InputError` naming the file when
    ``name`` is absolute, resolves outside (``..``, a symlink out, a dangling link out), or exists but
    is not a regular file (FIFO, device, socket, directory). Reads nothing and opens nothing.
    """
    model_dir = Path(model_dir)
    shown = model_dir / name
    if os.path.isabs(name):
        raise InputError(f"{model_dir}: `{name}` is an absolute path, outside the model directory; files a model "
                         "folder names must be inside it")
    root = allowed_root(model_dir)
    try:
        target = shown.resolve()  # not strict: a dangling link still resolves to where it points
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise InputError(f"{shown}: cannot be resolved ({e})") from None
    if not _inside(target, root):
        raise InputError(
            f"{shown}: points outside the model directory (to {target}); copy the file into the folder instead of linking it"
        )
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"{shown}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe" if stat.S_ISFIFO(st.st_mode) else "not a file"
        raise InputError(f"{shown}: is {kind}, not a regular file; dsq reads regular files only")
    return target


def require_regular_file(path: str | Path, what: str = "") -> Path:
    """``path`` itself if it is a regular file (after symlinks); otherwise InputError naming it.

    For files a user names directly on the command line (no model folder to stay inside): a named pipe
    must be refused before ``open`` blocks on it.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{what}{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{what}{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what}{path}: not a regular file (a directory, named pipe or device); give a file")
    return path


__all__ = ["resolve_model_file", "allowed_root", "require_regular_file"]
