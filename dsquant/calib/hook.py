"""The hook ``quantize_checkpoint`` uses: run a calibration, then hand its tensors to the writer.

``quantize_checkpoint(..., calibration=CalibSpec(method="gptq", ...))`` calls
:func:`run_calibration` once, before writing; while it streams tensors it takes a calibrated
weight's rows with :func:`rows_of` instead of rounding them itself, and writes AWQ's rescaled float
tensors instead of the originals. ``method="rtn"`` needs no data and skips all of this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..formats import QuantizedTensor
from ..plan import Plan
from .data import DEFAULT_SOURCE
from .methods import CalibOptions, get_method


@dataclass(frozen=True)
class CalibSpec:
    method: str = "rtn"
    calib: str = DEFAULT_SOURCE
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    work_dir: str | None = None
    options: CalibOptions = field(default_factory=CalibOptions)
    imatrix_out: str | None = None  # write llama.cpp's imatrix (GGUF, or legacy if it ends in .dat)
    imatrix_in: str | None = None  # a llama.cpp imatrix file used as importance (--method imatrix)

    @property
    def needs_data(self) -> bool:
        return get_method(self.method).needs_stats


MAX_CALIB_TOKENS = 1 << 24  # samples x seqlen: 16M tokens is already hours of calibration on a GPU


def check_calib_sizes(config: dict, samples: int, seqlen: int) -> None:
    """Refuse --seqlen past the model's positions and --samples x --seqlen past MAX_CALIB_TOKENS, before any
    buffer is sized from them (``--seqlen 10000000`` would allocate tens of GB)."""
    max_pos = config.get("max_position_embeddings")
    if isinstance(max_pos, int) and seqlen > max_pos:
        raise InputError(f"--seqlen {seqlen}: longer than the model's max_position_embeddings ({max_pos}, config.json)")
    if samples < 1 or seqlen < 2:
        raise InputError(f"--samples ({samples}) must be >= 1 and --seqlen ({seqlen}) >= 2")
    if samples * seqlen > MAX_CALIB_TOKENS:
        raise InputError(
            f"--samples {samples} x --seqlen {seqlen} = {samples * seqlen} tokens; the limit is {MAX_CALIB_TOKENS}"
        )


def run_calibration(
    ckpt: Checkpoint, plan: Plan, spec: CalibSpec, progress=None, pool=None
) -> tuple[Mapping[str, QuantizedTensor | torch.Tensor], dict | None]:
    """(HF name -> calibrated tensor, the report's ``calibration`` section); empty for RTN. The mapping is
    a ``resume.LayerStore``: the tensors stay in per-layer files (``spec.work_dir`` or a temporary directory
    removed with the mapping) and each is read, memory-mapped, when the writer asks for it. ``pool``:
    where each layer's independent work runs (calib/pool.py; None: in this process)."""
    if not spec.needs_data:
        if spec.imatrix_out or spec.imatrix_in:
            flag = "--imatrix-out" if spec.imatrix_out else "--imatrix"
            raise InputError(f"{flag} needs calibration: use --method imatrix (or gptq for --imatrix-out)")
        return {}, None
    check_calib_sizes(ckpt.config, spec.samples, spec.seqlen)
    from .imatrix_file import from_stats, read_imatrix, to_importance, write_imatrix
    from .pipeline import calibrate

    given = None
    if spec.imatrix_in:
        if spec.method != "imatrix":
            raise InputError(f"--imatrix {spec.imatrix_in}: importance from a file is used by --method imatrix only, "
                             f"not {spec.method}")
        if spec.work_dir:
            raise InputError("--imatrix with --work-dir: a resumed run cannot tell which file its earlier layers used; "
                             "drop --work-dir")
        given = {k: torch.from_numpy(v) for k, v in to_importance(read_imatrix(spec.imatrix_in), ckpt).items()}
    if spec.imatrix_out and get_method(spec.method).awq:
        # AWQ rescales the linears after the statistics are taken, so they no longer describe the inputs
        raise InputError("--imatrix-out with --method awq: AWQ's statistics are of the inputs before its rescaling; "
                         "use --method imatrix or gptq")
    result = calibrate(
        ckpt, plan, spec.method, spec.calib, spec.samples, spec.seqlen, spec.seed, spec.options, spec.work_dir, progress,
        collect=bool(spec.imatrix_out), given=given, pool=pool,
    )
    report = result.report()
    if given is not None:
        report["imatrix_in"] = {"path": spec.imatrix_in, "tensors": len(given)}
    if spec.imatrix_out:
        im = from_stats(ckpt, result.stats, [spec.calib], result.batch["samples"], result.batch["seqlen"])
        path = write_imatrix(spec.imatrix_out, im)
        report["imatrix_out"] = {"path": str(path), "entries": len(im.entries)}
    return result.tensors, report


def rows_of(value: QuantizedTensor | torch.Tensor, start: int, stop: int) -> QuantizedTensor | torch.Tensor:
    """Rows ``start:stop`` of a calibrated tensor (row slices start on a block-row boundary)."""
    return value.rows(start, stop) if isinstance(value, QuantizedTensor) else value[start:stop]
