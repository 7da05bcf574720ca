"""A rich progress bar over tensors (bytes processed), shown on stderr only when it is a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def tensor_progress(description: str) -> Iterator[Callable]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} tensors"),
        TextColumn("{task.fields[name]}", style="dim"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
        transient=False,
    )
    task = progress.add_task(description, total=None, name="")

    def advance(done: int, total: int, name: str) -> None:
        progress.update(task, completed=done, total=total, name=name)

    with progress:
        yield advance
