"""The plan: every tensor's role and format, decided once from shapes alone (no tensor data read).

``dsq plan`` prints it; ``dsq quantize`` executes it; writers size their outputs from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .checkpoint import Checkpoint, SourceTensor
from .errors import UnsupportedError
from .formats import FORMATS
from .recipes import KEEP, Recipe

# Large tensors are processed in row slices of about this many elements (16 MB as float32), so peak
# memory does not grow with the largest tensor. Slices are whole multiples of 128 rows: FP8 blocks are
# 128 rows tall and compressed-tensors packs zero points 8 rows to an int32.
SLICE_ELEMENTS = 4 * 1024**2  # measured: 16 Mi-element slices cost ~+530 MiB of temporaries, 4 Mi ~+150
SLICE_ROW_MULTIPLE = 128

# Fixed part of the peak-RSS estimate: the Python interpreter with torch imported (measured: ~350 MB
# on Linux x86-64 with torch 2.13 CPU) plus headroom for the allocator.
BASE_RSS_BYTES = 450 * 1024**2


@dataclass(frozen=True)
class PlanEntry:
    tensor: SourceTensor
    format: str | None  # None: kept in its source dtype
    note: str = ""

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def role(self) -> str:
        return self.tensor.ref.role.value if self.tensor.ref else "unmapped"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    @property
    def in_bytes(self) -> int:
        return self.tensor.numel * self.tensor.float_dtype.itemsize

    @property
    def out_bytes(self) -> int:
        if self.format is None:
            return self.in_bytes
        return FORMATS[self.format].nbytes(self.shape)  # type: ignore[arg-type]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.out_bytes / max(self.tensor.numel, 1)

    @property
    def work_bytes(self) -> int:
        """Peak bytes while this tensor is processed, one row slice at a time: the raw slice, its float32
        copy and the quantizer's temporaries (about five float32 copies), plus the scales kept to the end."""
        start, stop = row_slices(self.shape)[0]
        n = self.tensor.numel * (stop - start) // max(self.shape[0] if self.shape else 1, 1)
        raw = n * self.tensor.info.torch_dtype.itemsize
        if not self.format:
            return raw + 4 * n
        fmt = FORMATS[self.format]
        return raw + 6 * 4 * n + self.out_bytes - math.ceil(self.tensor.numel * fmt.bits / 8)


@dataclass(frozen=True)
class Plan:
    checkpoint: Checkpoint
    recipe: Recipe
    entries: list[PlanEntry]

    @property
    def in_bytes(self) -> int:
        return sum(e.in_bytes for e in self.entries)

    @property
    def out_bytes(self) -> int:
        return sum(e.out_bytes for e in self.entries)

    @property
    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.format]

    @property
    def formats(self) -> set[str]:
        return {e.format for e in self.entries if e.format}

    @property
    def peak_rss_estimate(self) -> int:
        return BASE_RSS_BYTES + max((e.work_bytes for e in self.entries), default=0)

    @property
    def bits_per_weight(self) -> float:
        n = sum(e.tensor.numel for e in self.quantized)
        return 8 * sum(e.out_bytes for e in self.quantized) / n if n else 0.0


def _fallback(fmt_name: str, shape: tuple[int, ...], fallback: str) -> tuple[str | None, str]:
    """When ``fmt_name`` cannot hold ``shape``: the same family with a smaller block, else ``fallback``."""
    fmt = FORMATS[fmt_name]
    why = fmt.check_shape(shape)
    m = re.match(r"(.*_g)(\d+)$", fmt_name)
    if m and len(shape) == 2:
        for name, other in FORMATS.items():
            g = other.block_cols
            if name.startswith(m.group(1)) and g and g < fmt.block_cols and other.check_shape(shape) is None:
                return name, f"{why}; used {name}"
    if fallback != KEEP and FORMATS[fallback].check_shape(shape) is None:
        return fallback, f"{why}; used fallback {fallback}"
    return None, f"{why}; kept unquantized"


def make_plan(ckpt: Checkpoint, recipe: Recipe, allow_unmapped: bool = False) -> Plan:
    """Every tensor of ``ckpt`` with the format ``recipe`` gives it, from the headers alone (no data read).

    One ``PlanEntry`` per logical tensor in file order (a block-FP8 weight and its scale count as one):
    ``format`` is a ``FORMATS`` name, or None for a tensor kept in its source dtype (norms, biases, router,
    embeddings, ``keep``). A weight whose shape the chosen format cannot hold ([out, in] with ``in`` not a
    multiple of the block) gets the same family with a smaller block, else ``recipe.fallback``, else stays
    unquantized; ``PlanEntry.note`` says which. Sizes in the plan are bytes (``in_bytes``/``out_bytes``,
    ``peak_rss_estimate``).

    Raises UnsupportedError naming the file and tensor for a tensor the architecture table does not
    know, unless ``allow_unmapped`` (then kept as is, noted); and what reading the headers raises
    (CorruptFileError, UnsupportedError for an already quantized checkpoint)."""
    entries = []
    for t in ckpt.tensors:
        if t.ref is None:
            if not allow_unmapped:
                raise UnsupportedError(
                    f"{t.info.file.name}: tensor `{t.name}` is not in dsq's `{ckpt.arch.model_type}` table; "
                    "pass --allow-unmapped to keep it unquantized (it is listed in the report)"
                )
            entries.append(PlanEntry(t, None, "unmapped: kept as is"))
            continue
        choice = recipe.format_for(t.ref)
        if choice == KEEP:
            entries.append(PlanEntry(t, None))
            continue
        if FORMATS[choice].check_shape(t.shape) is None:
            entries.append(PlanEntry(t, choice))
        else:
            fmt, note = _fallback(choice, t.shape, recipe.fallback)
            entries.append(PlanEntry(t, fmt, note))
    return Plan(ckpt, recipe, entries)


def row_slices(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering dim 0 in slices of about SLICE_ELEMENTS elements."""
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    per_row = math.prod(shape[1:])
    step = max(SLICE_ROW_MULTIPLE, SLICE_ELEMENTS // max(per_row, 1) // SLICE_ROW_MULTIPLE * SLICE_ROW_MULTIPLE)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)] or [(0, 0)]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover
