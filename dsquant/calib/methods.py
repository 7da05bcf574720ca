"""The calibration methods as data: what each one captures, and how it quantizes one linear weight.

``awq`` is a scale transform (see awq.py) applied to the layer before its linears are rounded; the
per-linear step of every method is one of the functions below. All return a QuantizedTensor of the
plan's format, so a calibrated weight is stored exactly like a round-to-nearest one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats import QuantFormat, QuantizedTensor
from .gptq import GPTQOptions, gptq_quantize
from .imatrix import search_scales


class InputStats:
    """Statistics of one linear's calibration inputs: ``X^T X`` (or only its diagonal) and, for AWQ,
    an evenly strided sample of the input rows."""

    def __init__(self, columns: int, full: bool, keep_rows: int) -> None:
        self.full = full
        self.sum = torch.zeros(columns, columns, dtype=torch.float64) if full else torch.zeros(columns, dtype=torch.float64)
        self.count = 0
        self.keep_rows = keep_rows
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor, quota: int = 0) -> None:
        x = x.reshape(-1, x.shape[-1]).detach()
        x64 = x.to(torch.float64)
        if self.full:
            self.sum.addmm_(x64.T, x64)
        else:
            self.sum += x64.square().sum(0)
        self.count += x.shape[0]
        if self.keep_rows and self.kept < self.keep_rows and x.shape[0]:
            take = min(quota or x.shape[0], self.keep_rows - self.kept, x.shape[0])
            idx = torch.linspace(0, x.shape[0] - 1, take).round().long()
            self.rows.append(x[idx].to(torch.float32).clone())
            self.kept += take

    @property
    def hessian(self) -> torch.Tensor:
        if not self.full:
            raise ValueError("diagonal-only statistics have no Hessian")
        return (2.0 * self.sum / max(self.count, 1)).to(torch.float32)

    @property
    def importance(self) -> torch.Tensor:
        """Mean squared activation per input column (llama.cpp's imatrix entries)."""
        diag = torch.diagonal(self.sum) if self.full else self.sum
        return (diag / max(self.count, 1)).to(torch.float32)

    @property
    def samples(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.sum.shape[0])

    @property
    def sum_sq(self) -> torch.Tensor:
        """Sum over rows of x^2 per input column, float64 (llama.cpp's imatrix ``in_sum2``)."""
        return (torch.diagonal(self.sum) if self.full else self.sum).clone()


class GivenImportance:
    """Per-column importance from outside (a llama.cpp imatrix file, ``--imatrix``) standing in for
    collected statistics; only the imatrix method reads it (it has no Hessian and no rows)."""

    full = False

    def __init__(self, importance: torch.Tensor) -> None:
        self.importance = importance.to(torch.float32)


def use_stats(
    hf_name: str,
    stats: InputStats | None,
    collect: dict[str, tuple[torch.Tensor, int]] | None,
    given: dict[str, torch.Tensor] | None,
) -> InputStats | GivenImportance | None:
    """The statistics a linear is quantized with: records ``stats`` into ``collect`` (for
    ``--imatrix-out``), and returns the file's importance for ``hf_name`` when ``given`` has one."""
    if stats is not None and collect is not None:
        collect[hf_name] = (stats.sum_sq, int(stats.count))
    if given is not None and hf_name in given and stats is not None:
        return GivenImportance(given[hf_name])
    return stats


@dataclass(frozen=True)
class CalibOptions:
    gptq: GPTQOptions = GPTQOptions()
    awq_tokens: int = 4096  # input rows kept per linear for AWQ's scale search
    awq_grid: int = 20  # alpha steps in [0, 1)
    batch_size: int = 8  # samples per forward batch
    expert_min_tokens: int = 32  # routed experts below this also see all the layer's tokens (statistics only)
    fail_below_tokens: int = 0  # --min-expert-tokens: fail the run if a routed expert gets fewer
    track_drift: bool = True  # also run the float model's stream to report drift per layer (+1 forward)
    quantize_lm_head: bool = True  # calibrate lm_head on the final-norm outputs when the recipe quantizes it


LinearFn = Callable[[QuantFormat, torch.Tensor, InputStats | None, CalibOptions], QuantizedTensor]


def _rtn(fmt: QuantFormat, w: torch.Tensor, stats: InputStats | None, opts: CalibOptions) -> QuantizedTensor:
    return fmt.quantize(w)


def _gptq(fmt: QuantFormat, w: torch.Tensor, stats: InputStats | None, opts: CalibOptions) -> QuantizedTensor:
    assert stats is not None
    return gptq_quantize(fmt, w, stats.hessian, opts.gptq)


def _imatrix(fmt: QuantFormat, w: torch.Tensor, stats: InputStats | None, opts: CalibOptions) -> QuantizedTensor:
    assert stats is not None
    return search_scales(fmt, w, stats.importance)


def _awq_round(fmt: QuantFormat, w: torch.Tensor, stats: InputStats | None, opts: CalibOptions) -> QuantizedTensor:
    """AWQ's second step (``auto_clip``), in dsq's terms: per block, the scale (clip) minimising the
    output error weighted by the captured rows' (already AWQ-rescaled) mean squared activation."""
    if stats is None or not stats.rows:
        return fmt.quantize(w)
    return search_scales(fmt, w, stats.samples.square().mean(0))


@dataclass(frozen=True)
class Method:
    name: str
    linear: LinearFn
    full_hessian: bool  # needs X^T X (GPTQ) rather than its diagonal
    needs_stats: bool
    awq: bool = False  # scale transform before rounding
    description: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtn", _rtn, False, False, description="round-to-nearest with the format's own rule (no data)"),
        Method("gptq", _gptq, True, True, description="GPTQ: Hessian-compensated rounding, groups = format blocks"),
        Method("imatrix", _imatrix, False, True, description="per-block scale search weighted by mean x^2 per column"),
        Method(
            "awq", _awq_round, False, True, awq=True,
            description="activation-aware scales folded into norms/linears, then a clip (scale) search",
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"--method {name!r}: unknown; choose one of {', '.join(METHODS)}") from None
