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
        """Peak bytes while this tensor is processed: the raw read, a float32 copy, and the
        quantizer's float32 temporaries (about three more copies)."""
        n = self.tensor.numel
        raw = self.tensor.info.nbytes + (self.tensor.scale_info.nbytes if self.tensor.scale_info else 0)
        return raw + (4 * 4 * n if self.format else 4 * n)


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


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def param_count(plan: Plan) -> int:
    return sum(math.prod(e.shape) for e in plan.entries)
