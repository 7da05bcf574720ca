"""Atomic outputs: everything is written into a temporary sibling, then renamed into place.

A crash, a full disk or Ctrl-C leaves the destination untouched (and no half-written directory);
an existing finished output is refused unless ``overwrite`` is set. Temporaries are named
``.NAME.PID.XXXX.partial``: a SIGKILL leaves one behind, and the next run on the same NAME removes
those whose PID is gone (and says so), never a running one's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
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


def _stale_partials(dest: Path) -> list[Path]:
    """Temporary siblings of ``dest`` left by a run that was killed (SIGKILL, power loss): ``.NAME.PID.XXXX.partial``
    whose PID no longer runs, or ``.NAME.XXXX.partial`` from dsq versions before the PID was recorded."""
    own = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)\.[A-Za-z0-9_]+\.partial$")
    legacy = re.compile(rf"^\.{re.escape(dest.name)}\.[A-Za-z0-9_]{{8}}\.partial$")
    out = []
    try:
        siblings = list(dest.resolve().parent.iterdir())
    except OSError:
        return []
    for p in siblings:
        m = own.match(p.name)
        if (m and not _alive(int(m.group(1)))) or legacy.match(p.name):
            out.append(p)
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists (another user's), or not a PID at all: leave it
    return True


def clean_stale_partials(dest: str | Path) -> list[Path]:
    """Remove what a killed earlier run on ``dest`` left behind, saying so on stderr; returns what was removed."""
    removed = []
    for p in _stale_partials(Path(dest)):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
        print(f"note: removed {p}, left by an earlier run on {dest} that was killed", file=sys.stderr)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file too large (quota/ulimit), quota exceeded


def _disk_full(e: OSError, dest: Path) -> OSError | OutputError:
    """A write that failed for lack of space, as an OutputError naming the output; other OSErrors unchanged."""
    if e.errno in _FULL:
        return OutputError(f"{dest}: cannot write ({e.strerror}); is the disk full? Nothing was written")
    return e


def make_partial_dir(dest: Path) -> Path:
    """A fresh ``.NAME.PID.XXXX.partial`` directory beside ``dest`` (stale ones of NAME removed first)."""
    clean_stale_partials(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".partial", dir=dest.resolve().parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should be an ordinary directory
    except OSError as e:
        raise OutputError(f"{dest.parent}: cannot create a temporary directory ({e.strerror})") from None
    return tmp


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success it replaces ``dest``."""
    dest = Path(dest)
    check_output(dest, overwrite)
    tmp = make_partial_dir(dest)
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full(e, dest) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | Path, overwrite: bool = False, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``dest``; on success it is renamed onto ``dest``."""
    dest = Path(dest)
    check_output(dest, overwrite)
    clean_stale_partials(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".partial", dir=dest.resolve().parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, dest)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _disk_full(e, dest) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
