"""Progress for long work: a rich bar on a terminal, periodic plain lines everywhere else (CI logs, pipes).

One reporter serves every command (quantize, calibration, export, eval, bench): ``update(done, total,
detail)`` for countable work, ``message(text)`` for a phase change. On a terminal the bar redraws in
place; off a terminal a line goes to stderr every ``DSQ_PROGRESS_SECONDS`` (default 10), plus a last
line when the work completes, so a 13-minute calibration in a CI log is never silent while a job of a
few seconds (or one that fails at once) prints nothing but its result. ETA is the rate since
the reporter's first update (a resumed run's earlier layers do not make it optimistic).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

ProgressFn = Callable[[int, int, str], None]  # (done, total, what is being done now)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Reporter:
    """Reports the progress of one job; ``unit`` names what ``done``/``total`` count ("tensors", "layers")."""

    def __init__(self, label: str, unit: str = "", stream: TextIO | None = None, interval: float | None = None,
                 tty: bool | None = None):
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        env = os.environ.get("DSQ_PROGRESS_SECONDS", "")
        self.interval = interval if interval is not None else (float(env) if env.replace(".", "", 1).isdigit() else 10.0)
        self.t0 = time.monotonic()
        self._base: tuple[int, float] | None = None  # (done, time) of the first update: the ETA's baseline
        self._last_line = self.t0  # the first plain line comes one interval in
        self._printed = False
        self.done, self.total, self.detail = 0, 0, ""
        self._bar = self._task = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} " + unit, markup=False),
                TextColumn("{task.fields[detail]}", style="dim", markup=False),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=None, detail="")
            self._bar.start()

    def eta(self) -> float | None:
        """Seconds left at the rate measured since the first update; None before there is a rate."""
        if self._base is None or self.total <= 0:
            return None
        done0, t_base = self._base
        if self.done <= done0:
            return None
        rate = (self.done - done0) / max(time.monotonic() - t_base, 1e-9)
        return (self.total - self.done) / rate

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        parts = [f"{self.label}:"]
        if self.total:
            parts.append(f"{self.done}/{self.total} {self.unit}".rstrip() + f" ({100 * self.done / self.total:.0f}%)")
        parts.append(f"elapsed {_clock(elapsed)}")
        eta = self.eta()
        if eta is not None and self.done < self.total:
            parts.append(f"ETA {_clock(eta)}")
        if self.detail:
            parts.append(f"- {self.detail}")
        return " ".join(parts)

    def _plain(self, final: bool = False) -> None:
        now = time.monotonic()
        if (final and self._printed) or (not final and now - self._last_line >= self.interval):
            self._last_line = now
            self._printed = True
            print(self.line(), file=self.stream, flush=True)

    def update(self, done: int, total: int, detail: str = "") -> None:
        if self._base is None:
            self._base = (done, time.monotonic())
        self.done, self.total, self.detail = done, total, detail
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, detail=detail)
        else:
            self._plain(final=0 < total <= done)

    def message(self, text: str) -> None:
        """A phase change without a count ("loading the reference", "writing model.onnx")."""
        self.detail = text
        if self._bar is not None:
            self._bar.update(self._task, detail=text)
        else:
            self._plain()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    # a Reporter is also a ProgressFn
    __call__ = update


@contextlib.contextmanager
def progress(label: str, unit: str = "") -> Iterator[Reporter]:
    reporter = Reporter(label, unit)
    try:
        yield reporter
    finally:
        reporter.close()


@contextlib.contextmanager
def tensor_progress(description: str) -> Iterator[ProgressFn]:
    """Progress over tensors (``advance(done, total, name)``), for quantize and export."""
    with progress(description, "tensors") as reporter:
        yield reporter.update
