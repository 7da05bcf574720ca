"""On-disk layouts of a quantized checkpoint: how a ``QuantizedTensor`` becomes stored tensors and back.

* ``compressed-tensors`` (pack-quantized, as llm-compressor writes it for vLLM and transformers):
  ``<module>.weight_packed`` int32 (codes offset to unsigned, 32 // bits per word, lowest bits
  first), ``weight_scale`` [out, in/group], ``weight_zero_point`` packed along dim 0, ``weight_shape``.
* ``deepseek-fp8`` (DeepSeek-V3's own): ``<module>.weight`` float8_e4m3fn + ``weight_scale_inv``
  float32 per 128x128 block, ``quantization_config = {quant_method: fp8, weight_block_size: [128, 128]}``.

Each layout says which tensors it will write (from the plan, before any data), encodes, decodes
and writes ``quantization_config``. Decoding is what exporters use to read a dsq checkpoint back.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import torch

from .errors import CorruptFileError, RecipeError, UnsupportedError
from .formats import FORMATS, QuantFormat, QuantizedTensor, find_format
from .safetensors_io import PlannedTensor


def _check_stored(planned, tensors: dict[str, torch.Tensor], mod: str, scale_name: str) -> None:
    """A quantized checkpoint's stored tensors against the shapes its own weight shape implies (what dsq
    would write), and its scales finite: a hostile or damaged file is refused by name, never unpacked
    into wrong values or an exported GGUF/ONNX with NaN scales."""
    for p in planned:
        t = tensors.get(p.name)
        if t is None:
            raise CorruptFileError(f"{p.name}: missing; the quantized checkpoint is incomplete")
        if tuple(t.shape) != tuple(p.shape):
            raise CorruptFileError(
                f"{p.name}: shape {list(t.shape)}, but {mod}'s weight shape implies {list(p.shape)}; damaged checkpoint"
            )
    scale = tensors[scale_name]
    if scale.is_floating_point() and not bool(torch.isfinite(scale).all()):
        raise CorruptFileError(f"{scale_name}: NaN/Inf scale; the quantized checkpoint is damaged")


def module_of(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [rows, cols] -> int32 [rows, ceil(cols * bits / 32)], element j of a word at bits j*bits.

    4- and 8-bit codes are packed as bytes (two nibbles, or one code, per byte) whose little-endian int32
    view is the word compressed-tensors stores: one pass over uint8, no int32 or int64 copy of the codes.
    Other widths are built one code position at a time in int32 (the top code's shift wraps into the
    sign bit, which is the two's-complement word compressed-tensors stores)."""
    per = 32 // bits
    rows, cols = u.shape
    n_words = math.ceil(cols / per)
    if bits in (4, 8) and sys.byteorder == "little":
        b = u.to(torch.uint8).numpy() if u.dtype != torch.uint8 else u.numpy()
        if n_words * per != cols:
            b = np.pad(b, ((0, 0), (0, n_words * per - cols)))
        b = np.ascontiguousarray(b)
        if bits == 8:
            return torch.from_numpy(b.view(np.int32).reshape(rows, n_words))
        from .rtn_kernels import pack_nibbles  # low nibble = even element, high nibble = odd element

        return torch.from_numpy(pack_nibbles(b, 0, n_words * 4).view(np.int32).reshape(rows, n_words))
    if n_words * per != cols:
        u = torch.nn.functional.pad(u, (0, n_words * per - cols))
    u = u.reshape(rows, n_words, per)
    words = torch.zeros(rows, n_words, dtype=torch.int32)
    for j in range(per):
        words |= u[..., j].to(torch.int32) << (j * bits)
    return words


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words [rows, n] -> unsigned codes [rows, cols] (uint8 for 4- and 8-bit codes, else int64)."""
    rows = packed.shape[0]
    if bits in (4, 8) and sys.byteorder == "little":
        b = packed.contiguous().numpy().view(np.uint8).reshape(rows, -1)
        if bits == 8:
            return torch.from_numpy(b[:, :cols].copy())
        from .rtn_kernels import unpack_nibbles  # compiled: one pass, no uint64 temporaries (their fresh
        # pages cost more to zero than the unpacking itself)

        return torch.from_numpy(unpack_nibbles(b, cols))
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(rows, -1)[:, :cols]


def _unsigned(codes: torch.Tensor, offset: int) -> torch.Tensor:
    """Codes + offset as uint8 (codes of 8 bits or fewer): int8 code c is stored as the byte c + offset,
    which wrapping uint8 arithmetic on c's bit pattern gives in one pass."""
    if codes.dtype in (torch.int8, torch.uint8):
        b = codes.numpy().view(np.uint8)
        return torch.from_numpy(b + np.uint8(offset) if offset else b)
    return (codes.to(torch.int16) + offset).to(torch.uint8)


class CompressedTensorsLayout:
    name = "compressed-tensors"

    @staticmethod
    def offset(fmt: QuantFormat) -> int:
        """Stored codes are signed (compressed-tensors' int range); +offset makes them unsigned to pack."""
        return 1 << (fmt.bits - 1)

    def planned(self, name: str, fmt: QuantFormat, shape: tuple[int, int]) -> list[PlannedTensor]:
        mod = module_of(name)
        if hasattr(fmt, "stored"):  # a GGUF-grid format (kformats.py) stores its own parts
            return [PlannedTensor(f"{mod}.{k}", dt, sh) for k, (dt, sh) in fmt.stored(shape).items()]
        per = 32 // fmt.bits
        sr, sc = fmt.scale_shape(shape)
        out = [
            PlannedTensor(f"{mod}.weight_packed", torch.int32, (shape[0], math.ceil(shape[1] / per))),
            PlannedTensor(f"{mod}.weight_scale", fmt.scale_dtype, (sr, sc)),
            PlannedTensor(f"{mod}.weight_shape", torch.int64, (2,)),
        ]
        if not fmt.symmetric:
            out.append(PlannedTensor(f"{mod}.weight_zero_point", torch.int32, (math.ceil(sr / per), sc)))
        return out

    def encode(self, name: str, qt: QuantizedTensor, full_shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors of ``qt`` (or of a row slice of a weight whose shape is ``full_shape``)."""
        fmt = qt.fmt
        mod = module_of(name)
        if hasattr(fmt, "stored"):
            return {f"{mod}.{k}": v for k, v in fmt.encode(qt, full_shape).items()}
        # dsq's asymmetric codes are unsigned [0, 2^b); symmetric ones are signed. Either way the
        # stored unsigned value is signed_code + offset, and the stored zero point likewise.
        unsigned = _unsigned(qt.codes, 0 if qt.zero is not None else self.offset(fmt))
        out = {
            f"{mod}.weight_packed": pack_int32(unsigned, fmt.bits),
            f"{mod}.weight_scale": qt.scale.to(fmt.scale_dtype),
            f"{mod}.weight_shape": torch.tensor(full_shape or qt.shape, dtype=torch.int64),
        }
        if qt.zero is not None:
            out[f"{mod}.weight_zero_point"] = pack_int32(qt.zero.to(torch.uint8).T, fmt.bits).T.contiguous()
        return out

    def decode(self, fmt: QuantFormat, tensors: dict[str, torch.Tensor], mod: str) -> QuantizedTensor:
        stored = tensors[f"{mod}.weight_shape"]
        shape = tuple(int(x) for x in stored.reshape(-1).tolist())
        if len(shape) != 2 or min(shape) <= 0:
            raise CorruptFileError(f"{mod}.weight_shape = {list(shape)}: not the [rows, columns] of a weight")
        _check_stored(self.planned(mod + ".weight", fmt, shape), tensors, mod, f"{mod}.weight_scale")
        if hasattr(fmt, "stored"):
            return fmt.decode({k.removeprefix(mod + "."): v for k, v in tensors.items()}, shape, mod)
        u = unpack_int32(tensors[f"{mod}.weight_packed"], fmt.bits, shape[1])
        scale = tensors[f"{mod}.weight_scale"]
        zp = tensors.get(f"{mod}.weight_zero_point")
        if zp is not None:
            zero = unpack_int32(zp.T.contiguous(), fmt.bits, scale.shape[0]).T.to(torch.uint8)
            return QuantizedTensor(fmt.name, shape, u.to(torch.uint8).contiguous(), scale, zero.contiguous())
        if u.dtype == torch.uint8:  # stored byte - offset, wrapping, is the int8 code's bit pattern
            codes = u.numpy()
            np.subtract(codes, np.uint8(self.offset(fmt)), out=codes)  # in place: u is decode's own buffer
            codes = codes.view(np.int8)
            return QuantizedTensor(fmt.name, shape, torch.from_numpy(codes), scale)
        return QuantizedTensor(fmt.name, shape, (u - self.offset(fmt)).to(torch.int8), scale)

    @staticmethod
    def scheme(fmt: QuantFormat) -> dict:
        return {
            "num_bits": fmt.bits,
            "type": "int",
            "symmetric": fmt.symmetric,
            "strategy": "group" if fmt.block_cols else "channel",
            "group_size": fmt.block_cols or None,
            "block_structure": None,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
            "scale_dtype": str(fmt.scale_dtype).removeprefix("torch."),
            "zp_dtype": None if fmt.symmetric else "int8",
        }

    def quantization_config(self, quantized: dict[str, str], ignored: list[str]) -> dict:
        """``quantized`` maps weight name -> format name; one config group per format, by module name."""
        groups = {}
        by_format: dict[str, list[str]] = {}
        for name, f in quantized.items():
            by_format.setdefault(f, []).append(module_of(name))
        for i, (f, modules) in enumerate(sorted(by_format.items())):
            groups[f"group_{i}"] = {
                "targets": [f"re:^{re.escape(m)}$" for m in modules],
                "weights": FORMATS[f].scheme() if hasattr(FORMATS[f], "stored") else self.scheme(FORMATS[f]),
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignored,
            "kv_cache_scheme": None,
        }

    def format_of(self, qconfig: dict, mod: str) -> QuantFormat:
        for group in qconfig.get("config_groups", {}).values():
            for target in group.get("targets", []):
                if target == mod or (target.startswith("re:") and re.match(target[3:], mod)):
                    return _format_from_scheme(group["weights"], mod)
        raise UnsupportedError(f"{mod}: quantized tensors but no config group targets this module")


def _format_from_scheme(w: dict, mod: str) -> QuantFormat:
    if w.get("type") == "gguf":  # dsq's GGUF-grid formats (kformats.py)
        f = FORMATS.get(str(w.get("gguf_type")))
        if f is None or not hasattr(f, "stored"):
            raise UnsupportedError(f"{mod}: GGUF grid type {w.get('gguf_type')!r} is not one dsq knows")
        return f
    for f in FORMATS.values():
        if hasattr(f, "stored"):
            continue
        if (
            f.bits == w.get("num_bits") and w.get("type", "int") == "int"
            and f.symmetric == w.get("symmetric", True) and (f.block_cols or None) == w.get("group_size")
            and f.scale_dtype == torch.float16 and f.block_rows == 1
        ):
            return f
    raise UnsupportedError(f"{mod}: compressed-tensors scheme {w} has no dsq format")


class DeepSeekFp8Layout:
    name = "deepseek-fp8"

    def planned(self, name: str, fmt: QuantFormat, shape: tuple[int, int]) -> list[PlannedTensor]:
        return [
            PlannedTensor(name, torch.float8_e4m3fn, shape),
            PlannedTensor(name + "_scale_inv", torch.float32, fmt.scale_shape(shape)),
        ]

    def encode(self, name: str, qt: QuantizedTensor, full_shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        return {name: qt.codes, name + "_scale_inv": qt.scale.to(torch.float32)}

    def decode(self, fmt: QuantFormat, tensors: dict[str, torch.Tensor], mod: str) -> QuantizedTensor:
        w = tensors[mod + ".weight"]
        if w.ndim != 2:
            raise CorruptFileError(f"{mod}.weight: FP8 weight of shape {list(w.shape)}, not [rows, columns]")
        _check_stored(self.planned(mod + ".weight", fmt, tuple(w.shape)), tensors, mod, mod + ".weight_scale_inv")
        return QuantizedTensor(fmt.name, tuple(w.shape), w, tensors[mod + ".weight_scale_inv"])

    def quantization_config(self, quantized: dict[str, str], ignored: list[str]) -> dict:
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": ignored,
        }

    def format_of(self, qconfig: dict, mod: str) -> QuantFormat:
        bs = qconfig.get("weight_block_size") or [128, 128]
        fmt = find_format(packing="fp8", bits=8, block_rows=bs[0], block_cols=bs[1]) if len(bs) == 2 else None
        if fmt is None:
            known = [f"{f.block_rows}x{f.block_cols}" for f in FORMATS.values() if f.packing == "fp8"]
            raise UnsupportedError(f"{mod}: FP8 block size {bs} is not supported (dsq knows {', '.join(known)})")
        return fmt


LAYOUTS = {layout.name: layout for layout in (CompressedTensorsLayout(), DeepSeekFp8Layout())}


def layout_for_formats(formats: set[str]) -> CompressedTensorsLayout | DeepSeekFp8Layout | None:
    """The layout that holds every format in a plan: int formats -> compressed-tensors, FP8 -> DeepSeek."""
    if not formats:
        return None
    fp8 = {f for f in formats if FORMATS[f].packing == "fp8"}
    if fp8 and fp8 != formats:
        raise RecipeError(
            "a checkpoint cannot mix FP8 blocks with int formats yet (formats: "
            f"{', '.join(sorted(formats))}); use one family per recipe"
        )
    return LAYOUTS["deepseek-fp8"] if fp8 else LAYOUTS["compressed-tensors"]


def layout_for_config(qconfig: dict) -> CompressedTensorsLayout | DeepSeekFp8Layout:
    method = qconfig.get("quant_method")
    if method == "compressed-tensors":
        if qconfig.get("format") not in ("pack-quantized", None):
            raise UnsupportedError(f"compressed-tensors format {qconfig.get('format')!r} is not supported")
        return LAYOUTS["compressed-tensors"]
    if method == "fp8":
        return LAYOUTS["deepseek-fp8"]
    raise UnsupportedError(f"quantization method {method!r} is not supported")
