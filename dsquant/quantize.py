"""``dsq quantize``: stream a checkpoint through its plan into a quantized checkpoint + report.

One tensor at a time: read (FP8 dequantized on the fly) -> quantize -> measure error -> write.
The output directory appears only when complete (see ``atomic``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from .atomic import atomic_dir
from .calib.hook import CalibSpec, rows_of, run_calibration
from .checkpoint import Checkpoint
from .formats import FORMATS, QuantizedTensor, StreamPool, row_chunks
from .layouts import layout_for_formats, module_of
from .plan import Plan, PlanEntry, make_plan, row_slices
from .recipes import load_recipe
from .safetensors_io import PlannedTensor, SafetensorsWriter

REPORT_NAME = "dsq-report.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3

ProgressFn = Callable[[int, int, str], None]  # (done, total, tensor name)


@dataclass
class TensorResult:
    name: str
    role: str
    layer: int | None
    expert: int | None
    shape: list[int]
    source_dtype: str
    format: str | None
    bytes_in: int
    bytes_out: int
    bits_per_weight: float
    rel_rmse: float | None
    max_abs_err: float | None
    note: str


@dataclass
class ErrorStats:
    """Relative RMSE ||w - deq|| / ||w|| and max |w - deq|, accumulated over row slices."""

    sq_err: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0

    @staticmethod
    def measure(w: torch.Tensor, deq: torch.Tensor) -> tuple[float, float, float]:
        """(sum of squared error, sum of squared weights, max |error|) of one chunk."""
        w = w.to(torch.float32).reshape(-1)
        diff = deq.reshape(-1) - w
        # dot products: no squared copies (float32 accumulation: ~1e-6 relative on a 4 Mi-element slice)
        sq_err, sq_ref = float(torch.dot(diff, diff)), float(torch.dot(w, w))
        if not diff.numel():
            return sq_err, sq_ref, 0.0
        lo, hi = torch.aminmax(diff)
        return sq_err, sq_ref, max(float(-lo), float(hi))

    @staticmethod
    def measure_quantized(w: torch.Tensor, qt: QuantizedTensor) -> tuple[float, float, float]:
        """``measure(w, qt.dequantize())``, for row-block formats in one compiled pass without the dequantized
        copy (rtn_kernels.quantized_error)."""
        from .rtn_kernels import quantized_error

        return quantized_error(w, qt)

    def merge(self, measured: tuple[float, float, float]) -> None:
        self.sq_err += measured[0]
        self.sq_ref += measured[1]
        self.max_abs = max(self.max_abs, measured[2])

    def add(self, w: torch.Tensor, deq: torch.Tensor) -> None:
        self.merge(self.measure(w, deq))

    @property
    def rel_rmse(self) -> float:
        return math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref > 0 else math.sqrt(self.sq_err)


def _planned_outputs(plan: Plan, layout) -> list[tuple[PlanEntry, list[PlannedTensor]]]:
    out = []
    for e in plan.entries:
        if e.format:
            out.append((e, layout.planned(e.name, FORMATS[e.format], e.shape)))
        else:
            out.append((e, [PlannedTensor(e.name, e.tensor.float_dtype, e.shape)]))
    return out


def _shards(items: list[tuple[PlanEntry, list[PlannedTensor]]], max_bytes: int) -> list[list[int]]:
    """Split entries (in stream order) into shards of at most ``max_bytes`` (a single larger tensor
    gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, planned) in enumerate(items):
        n = sum(p.nbytes for p in planned)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def quantize_checkpoint(
    source: str | Path,
    output: str | Path,
    recipe: str = "int4",
    *,
    overwrite: bool = False,
    allow_unmapped: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ProgressFn | None = None,
    calibration: CalibSpec | None = None,
    calib_progress: ProgressFn | None = None,
    executor=None,
) -> dict:
    """Quantize ``source`` into ``output``; returns the report (also written as dsq-report.json).

    ``source``: a float (bf16/fp16/fp32) or DeepSeek block-FP8 HF checkpoint (directory, hub id or
    ``default``); ``recipe``: a preset name or recipe TOML path (``make_plan`` decides every tensor's
    format). ``output``: a new directory (replaced only with ``overwrite``) holding safetensors shards of at
    most ``max_shard_bytes`` bytes (compressed-tensors ``pack-quantized`` for int formats, DeepSeek's
    ``weight_scale_inv`` layout for FP8), config.json with its ``quantization_config``, the tokenizer files
    and the report: per tensor shape, format, bytes in/out, bits per weight and the relative RMS error
    ||w - deq(q(w))|| / ||w||; totals and wall seconds. Written atomically: on any error nothing is left.
    ``calibration``: GPTQ/AWQ/imatrix (``calib.hook.CalibSpec``) instead of round to nearest.

    ``progress(done, total, tensor name)`` is called per tensor written, ``calib_progress(done, total,
    detail)`` per calibrated decoder layer. ``executor``: None runs here; a ``ray_executor.RayExecutor``
    writes the same shards from Ray workers (``--executor ray``). Raises the DsqError subclasses of the
    reader, the recipe and the writer: InputError (no such model, bad calibration input), RecipeError,
    UnsupportedError (unmapped tensor without ``allow_unmapped``, a shape no format holds), CorruptFileError,
    BadWeightsError (NaN/Inf, fp16 scale overflow, naming the tensor and block), OutputError (output exists,
    disk full).
    """
    t0 = time.perf_counter()
    ckpt = Checkpoint(source)
    plan = make_plan(ckpt, load_recipe(recipe), allow_unmapped)
    # calibration (issue 6): GPTQ/AWQ/imatrix results replace RTN for the tensors they cover
    # With --executor ray a calibrated run's per-layer work runs as Ray tasks (ray_executor.RayCalibPool);
    # its tensors are then in this process, so this process writes them (the local loop below).
    pool = executor.calib_pool() if executor is not None and calibration is not None and calibration.needs_data else None
    calibrated, calib_report = (
        run_calibration(ckpt, plan, calibration, calib_progress, pool) if calibration else ({}, None)
    )
    executor_writes = None if calibrated else executor
    layout = layout_for_formats(plan.formats)
    items = _planned_outputs(plan, layout)
    shards = _shards(items, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    results: list[TensorResult] = []
    with atomic_dir(output, overwrite) as tmp, StreamPool() as pool:
        weight_map: dict[str, str] = {}
        local = zip(names, shards, strict=True) if executor_writes is None else ()
        if executor_writes is not None:  # the same shards, written in place by workers (ray_executor.py)
            results, weight_map = executor_writes.run(ckpt, items, shards, names, layout, tmp, progress, calibrated)
        for shard_name, idxs in local:
            planned = [p for i in idxs for p in items[i][1]]
            writer = SafetensorsWriter(tmp / shard_name, planned, {"format": "pt", "producer": f"dsq {__version__}"})
            for i in idxs:
                entry, outputs = items[i]
                results.append(_process(ckpt, entry, outputs, layout, writer, calibrated.get(entry.name), pool))
                if progress:
                    progress(len(results), len(plan.entries), entry.name)
            writer.close()
            weight_map.update({p.name: shard_name for p in planned})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(p.nbytes for _, ps in items for p in ps)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(ckpt.config)
        config.pop("quantization_config", None)
        if layout is not None:
            quantized = {e.name: e.format for e in plan.entries if e.format}
            ignored = sorted(
                module_of(e.name) for e in plan.entries if not e.format and e.tensor.ref and e.tensor.ref.info.kind == "linear"
            )
            config["quantization_config"] = layout.quantization_config(quantized, ignored)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in ckpt.side_files():
            shutil.copy2(f, tmp / f.name)
        report = _report(ckpt, plan, layout, results, time.perf_counter() - t0)
        if calib_report is not None:
            report["calibration"] = calib_report
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    if executor is not None:
        executor.cleanup()
    return report


def _passthrough(ckpt: Checkpoint, entry: PlanEntry) -> bool:
    """A block-FP8 source tensor planned in its own format: carried over as stored, never re-rounded."""
    return bool(entry.tensor.scale_info) and entry.format == ckpt.block_fp8_format


def quantize_rows(ckpt: Checkpoint, entry: PlanEntry, rows: torch.Tensor, start: int = 0) -> QuantizedTensor:
    """Rows ``[start, start + len(rows))`` of a quantized plan entry in its format (round to nearest).

    ``rows``: those rows of the source as floats ([n, in], any float dtype; ``start`` on a block-row
    boundary). A block-FP8 source planned as its own format is read as stored instead (codes and scales
    unchanged). Raises BadWeightsError (NaN/Inf, fp16 scale overflow) and UnsupportedError (shape) from
    the format, naming the tensor."""
    if _passthrough(ckpt, entry):
        return ckpt.load_block_fp8(entry.tensor, start, start + rows.shape[0])
    return FORMATS[entry.format].quantize(rows, entry.name)


def quantize_entry(ckpt: Checkpoint, entry: PlanEntry) -> QuantizedTensor | torch.Tensor:
    """One plan entry's whole value, as ``dsq quantize`` writes it: a QuantizedTensor ([out, in] codes and
    per-block scales, see ``formats.QuantizedTensor``) for a quantized entry, else the source tensor in
    its floating dtype. What exporters given a recipe (``source.Source``) hold in memory, one tensor at a
    time; the same values as a quantized checkpoint read back (rounding is row-local, so quantizing the
    whole tensor equals ``quantize_checkpoint``'s slice-by-slice pass). Raises as ``quantize_rows``."""
    if not entry.format:
        return ckpt.load(entry.tensor)
    if _passthrough(ckpt, entry):
        return ckpt.load_block_fp8(entry.tensor)
    return quantize_rows(ckpt, entry, ckpt.load(entry.tensor))


def _process(
    ckpt: Checkpoint,
    entry: PlanEntry,
    outputs: list[PlannedTensor],
    layout,
    writer: SafetensorsWriter,
    calibrated: QuantizedTensor | torch.Tensor | None = None,
    pool: StreamPool | None = None,
) -> TensorResult:
    """Quantize (or copy) one tensor a row slice at a time. The first stored tensor of a quantized weight
    (its codes) streams to disk slice by slice; the small ones (scales, zero points) are kept until the end."""
    ref = entry.tensor.ref
    src = entry.tensor
    if pool is None:
        with StreamPool() as own:
            return _process(ckpt, entry, outputs, layout, writer, calibrated, own)
    stats = ErrorStats() if entry.format else None
    fp8_passthrough = _passthrough(ckpt, entry)
    small: dict[str, list[torch.Tensor]] = {p.name: [] for p in outputs[1:]}
    fmt = FORMATS[entry.format] if entry.format else None
    slices = row_slices(entry.shape)
    ahead = pool.reader.submit(ckpt.load_rows, src, *slices[0])
    for i, (start, stop) in enumerate(slices):
        data = ahead.result()
        if i + 1 < len(slices):  # read-ahead: the next slice's pread (GIL released) overlaps this one's work
            ahead = pool.reader.submit(ckpt.load_rows, src, *slices[i + 1])
        if not entry.format and calibrated is not None:  # AWQ-rescaled float tensor
            data = rows_of(calibrated, start, stop)
        if not entry.format:
            writer.write_part(entry.name, data if data.dtype == outputs[0].dtype else data.to(outputs[0].dtype))
            continue

        # The slice (one large pread) is quantized, measured and packed in cache-sized row chunks, so each
        # step's temporaries stay in L2 instead of streaming a 16 MB float32 copy through memory per step.
        # Chunks are whole 8-row groups (4-bit zero points pack 8 rows per int32) and whole block rows.
        def work(chunk: tuple[int, int], data=data, start=start):
            c0, c1 = chunk
            part = data[c0:c1]
            if isinstance(calibrated, QuantizedTensor) and not fp8_passthrough:
                qt = rows_of(calibrated, start + c0, start + c1)
            else:
                qt = quantize_rows(ckpt, entry, part, start + c0)
            return layout.encode(entry.name, qt, full_shape=entry.shape), ErrorStats.measure_quantized(part, qt)

        chunks = [(0, stop - start)] if fp8_passthrough else row_chunks(stop - start, entry.shape[1], max(fmt.block_rows, 8))
        # in order, whatever thread computed them: the bytes and the summed statistics never depend on timing
        for parts, measured in pool.workers.map(work, chunks):
            stats.merge(measured)
            writer.write_part(outputs[0].name, parts[outputs[0].name])
            for name in small:
                small[name].append(parts[name])
        del data
    for p in outputs[1:]:
        pieces = small[p.name]
        # per-slice tensors concatenate along rows; constant ones (weight_shape) repeat whole in each slice
        writer.write(p.name, pieces[0] if tuple(pieces[0].shape) == p.shape else torch.cat(pieces))
    rel = stats.rel_rmse if stats else None
    mx = stats.max_abs if stats else None
    return TensorResult(
        name=entry.name,
        role=entry.role,
        layer=ref.layer if ref else None,
        expert=ref.expert if ref else None,
        shape=list(entry.shape),
        source_dtype=entry.tensor.source_dtype,
        format=entry.format,
        bytes_in=entry.in_bytes,
        bytes_out=entry.out_bytes,
        bits_per_weight=round(entry.bits_per_weight, 4),
        rel_rmse=rel,
        max_abs_err=mx,
        note=entry.note,
    )


def _report(ckpt: Checkpoint, plan: Plan, layout, results: list[TensorResult], seconds: float) -> dict:
    quantized = [r for r in results if r.format]
    n_q = sum(math.prod(r.shape) for r in quantized)
    return {
        "schema": "dsq-report/1",
        "dsq_version": __version__,
        "source": ckpt.source,
        "architecture": ckpt.arch.model_type,
        "source_format": "block-fp8" if ckpt.is_block_fp8 else "float",
        "recipe": {
            "name": plan.recipe.name,
            "default": plan.recipe.default,
            "roles": plan.recipe.roles,
            "overrides": [list(o) for o in plan.recipe.overrides],
        },
        "layout": layout.name if layout else None,
        "summary": {
            "tensors": len(results),
            "quantized_tensors": len(quantized),
            "bytes_in": sum(r.bytes_in for r in results),
            "bytes_out": sum(r.bytes_out for r in results),
            "quantized_bits_per_weight": round(8 * sum(r.bytes_out for r in quantized) / n_q, 4) if n_q else None,
            "mean_rel_rmse": (sum(r.rel_rmse or 0 for r in quantized) / len(quantized)) if quantized else None,
            "worst_rel_rmse": max(((r.rel_rmse or 0, r.name) for r in quantized), default=(None, None)),
            "formats": {f: sum(1 for r in quantized if r.format == f) for f in sorted(plan.formats)},
            "seconds": round(seconds, 3),
        },
        "tensors": [r.__dict__ for r in results],
    }
