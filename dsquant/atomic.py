"""Atomic outputs: everything is written into a temporary sibling, then renamed into place.

A crash, a full disk or Ctrl-C leaves the destination untouched (and no half-written directory);
an existing finished output is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def check_output(dest: Path, overwrite: bool) -> None:
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise OutputError(f"{dest}: already exists; pass --overwrite to replace it")
    parent = dest.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)  # `-o out/model` works in a fresh checkout
    except OSError as e:
        raise OutputError(
            f"{parent}: the output's parent directory does not exist and cannot be created ({e.strerror})"
        ) from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: not writable; choose another output location")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success it replaces ``dest``."""
    dest = Path(dest)
    check_output(dest, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.resolve().parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should be an ordinary directory
    except OSError as e:
        raise OutputError(f"{dest.parent}: cannot create a temporary directory ({e.strerror})") from None
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | Path, overwrite: bool = False, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``dest``; on success it is renamed onto ``dest``."""
    dest = Path(dest)
    check_output(dest, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.resolve().parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
