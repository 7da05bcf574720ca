"""Where a calibrated layer's independent work runs: here (``LocalPool``) or as Ray tasks.

Inside one decoder layer, calibration has two kinds of independent work (see pipeline.py):

* each quantized linear's (and each routed expert's) GPTQ / AWQ-clip / imatrix step, given the input
  statistics already captured, depends on nothing else of the layer: :meth:`map` runs them;
* the forward of the layer over the calibration batches (the next layer's inputs, and the float
  reference stream) is one independent call per batch: :meth:`forward` runs them.

A pool returns results in job order, so the caller assembles exactly what the sequential loop would.
``dsquant/ray_executor.py`` has the Ray pool; a pool's ``share`` puts an object that many jobs read
(a MoE layer's captured inputs) in one place once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn

UnitFn = Callable[[int], None]  # called with the number of this map's jobs finished so far


class CalibPool(Protocol):
    """What calibrate_layer needs from a pool (LocalPool here, ray_executor.RayCalibPool on Ray)."""

    def share(self, obj: Any) -> Any: ...

    def map(self, fn: Callable, jobs: Iterable[tuple], on_done: UnitFn | None = None) -> list: ...

    def forward(self, runner: Callable[[nn.Module, torch.Tensor], torch.Tensor], layer: nn.Module,
                xs: list[torch.Tensor]) -> list[torch.Tensor]: ...


class LocalPool:
    """Runs every job in this process, one after another, in order (``--executor local``)."""

    def share(self, obj: Any) -> Any:
        """``obj`` itself: jobs in this process read it in place."""
        return obj

    def map(self, fn: Callable, jobs: Iterable[tuple], on_done: UnitFn | None = None) -> list:
        """``[fn(*args) for args in jobs]``; ``on_done(k)`` after the k-th."""
        out = []
        for args in jobs:
            out.append(fn(*args))
            if on_done:
                on_done(len(out))
        return out

    def forward(self, runner: Callable[[nn.Module, torch.Tensor], torch.Tensor], layer: nn.Module,
                xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``runner(layer, x)`` for each calibration batch ``x``, in order."""
        return [runner(layer, x) for x in xs]


LOCAL = LocalPool()
