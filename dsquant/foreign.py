"""Other tools' int4 checkpoints read as dsq ``QuantizedTensor``s, codes and scales as stored (no re-rounding).

Layouts (each module ``M`` of an ``nn.Linear`` with ``in`` inputs and ``out`` outputs, group ``g``):

* **GPTQ** (AutoGPTQ, GPTQModel; ``quantization_config.quant_method == "gptq"``): ``M.qweight`` int32
  ``[in / 8, out]``, packed along the *input* dim (word ``i`` holds inputs ``8i .. 8i+7``, input ``8i+k``
  at bits ``4k``); ``M.qzeros`` int32 ``[in / g, out / 8]`` packed along the output dim the same way;
  ``M.scales`` fp16 ``[in / g, out]``; ``M.g_idx`` int32 ``[in]``, the group of each input. The weight is
  ``W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]``. The original (v1, ``checkpoint_format: "gptq"``)
  format stores ``z - 1`` (AutoGPTQ's ``zeros -= 1`` before packing; GPTQModel's
  ``convert_gptq_v1_to_v2_format`` adds the 1 back); GPTQModel's ``checkpoint_format: "gptq_v2"`` stores
  ``z``. Symmetric GPTQ uses ``z = 8`` everywhere.
* **AWQ GEMM** (AutoAWQ, ``quant_method == "awq"``, ``version == "gemm"``): ``M.qweight`` int32
  ``[in, out / 8]`` packed along the *output* dim in AWQ's interleaved order: nibble ``k`` of word ``j`` holds
  output ``8j + [0, 2, 4, 6, 1, 3, 5, 7][k]``; ``M.qzeros`` int32 ``[in / g, out / 8]`` the same way (no -1);
  ``M.scales`` fp16 ``[in / g, out]``; ``W[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]``
  (AutoAWQ's ``awq/utils/packing_utils.py: dequantize_gemm``).

Mapping to dsq formats: symmetric GPTQ -> ``int4_sym_g{g}`` with code ``q - 8``; asymmetric GPTQ and AWQ ->
``int4_asym_g{g}`` with the stored ``q`` and ``z``. Groups 32/64/128 are dsq formats; GGUF carries all three
exactly (g64/g128 blocks split into Q4_0/Q4_1 blocks that repeat the scale), ONNX MatMulNBits takes them as is.
Other multiples of 32 (256, a whole row with ``group_size: -1``) are read as g32 blocks that repeat each scale:
still exact, with more scales stored.

Act-order (``desc_act`` with a ``g_idx`` that is not ``i // g``): each input column takes its scale from its own
group, scattered along the row, which no contiguous-block format holds. Such a weight becomes ``int4_*_g32``:
a block of 32 columns that all belong to one group keeps its codes, scale and zero exactly; every other block
is re-quantized (dsq's round-to-nearest for that format) from the checkpoint's dequantized values. What was
re-rounded, and the relative RMS error it added, is recorded in ``rerounded`` and logged.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from .errors import BadWeightsError, UnsupportedError
from .formats import QuantFormat, QuantizedTensor, find_format
from .layouts import unpack_int32
from .safetensors_io import read_tensor

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

log = logging.getLogger("dsq.foreign")

BITS = 4
PER_WORD = 32 // BITS
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds output 8j + AWQ_ORDER[k]
#: Stored tensors of a GPTQ/AWQ module, by suffix (``M.bias`` stays a plain tensor).
PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


def _unpack_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """GPTQ qweight int32 [rows / 8, cols] -> codes [rows, cols] (input 8i+k at bits 4k of word i)."""
    return unpack_int32(packed.T.contiguous(), BITS, rows).T


def _awq_unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """AWQ int32 [rows, cols / 8] -> codes [rows, cols] in natural output order."""
    u = unpack_int32(packed, BITS, packed.shape[1] * PER_WORD).reshape(packed.shape[0], -1, PER_WORD)
    out = torch.empty_like(u)
    out[..., list(AWQ_ORDER)] = u  # nibble k -> output AWQ_ORDER[k]
    return out.reshape(packed.shape[0], -1)[:, :cols]


def _fp16_scales(s: torch.Tensor, mod: str) -> torch.Tensor:
    if s.dtype == torch.float16:
        return s
    h = s.to(torch.float16)
    if not torch.equal(h.to(s.dtype), s):
        raise UnsupportedError(
            f"{mod}.scales: {str(s.dtype).removeprefix('torch.')} scales that fp16 cannot hold exactly; dsq's int4 "
            "formats (and GGUF Q4_0/Q4_1) carry fp16 scales: re-save the checkpoint with fp16 scales"
        )
    return h


class ForeignLayout:
    """Shared part of the GPTQ and AWQ readers: config checks, group size, shape, format and re-round log."""

    name = "foreign"

    def __init__(self, ckpt: Checkpoint, qconfig: dict) -> None:
        self.ckpt = ckpt
        self.path = ckpt.path
        bits = qconfig.get("bits", qconfig.get("w_bit"))
        if bits != BITS:
            raise UnsupportedError(f"{self.path}: {self.name} checkpoint with {bits}-bit weights; dsq reads 4-bit ones")
        self.group = int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))
        #: module -> {"blocks": re-rounded blocks of 32, "of": all blocks, "rel_error": relative RMS change}
        self.rerounded: dict[str, dict] = {}

    def shape_of(self, mod: str) -> tuple[int, int]:
        raise NotImplementedError

    def group_of(self, mod: str) -> int:
        """The checkpoint's group along the input dim (``group_size: -1`` is the whole row)."""
        cols = self.shape_of(mod)[1]
        group = cols if self.group == -1 else self.group
        if group % 32 or cols % group:
            raise UnsupportedError(
                f"{mod}: {self.name} group size {self.group} is not a multiple of 32 that divides in_features "
                f"({cols}); dsq's int4 formats and GGUF blocks are 32 wide: re-quantize from the float model"
            )
        return group

    def dsq_group(self, mod: str) -> int:
        """dsq's group for it: the same when dsq has that format (32/64/128), else 32 with the scale repeated."""
        group = self.group_of(mod)
        return group if find_format(bits=4, block_cols=group) is not None else 32

    def _regroup(self, mod: str, scale: torch.Tensor, zero: torch.Tensor | None):
        """Per-group scale/zero [out, in / group] -> per dsq block (exact: each value repeated group / 32 times)."""
        k = self.group_of(mod) // self.dsq_group(mod)
        if k == 1:
            return scale, zero
        return scale.repeat_interleave(k, 1), None if zero is None else zero.repeat_interleave(k, 1)

    def _parts(self, mod: str) -> dict[str, torch.Tensor]:
        return {n: read_tensor(self.ckpt.headers[n]) for n in (mod + p for p in PARTS) if n in self.ckpt.headers}


class GPTQLayout(ForeignLayout):
    """AutoGPTQ / GPTQModel ``qweight``/``qzeros``/``scales``/``g_idx`` (v1 and v2 zero-point conventions)."""

    name = "gptq"

    def __init__(self, ckpt: Checkpoint, qconfig: dict) -> None:
        super().__init__(ckpt, qconfig)
        fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
        if qconfig.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedError(
                f"{self.path}: GPTQ checkpoint_format {fmt!r}; dsq reads 'gptq' and 'gptq_v2' "
                "(re-save with GPTQModel in one of those)"
            )
        self.zero_offset = 1 if fmt == "gptq" else 0  # v1 stores z - 1
        self.sym = bool(qconfig.get("sym", True))
        self.desc_act = bool(qconfig.get("desc_act", False))
        self._act_order: dict[str, bool] = {}

    def shape_of(self, mod: str) -> tuple[int, int]:
        rows, out = self.ckpt.headers[mod + ".qweight"].shape
        return int(out), int(rows) * PER_WORD

    def act_order(self, mod: str) -> bool:
        """Whether ``mod``'s g_idx is not the trivial ``i // group`` (reads the small g_idx once)."""
        if mod not in self._act_order:
            info = self.ckpt.headers.get(mod + ".g_idx")
            trivial = True
            if info is not None:
                cols = self.shape_of(mod)[1]
                g_idx = read_tensor(info).to(torch.int64)
                trivial = torch.equal(g_idx, torch.arange(cols) // self.group_of(mod))
            self._act_order[mod] = not trivial
        return self._act_order[mod]

    def format_of(self, qconfig: dict, mod: str) -> QuantFormat:
        group = 32 if self.act_order(mod) else self.dsq_group(mod)
        return find_format(bits=4, symmetric=self.sym, block_cols=group)

    def _codes_zeros(self, mod: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [out, in] uint8 and zero points [out, in / g] (as stored + the v1 offset), int16."""
        out, cols = self.shape_of(mod)
        q = _unpack_rows(parts[mod + ".qweight"], cols).T.contiguous()
        z = unpack_int32(parts[mod + ".qzeros"], BITS, out).T.to(torch.int16) + self.zero_offset
        if bool((z > 15).any()):
            raise BadWeightsError(
                f"{mod}.qzeros: a GPTQ v1 zero point of 0 was stored as -1 and wrapped (AutoGPTQ's asymmetric "
                "overflow); this tensor's values are lost: re-quantize, or save with GPTQModel as gptq_v2"
            )
        return q.to(torch.uint8), z.contiguous()

    def decode(self, fmt: QuantFormat, parts: dict[str, torch.Tensor], mod: str) -> QuantizedTensor:
        out, cols = self.shape_of(mod)
        q, z = self._codes_zeros(mod, parts)
        scale = _fp16_scales(parts[mod + ".scales"], mod).T.contiguous()  # [out, n_groups]
        if self.sym and bool((z != 8).any()):
            raise BadWeightsError(
                f"{mod}.qzeros: quantization_config says sym but zero points other than 8 are stored "
                f"(checkpoint_format {'gptq' if self.zero_offset else 'gptq_v2'}); fix `sym` or the format in config.json"
            )
        if not self.act_order(mod):
            scale, z = self._regroup(mod, scale, z)
            if self.sym:
                return QuantizedTensor(fmt.name, (out, cols), (q.to(torch.int8) - 8), scale)
            return QuantizedTensor(fmt.name, (out, cols), q, scale, z.to(torch.uint8))
        return self._act_order_decode(fmt, parts, mod, q, z, scale)

    def _act_order_decode(self, fmt, parts, mod, q, z, scale) -> QuantizedTensor:
        """Per-column groups -> contiguous blocks of 32: uniform blocks exact, mixed ones re-rounded."""
        out, cols = self.shape_of(mod)
        g_idx = parts[mod + ".g_idx"].to(torch.int64)
        col_scale = scale[:, g_idx].float()
        col_zero = z[:, g_idx].float()
        w = (q.float() - col_zero) * col_scale  # GPTQ's own dequantization
        rtn = fmt.quantize(w, mod + ".weight")
        blocks = g_idx.reshape(-1, 32)
        uniform = (blocks == blocks[:, :1]).all(dim=1)  # [cols / 32]
        first = blocks[:, 0]
        col_uniform = uniform.repeat_interleave(32)
        if self.sym:
            codes = torch.where(col_uniform, q.to(torch.int8) - 8, rtn.codes)
            zero = None
        else:
            codes = torch.where(col_uniform, q, rtn.codes)
            zero = torch.where(uniform, z[:, first].to(torch.uint8), rtn.zero)
        sc = torch.where(uniform, scale[:, first], rtn.scale)
        qt = QuantizedTensor(fmt.name, (out, cols), codes, sc, zero)
        n_mixed = int((~uniform).sum())
        if n_mixed:
            change = float((qt.dequantize() - w).pow(2).sum())
            norm = float(w.pow(2).sum())
            rel = math.sqrt(change / norm) if norm else 0.0
            self.rerounded[mod] = {"blocks": n_mixed, "of": int(uniform.numel()),
                                   "rel_error": rel, "change": change, "norm": norm}
            log.warning("%s: GPTQ act-order (desc_act) groups are not contiguous: %d of %d column blocks of 32 "
                        "re-rounded to %s, relative RMS error %.3g", mod, n_mixed, uniform.numel(), fmt.name, rel)
        return qt


class AWQLayout(ForeignLayout):
    """AutoAWQ's GEMM layout (``version: "gemm"``): output-packed, interleaved, zero points as stored."""

    name = "awq"

    def __init__(self, ckpt: Checkpoint, qconfig: dict) -> None:
        super().__init__(ckpt, qconfig)
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedError(
                f"{self.path}: AWQ version {version!r}; dsq reads AutoAWQ's GEMM layout (version 'gemm')"
            )
        self.sym = not bool(qconfig.get("zero_point", True))
        if self.sym:
            raise UnsupportedError(f"{self.path}: AWQ without zero points (zero_point: false) is not supported")

    def shape_of(self, mod: str) -> tuple[int, int]:
        rows, words = self.ckpt.headers[mod + ".qweight"].shape
        return int(self.ckpt.headers[mod + ".scales"].shape[1]) or int(words) * PER_WORD, int(rows)

    def format_of(self, qconfig: dict, mod: str) -> QuantFormat:
        return find_format(bits=4, symmetric=False, block_cols=self.dsq_group(mod))

    def decode(self, fmt: QuantFormat, parts: dict[str, torch.Tensor], mod: str) -> QuantizedTensor:
        out, cols = self.shape_of(mod)
        q = _awq_unpack(parts[mod + ".qweight"], out).T.contiguous()
        z = _awq_unpack(parts[mod + ".qzeros"], out).T.contiguous()
        scale, z = self._regroup(mod, _fp16_scales(parts[mod + ".scales"], mod).T.contiguous(), z)
        return QuantizedTensor(fmt.name, (out, cols), q.to(torch.uint8), scale, z.to(torch.uint8))


def foreign_layout(ckpt: Checkpoint, qconfig: dict) -> ForeignLayout | None:
    """The reader for a GPTQ or AWQ ``quantization_config``, or None when the method is neither."""
    method = str(qconfig.get("quant_method", "")).lower()
    if method == "gptq":
        return GPTQLayout(ckpt, qconfig)
    if method == "awq":
        return AWQLayout(ckpt, qconfig)
    return None
