"""Texts shipped with dsq, by name: the held-out evaluation text and the calibration sets.

``dsq eval --text`` takes a file or one of these names. The held-out set (``heldout``, the default)
is listed under ``eval`` in ``calib_data/MANIFEST.json`` and belongs to no calibration mix, so an
evaluation on it never measures text the model was calibrated on (tests/test_texts.py checks that
no 8-word run of it occurs in a calibration set).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError

DATA_DIR = Path(__file__).resolve().parents[1] / "calib_data"
DEFAULT_EVAL_TEXT = "heldout"


def eval_texts() -> dict[str, Path]:
    """Shipped held-out evaluation texts: name -> file."""
    manifest = json.loads((DATA_DIR / "MANIFEST.json").read_text())
    return {e["name"]: DATA_DIR / e["file"] for e in manifest.get("eval", [])}


def text_names() -> dict[str, Path]:
    """Every shipped plain text a user may name: the held-out set(s) and the uncompressed calibration sets of
    kind text (``dsq eval`` reads plain UTF-8 files; the large gzipped sets are for calibration only)."""
    from .calib.data import shipped_sets

    names = {s.name: s.file for s in shipped_sets().values() if s.kind == "text" and s.file.suffix != ".gz"}
    names.update(eval_texts())
    return names


def resolve_text(spec: str | Path) -> Path:
    """A ``--text`` value: an existing file as given, else a shipped name; InputError names both options."""
    p = Path(spec)
    if p.is_file():
        return p
    names = text_names()
    if str(spec) in names:
        return names[str(spec)]
    raise InputError(
        f"--text {spec}: no such file, and not a shipped text ({', '.join(sorted(names))}); "
        "give a UTF-8 text file or one of those names"
    )
