"""Opening files inside a model folder without following links out of it.

A model folder comes from whoever published the model. A file in it that is a symbolic link to
``/etc/passwd`` or ``~/.ssh/id_rsa`` would make dsq read (and an export copy) a file the user never
meant to hand over, so every side file and weight file is located through :func:`resolve_model_file`.

The one layout where links legitimately leave the folder is the Hugging Face hub cache
(``huggingface_hub``'s ``snapshot_download``): ``.../models--ORG--NAME/snapshots/REV/FILE`` is a link to
``../../blobs/HASH``. There a link may resolve anywhere inside the same ``models--ORG--NAME`` folder
(its ``blobs/``), and nowhere else.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .errors import InputError


def _allowed_root(model_dir: Path) -> Path:
    """The folder links may resolve into: the model folder, or its hub-cache repo folder."""
    real = model_dir.resolve()
    snapshots = real.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith(("models--", "datasets--")):
        return snapshots.parent
    return real


def resolve_model_file(model_dir: str | Path, name: str) -> Path | None:
    """The real path of file ``name`` of the model folder ``model_dir``, or None when there is none.

    ``name`` is a path relative to the folder (``tokenizer.json``, a shard named by an index file).
    Raises :class:`InputError` (one line naming the file) when ``name`` is absolute or climbs out with
    ``..``, or when it is a link that resolves outside the folder (outside ``models--ORG--NAME`` for a
    hub-cache snapshot). A dangling link inside the folder counts as no file.
    """
    model_dir = Path(model_dir)
    rel = PurePosixPath(str(name).replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise InputError(f"{model_dir / str(name)}: file names in a model folder must stay inside it")
    path = model_dir.joinpath(*rel.parts)
    if not path.is_symlink() and not path.exists():
        return None
    root = _allowed_root(model_dir)
    real = path.resolve()
    if real != root and root not in real.parents:
        raise InputError(
            f"{path}: a link to {real}, outside the model folder {root}; copy the real file into the folder"
        )
    return real if real.is_file() else None
