"""The one reader every exporter uses: any checkpoint dsq opens, one logical weight at a time, by HF name.

* A quantized checkpoint (dsq's compressed-tensors output, other tools' compressed-tensors, DeepSeek
  block-FP8, GPTQ and AutoAWQ-GEMM through ``foreign.py``): each quantized weight comes back as the
  ``QuantizedTensor`` it was written from (``QuantizedCheckpoint``'s layout decodes it), so writers
  re-pack codes and scales instead of re-rounding dequantized floats; other tensors as stored.
* A float HF checkpoint (bf16/fp16/fp32, or DeepSeek block-FP8 read as floats): float tensors.
* A float checkpoint with a recipe (``export --recipe``): the recipe's plan (``plan.make_plan``) decides
  every tensor's format and ``quantize.quantize_entry`` quantizes it as ``dsq quantize`` would, so an
  export with ``--recipe R`` holds the values of ``dsq quantize -r R`` followed by an export.

Reads are random access (GGUF visits tensors in its own order and stacks MoE experts), and only one
logical tensor is materialised per ``load``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .archs import TensorRef
from .checkpoint import Checkpoint
from .errors import InputError
from .formats import QuantizedTensor
from .plan import make_plan
from .quantized import QuantizedCheckpoint
from .recipes import load_recipe
from .safetensors_io import read_tensor


@dataclass(frozen=True)
class SourceEntry:
    """One logical weight: ``shape`` as the model uses it ([out, in] for a linear weight, whatever its stored
    parts look like), its architecture ``ref`` (None: not in the architecture table), its dsq ``format``
    (None: a float tensor) and ``float_dtype``, the dtype of the tensor (or of its dequantized model)."""

    name: str
    shape: tuple[int, ...]
    ref: TensorRef | None
    format: str | None
    float_dtype: torch.dtype

    @property
    def kind(self) -> str:
        """The role kind (``linear``, ``norm``, ``embedding``, ...) or ``unmapped``."""
        return self.ref.info.kind if self.ref else "unmapped"


class Source:
    """A checkpoint seen as ``entries`` ({HF name: SourceEntry}, in file order) plus ``load(name)``.

    ``checkpoint``: a path (local directory, hub id or ``default``) or an open ``Checkpoint``.
    ``recipe``: a preset name, recipe TOML path or ``Recipe``; only for float checkpoints (DeepSeek's
    block-FP8 ones included: ``dsq quantize`` reads them too, an FP8 recipe keeps their codes as stored).

    Raises InputError when a recipe is given for an otherwise quantized checkpoint, and what opening the
    checkpoint raises (InputError, CorruptFileError, UnsupportedError, RecipeError)."""

    def __init__(self, checkpoint: str | Path | Checkpoint, recipe=None):
        probe = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        stored = bool(probe.quantization_config)
        if recipe is not None and stored and not probe.is_block_fp8:
            raise InputError(
                f"{probe.path}: already quantized; --recipe applies to float checkpoints only (export it as it is)"
            )
        if recipe is not None:  # a block-FP8 source is read as floats, as `dsq quantize` reads it
            stored = False
        elif stored and not isinstance(probe, QuantizedCheckpoint):
            probe = QuantizedCheckpoint(probe.path)
        self.ckpt: Checkpoint = probe
        self.config: dict = probe.config
        self.arch = probe.arch
        self.path: Path = probe.path
        self.plan = None
        if recipe is not None:
            # Unmapped tensors are the exporters' to refuse or carry (as without a recipe), not the plan's.
            self.plan = make_plan(probe, load_recipe(recipe) if isinstance(recipe, str) else recipe,
                                  allow_unmapped=True)
        #: whether weights come back as QuantizedTensors: stored quantized, or quantized by ``recipe``
        self.quantized = stored or bool(self.plan and self.plan.quantized)
        self.entries: dict[str, SourceEntry] = self._entries()

    def _entries(self) -> dict[str, SourceEntry]:
        ck = self.ckpt
        out: dict[str, SourceEntry] = {}
        if self.plan is not None:
            self._planned = {e.name: e for e in self.plan.entries}
            for e in self.plan.entries:
                t = e.tensor
                out[t.name] = SourceEntry(t.name, tuple(t.shape), t.ref, e.format, t.float_dtype)
            return out
        if not isinstance(ck, QuantizedCheckpoint):
            self._tensors = {t.name: t for t in ck.tensors}
            for t in ck.tensors:
                out[t.name] = SourceEntry(t.name, tuple(t.shape), t.ref, None, t.float_dtype)
            return out
        # Stored parts in file order; a quantized module appears where its first part is.
        owner = {n: mod for mod, names in ck.modules.items() for n in names}
        for info in sorted(ck.headers.values(), key=lambda i: (str(i.file), i.begin)):
            mod = owner.get(info.name)
            if mod is None:
                out[info.name] = SourceEntry(info.name, tuple(info.shape), ck.arch.match(info.name), None,
                                             info.torch_dtype)
                continue
            name = mod + ".weight"
            if name in out:
                continue
            fmt = ck.layout.format_of(ck.quantization_config, mod)
            out[name] = SourceEntry(name, ck.module_shape(mod), ck.arch.match(name), fmt.name, torch.bfloat16)
        return out

    def load(self, name: str) -> QuantizedTensor | torch.Tensor:
        """The weight ``name`` (a key of ``entries``): a QuantizedTensor when its entry has a format, else the
        tensor in its floating dtype (block-FP8 dequantized). KeyError for a name not in ``entries``."""
        ck = self.ckpt
        entry = self.entries[name]
        if self.plan is not None:
            from .quantize import quantize_entry  # quantize.py imports the calibration stack: only when used

            return quantize_entry(ck, self._planned[name])
        if not isinstance(ck, QuantizedCheckpoint):
            return ck.load(self._tensors[name])
        if entry.format is None:
            return read_tensor(ck.headers[name])
        mod = name.removesuffix(".weight")
        parts = {n: read_tensor(ck.headers[n]) for n in ck.modules[mod]}
        return ck.layout.decode(ck.layout.format_of(ck.quantization_config, mod), parts, mod)

    def iter_weights(self) -> Iterator[tuple[str, QuantizedTensor | torch.Tensor]]:
        """(name, value) for every entry in file order (sequential reads), one tensor in memory at a time."""
        for name in self.entries:
            yield name, self.load(name)

    @property
    def rerounded(self) -> dict[str, dict]:
        """Module -> what reading it re-rounded (GPTQ act-order checkpoints only, filled as modules load)."""
        return getattr(self.ckpt, "rerounded", {})

    def side_files(self) -> list[Path]:
        """The tokenizer/template/generation files to copy (``Checkpoint.side_files``: checked to lie inside)."""
        return self.ckpt.side_files()


__all__ = ["Source", "SourceEntry"]
