"""Reading a quantized checkpoint back (dsq's own output, compressed-tensors / DeepSeek-FP8 ones, and GPTQ /
AutoAWQ-GEMM ones through ``foreign.py``): each weight as the ``QuantizedTensor`` it was written from, so
exporters re-pack and never re-round.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import torch

from .checkpoint import Checkpoint
from .errors import InputError
from .foreign import PARTS as FOREIGN_PARTS
from .foreign import foreign_layout
from .formats import QuantizedTensor
from .layouts import layout_for_config, module_of
from .safetensors_io import read_tensor

# Stored tensors that belong to a quantized module, by suffix (compressed-tensors, DeepSeek-FP8).
_PARTS = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_scale_inv",
          ".weight_dmin", ".weight_sub_scale", ".weight_sub_min")  # the last three: GGUF-grid formats (kformats.py)


class QuantizedCheckpoint(Checkpoint):
    def __init__(self, source):
        super().__init__(source)
        if not self.quantization_config:
            raise InputError(f"{self.path}: not a quantized checkpoint (config.json has no quantization_config)")
        # GPTQ / AWQ readers need the checkpoint (act-order is decided per module from its g_idx).
        self.layout = foreign_layout(self, self.quantization_config) or layout_for_config(self.quantization_config)
        self._parts = FOREIGN_PARTS if hasattr(self.layout, "shape_of") else _PARTS

    def module_shape(self, mod: str) -> tuple[int, int]:
        """[out, in] of a quantized module, from its stored tensors' headers (no data read)."""
        if hasattr(self.layout, "shape_of"):
            return self.layout.shape_of(mod)
        shape_info = self.headers.get(mod + ".weight_shape")
        if shape_info is not None:
            return tuple(int(x) for x in read_tensor(shape_info).tolist())
        return tuple(self.headers[mod + ".weight"].shape)

    @property
    def rerounded(self) -> dict[str, dict]:
        """Module -> what reading it re-rounded (GPTQ act-order only; filled as modules are decoded)."""
        return getattr(self.layout, "rerounded", {})

    @cached_property
    def modules(self) -> dict[str, list[str]]:
        """Quantized module -> its stored tensor names."""
        out: dict[str, list[str]] = {}
        for name in self.headers:
            for suffix in self._parts:
                if name.endswith(suffix):
                    out.setdefault(name[: -len(suffix)], []).append(name)
        for mod in out:
            if self.headers.get(mod + ".weight") is not None and self.headers[mod + ".weight"].dtype == "F8_E4M3":
                out[mod].append(mod + ".weight")
        return out

    def iter_weights(self) -> Iterator[tuple[str, QuantizedTensor | torch.Tensor]]:
        """(weight name, QuantizedTensor) for quantized weights, (name, tensor) for the rest, in file order
        (``source.Source``, the reader every exporter uses)."""
        from .source import Source

        return Source(self).iter_weights()

    def dequantized_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The whole model dequantized (small models and tests only: this holds every tensor)."""
        out = {}
        for name, t in self.iter_weights():
            out[name] = (t.dequantize() if isinstance(t, QuantizedTensor) else t).to(
                dtype if (isinstance(t, QuantizedTensor) or t.is_floating_point()) else t.dtype
            )
        return out


__all__ = ["QuantizedCheckpoint", "module_of"]
