"""What the GGUF writer reads: any checkpoint dsq opens, one tensor at a time, by HF name.

* A quantized checkpoint (dsq's compressed-tensors output, other tools' compressed-tensors, DeepSeek
  block-FP8, GPTQ and AutoAWQ-GEMM through dsquant/foreign.py): quantized weights come back as the ``QuantizedTensor`` they were written from, so the
  writer re-packs codes and scales instead of re-rounding dequantized floats.
* A plain HF checkpoint (bf16/fp16/fp32): float tensors; a recipe may ask for quantization on the way.

Reads are random access (the writer visits tensors in GGUF order and stacks MoE experts), but only
one logical tensor is materialised at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dsq.dsquant.archs import TensorRef
from dsq.dsquant.checkpoint import Checkpoint
from dsq.dsquant.formats import QuantizedTensor
from dsq.dsquant.quantized import QuantizedCheckpoint
from dsq.dsquant.safetensors_io import read_tensor


@dataclass(frozen=True)
class SourceEntry:
    name: str
    shape: tuple[int, ...]
    ref: TensorRef | None
    format: str | None  # dsq format of a quantized weight, None for float tensors
    float_dtype: torch.dtype  # dtype of the tensor (or of its dequantized model) as floats


class GGUFSource:
    """A checkpoint seen as {HF name: SourceEntry} plus ``load(name)``."""

    def __init__(self, path: str | Path):
        probe = Checkpoint(path)
        self.quantized = bool(probe.quantization_config)
        self.ckpt: Checkpoint = QuantizedCheckpoint(path) if self.quantized else probe
        self.config = self.ckpt.config
        self.arch = self.ckpt.arch
        self.path = self.ckpt.path
        self.entries: dict[str, SourceEntry] = self._entries()

    def _entries(self) -> dict[str, SourceEntry]:
        ck = self.ckpt
        out: dict[str, SourceEntry] = {}
        if not isinstance(ck, QuantizedCheckpoint):
            for t in ck.tensors:
                out[t.name] = SourceEntry(t.name, tuple(t.shape), t.ref, None, t.float_dtype)
            return out
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
        ck = self.ckpt
        if isinstance(ck, QuantizedCheckpoint):
            entry = self.entries[name]
            if entry.format is None:
                return read_tensor(ck.headers[name])
            mod = name.removesuffix(".weight")
            parts = {n: read_tensor(ck.headers[n]) for n in ck.modules[mod]}
            return ck.layout.decode(ck.layout.format_of(ck.quantization_config, mod), parts, mod)
        if not hasattr(self, "_by_name"):
            self._by_name = {t.name: t for t in ck.tensors}
        return ck.load(self._by_name[name])

    def side_file(self, fname: str) -> Path | None:
        p = self.path / fname
        return p if p.is_file() else None
