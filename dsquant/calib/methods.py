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


def add_gram(acc: torch.Tensor, x: torch.Tensor, block: int = 4096) -> None:
    """``acc += x^T x`` on the block upper triangle only: ``acc`` [in, in] float32, ``x`` [n, in] float32 or
    bfloat16. Column blocks of ``block``: block (i, j) with j < i is left untouched (it is the transpose of
    (j, i); :func:`mirror_gram` fills it once at the end), so a wide input (down_proj's 18944 columns) costs
    ~0.6 of the full product. bfloat16 inputs run at about twice float32's matmul speed on CPUs with bf16
    units; each product is rounded to bfloat16 once per call (one calibration batch) before it is added to
    the float32 sum, a relative error ~2^-9 / sqrt(batches), below the bfloat16 rounding of the inputs."""
    n = x.shape[1]
    for i in range(0, n, block):
        xi = x[:, i:i + block]
        for j in range(i, n, block):
            xj = x[:, j:j + block]
            part = acc[i:i + block, j:j + block]
            if x.dtype == torch.float32:
                part.addmm_(xi.T, xj)
            else:
                part.add_(xi.T @ xj)


def mirror_gram(acc: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Fill the lower blocks of a sum kept by :func:`add_gram` from the upper ones (in place); returns ``acc``."""
    n = acc.shape[0]
    for i in range(0, n, block):
        for j in range(i + block, n, block):
            acc[j:j + block, i:i + block] = acc[i:i + block, j:j + block].T
    return acc


class InputStats:
    """Statistics of one linear's calibration inputs (or of several linears that read the same input:
    q/k/v, gate/up, see ``users``): ``X^T X`` in float32 (GPTQ), the sum of ``x^2`` per column in float64
    (llama.cpp's ``in_sum2``, every method) and, for AWQ, an evenly strided sample of the input rows.

    ``gram_dtype``: the dtype the ``X^T X`` products run in (float32, or bfloat16 whose products are added
    into the float32 sum, see :func:`add_gram`). ``users``: how many linears will take the Hessian; the
    last :meth:`take_hessian` gets the buffer itself instead of a copy."""

    def __init__(self, columns: int, full: bool, keep_rows: int, gram_dtype: torch.dtype = torch.float32) -> None:
        self.full = full
        self.columns = columns
        self.gram_dtype = gram_dtype
        self.xtx: torch.Tensor | None = torch.zeros(columns, columns, dtype=torch.float32) if full else None
        self.diag = torch.zeros(columns, dtype=torch.float64)
        self.count = 0
        self.users = 1
        self._mirrored = False
        self.keep_rows = keep_rows
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor, quota: int = 0) -> None:
        """Add the rows of ``x`` [..., columns] (any float dtype)."""
        x = x.reshape(-1, x.shape[-1]).detach()
        # per call (one batch, a few thousand rows) in float32, then into the float64 total
        self.diag += x.to(torch.float32).square().sum(0).to(torch.float64)
        if self.full:
            if self.xtx is None:
                raise ValueError("InputStats.add after its Hessian was taken")
            add_gram(self.xtx, x.to(self.gram_dtype))
            self._mirrored = False
        self.count += x.shape[0]
        if self.keep_rows and self.kept < self.keep_rows and x.shape[0]:
            take = min(quota or x.shape[0], self.keep_rows - self.kept, x.shape[0])
            idx = torch.linspace(0, x.shape[0] - 1, take).round().long()
            self.rows.append(x[idx].to(torch.float32).clone())
            self.kept += take

    def _gram(self) -> torch.Tensor:
        if not self.full or self.xtx is None:
            raise ValueError("diagonal-only (or already taken) statistics have no Hessian")
        if not self._mirrored:
            mirror_gram(self.xtx)
            self._mirrored = True
        return self.xtx

    @property
    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` [columns, columns] float32 (a new tensor)."""
        return self._gram() * (2.0 / max(self.count, 1))

    def take_hessian(self) -> torch.Tensor:
        """As :attr:`hessian`, for one of the ``users``; the last one gets the accumulator itself, scaled in
        place (a 18944-wide down_proj Hessian is 1.4 GB: no second copy), and the statistics drop it."""
        gram = self._gram()
        self.users -= 1
        if self.users > 0:
            return gram * (2.0 / max(self.count, 1))
        self.xtx = None
        return gram.mul_(2.0 / max(self.count, 1))

    @property
    def importance(self) -> torch.Tensor:
        """Mean squared activation per input column (llama.cpp's imatrix entries)."""
        return (self.diag / max(self.count, 1)).to(torch.float32)

    @property
    def samples(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.columns)

    @property
    def sum_sq(self) -> torch.Tensor:
        """Sum over rows of x^2 per input column, float64 (llama.cpp's imatrix ``in_sum2``)."""
        return self.diag.clone()


class SharedInputs:
    """Forward pre-hooks that give linears reading the *same* input tensor one :class:`InputStats`.

    transformers calls q/k/v_proj (and gate/up_proj) on one tensor object; the hook of the first such
    linear adds it, the next ones see the identical object and only join that statistics object
    (``users`` + 1), so the layer's ``X^T X`` is accumulated once per distinct input. Grouping is by
    object identity, so it holds for any architecture (MoE shared experts too) and never merges two
    different inputs. Call :meth:`end_batch` after each forward (drops the last input it holds)."""

    def __init__(self, make: Callable[[int], InputStats], quota: int = 0) -> None:
        self.make = make
        self.quota = quota
        self.stats: dict[str, InputStats] = {}
        self._last: tuple[torch.Tensor, InputStats] | None = None

    def hook(self, name: str, columns: int) -> Callable:
        def pre_hook(_module, args) -> None:
            x = args[0]
            last = self._last
            if last is not None and x is last[0]:
                if name not in self.stats:
                    self.stats[name] = last[1]
                    last[1].users += 1
                if self.stats[name] is last[1]:
                    return
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = self.make(columns)
            st.add(x, self.quota)
            self._last = (x, st)

        return pre_hook

    def end_batch(self) -> None:
        self._last = None

    def unique(self) -> list[InputStats]:
        """Each statistics object once, in first-seen order."""
        seen: dict[int, InputStats] = {}
        for st in self.stats.values():
            seen.setdefault(id(st), st)
        return list(seen.values())


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
    # also run the float model's stream to report drift per layer (+1 forward, a third of the time);
    # None: only while the run is small (see AUTO_FLOP)
    track_drift: bool | None = None
    quantize_lm_head: bool = True  # calibrate lm_head on the final-norm outputs when the recipe quantizes it
    # dtype of the layer forwards, of the hidden states kept between layers and of the X^T X products
    # (summed in float32): "float32", "bfloat16", or "auto": bfloat16 when the checkpoint's layers are
    # bfloat16 and the run is large (see AUTO_FLOP), else float32
    compute_dtype: str = "auto"

    def resolve(self, forward_flop: float, bf16_weights: bool) -> tuple[torch.dtype, bool]:
        """(compute dtype, track drift) for a run whose one decoder forward over all calibration tokens
        costs ``forward_flop`` (2 x decoder weights x tokens). Raises InputError for an unknown dtype."""
        large = forward_flop >= AUTO_FLOP
        if self.compute_dtype == "auto":
            dtype = torch.bfloat16 if large and bf16_weights else torch.float32
        elif self.compute_dtype in ("float32", "bfloat16"):
            dtype = getattr(torch, self.compute_dtype)
        else:
            raise InputError(f"compute_dtype {self.compute_dtype!r}: choose auto, float32 or bfloat16")
        return dtype, (not large) if self.track_drift is None else bool(self.track_drift)


# One decoder forward over the calibration tokens above this (2 x weights x tokens; ~6 s of float32 matmul on
# 2 cores) makes a run "large": 135M x 128x512 tokens is 1.4e13, 7B x 128x512 is 8.5e14, the test fixtures ~1e7.
AUTO_FLOP = 1e12


LinearFn = Callable[[QuantFormat, torch.Tensor, InputStats | None, CalibOptions], QuantizedTensor]


def _rtn(fmt: QuantFormat, w: torch.Tensor, stats: InputStats | None, opts: CalibOptions) -> QuantizedTensor:
    return fmt.quantize(w)


def _gptq(fmt: QuantFormat, w: torch.Tensor, stats: InputStats | None, opts: CalibOptions) -> QuantizedTensor:
    assert stats is not None
    return gptq_quantize(fmt, w, stats.take_hessian(), opts.gptq, overwrite=True)


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
