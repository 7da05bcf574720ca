"""``dsq export --to mlx``: a checkpoint -> an MLX-LM model folder that ``mlx_lm.load`` / ``mlx_lm generate`` read
unmodified (Apple Silicon's native runtime; MLX also runs on Linux CPUs).

MLX-LM's layout (``mlx_lm.utils.load_model`` and ``mlx.core.quantize``, mode ``affine``): a quantized linear
``P`` is three safetensors tensors ``P.weight`` uint32 ``[out, in * bits / 32]`` (unsigned codes packed
little-end first: code j of a word in bits ``j*bits .. j*bits+bits-1``), ``P.scales`` and ``P.biases``
``[out, in / group_size]``, and every weight is ``w = scale * q + bias`` over groups of ``group_size``
consecutive inputs. ``config.json`` says ``quantization: {group_size, bits, mode}``; a module packed
differently is named there with its own ``{group_size, bits}`` (what ``mlx_lm.convert`` writes for mixed
recipes). Modules without ``scales`` (embeddings, norms, a kept lm_head) stay float.

dsq's codes and scales are carried over, never re-rounded (``dsquant/formats.py`` is the definition):

* ``int4_sym_gG``  w = c*s, c in [-8, 7]      -> q = c + 8,   scale = s, bias = -8*s
* ``int8_gG``      w = c*s, c in [-127, 127]  -> q = c + 128, scale = s, bias = -128*s
* ``int4_asym_gG`` w = (q - z)*s, q in [0, 15] -> q,           scale = s, bias = -z*s

G = 32, 64, 128 are MLX group sizes as they are. dsq's scales are fp16, so in the default ``dtype="float16"``
the scales are exact, and so are the symmetric biases (a power-of-two multiple of an fp16 value). The
asymmetric bias ``-z*s`` needs up to 4 more mantissa bits than fp16 holds and is rounded once:
``|bias - (-z*s)| <= max(2**-11 * |z*s|, 2**-25)`` per group (half an fp16 ulp, the bound of GGUF's Q4_1
offset, ``q4_1_offset_bound``), added to every weight of the group. ``dtype="float32"`` stores scales and
biases in float32, where ``-z*s`` (at most 15 significant bits) is exact: every weight is then dsq's value.
bfloat16 is not offered: its 8-bit mantissa cannot hold dsq's fp16 scales.

Float tensors (embeddings, norms, biases, router, a kept lm_head) are written in ``dtype``: bfloat16 -> float16
is exact for magnitudes from 2**-17 to 65504 (below, fp16's subnormal spacing 2**-24 rounds by at most 2**-25;
the largest change is reported), and values above 65504 are refused; float32 holds every bfloat16/float16
value. MLX computes in the dtype of its weights, so the model runs in ``dtype`` on Metal (dsq's mlx runtime
computes in float32 on CPU, where MLX's float16 kernels are slow).

Refused, one line naming the tensor: ``int8_channel`` (one scale per row: MLX groups are 32/64/128 wide)
and ``fp8_b128`` (MLX's affine mode has no FP8 codes); re-quantize those with an int4/int8_g32 recipe.
DeepSeek-V3: mlx_lm re-quantizes a quantized ``kv_b_proj`` at load (it splits it into per-head
``embed_q``/``unembed_out``), so that one matrix is written as float32 dsq-dequantized values (exact) and
mlx_lm keeps it unquantized. Qwen3-MoE: mlx_lm's ``sanitize`` stacks only the routed experts' ``.weight``, so
for records with ``mlx_stack_experts`` the writer stacks each layer's quantized experts itself into
``mlp.switch_mlp.{gate,up,down}_proj`` ``[n_expert, ...]`` (weight, scales, biases; the same values).
Tensors stream one at a time (a layer's experts together when stacked) into shards written header-first.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsq import __version__
from dsq.dsquant.archs import ARCHITECTURES
from dsq.dsquant.atomic import atomic_dir
from dsq.dsquant.errors import BadWeightsError, UnsupportedError
from dsq.dsquant.formats import FORMATS, FP16_MAX, QuantizedTensor
from dsq.dsquant.layouts import pack_int32
from dsq.dsquant.safetensors_io import PlannedTensor, SafetensorsWriter
from dsq.dsquant.source import Source

from .gguf_quants import q4_1_offset, q4_1_offset_bound

MLX_GROUPS = (32, 64, 128)
DTYPES = {"float16": torch.float16, "float32": torch.float32}
# mlx_lm.utils.MAX_FILE_SIZE_GB: shards of at most 5 GB, named model-0000i-of-0000n.safetensors
MAX_SHARD_BYTES = 5 * 1024**3
# mx.load reads safetensors whatever their metadata; "mlx" is what mlx_lm.save writes (and what the mlx
# runtime looks for to tell an MLX folder from a Hugging Face one).
METADATA = {"format": "mlx", "producer": f"dsq {__version__}"}


@dataclass(frozen=True)
class MlxQuant:
    """How one dsq format maps onto MLX's affine mode: bits, group_size, and the code offset added."""

    bits: int
    group_size: int
    offset: int  # q_mlx = code + offset (symmetric formats); 0 for asymmetric codes (already unsigned)


def mlx_quant(fmt_name: str, tensor: str) -> MlxQuant:
    """The MLX twin of a dsq format; UnsupportedError naming ``tensor`` when there is none."""
    fmt = FORMATS[fmt_name]
    if fmt.packing == "int" and fmt.block_rows == 1 and fmt.block_cols in MLX_GROUPS:
        return MlxQuant(fmt.bits, fmt.block_cols, (1 << (fmt.bits - 1)) if fmt.symmetric else 0)
    why = ("one scale per row; MLX groups are 32, 64 or 128 inputs wide" if fmt.packing == "int" and not fmt.block_cols
           else "MLX's affine quantization has no FP8 codes" if fmt.float_codes
           else f"MLX groups are {', '.join(map(str, MLX_GROUPS))} inputs wide")
    raise UnsupportedError(
        f"{tensor}: {fmt_name} has no exact MLX layout ({why}); re-quantize the source with an int4 or "
        "int8_g32 recipe (e.g. `dsq quantize MODEL -o OUT --recipe int4`)"
    )


def to_mlx(qt: QuantizedTensor, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dsq codes/scales -> (packed uint32 weight, scales, biases) in MLX's affine layout, without re-rounding.

    ``qt`` is ``[out, in]`` in a format ``mlx_quant`` accepts; returns ``[out, in*bits/32]`` uint32 and two
    ``[out, in/group_size]`` tensors of ``dtype``. Raises BadWeightsError when a bias overflows fp16."""
    mq = mlx_quant(qt.format, name)
    if qt.zero is None:
        q = qt.codes.to(torch.int16) + mq.offset
        scale32 = qt.scale.to(torch.float32)
        bias32 = -mq.offset * scale32  # a power-of-two multiple: exact in fp16 unless it overflows
    else:
        q = qt.codes
        bias32 = -(qt.zero.to(torch.float32) * qt.scale.to(torch.float32))  # exact in float32 (<= 15 bits)
    if dtype == torch.float16:
        if bool((bias32.abs() > FP16_MAX).any()):
            raise BadWeightsError(
                f"{name}: its MLX bias (-{mq.offset or 'zero'} x scale) overflows float16; export with dtype float32"
            )
        bias = q4_1_offset(qt) if qt.zero is not None else bias32.to(torch.float16)
    else:
        bias = bias32
    packed = pack_int32(q.to(torch.uint8), mq.bits).view(torch.uint32)
    return packed, qt.scale.to(dtype), bias.to(dtype)


def bias_bound(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-group bound on |stored bias - exact bias| (so on every weight of the group); zero when exact."""
    if qt.zero is None or dtype == torch.float32:
        return torch.zeros(qt.scale.shape)
    return q4_1_offset_bound(qt)


@dataclass
class _Out:
    """One source tensor's outputs: planned tensors (name, dtype, shape) and what produces their data."""

    source: str
    planned: list[PlannedTensor]
    kind: str  # "quantized" | "float" | "dequantized" | "stacked" (one layer's routed experts, quantized)
    quant: MlxQuant | None = None
    sources: list[str] = field(default_factory=list)  # "stacked": the experts' weights, in expert order


def _skip(name: str, cfg: dict) -> str | None:
    """Why a source tensor is not part of the MLX model, or None."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) >= cfg["num_hidden_layers"]:
        return "multi-token-prediction layer (not part of the decoder)"
    if name.endswith("rotary_emb.inv_freq"):
        return "rotary buffer (recomputed by mlx_lm)"
    if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
        return "tied to model.embed_tokens.weight (mlx_lm reuses the embedding as the output layer)"
    return None


def _requantized_at_load(name: str, cfg: dict) -> bool:
    """A role the record lists in ``mlx_requantized`` (DeepSeek-V3's kv_b_proj: mlx_lm splits it per head and
    re-runs mx.quantize on it when it is quantized)."""
    rec = ARCHITECTURES.get(cfg.get("model_type"))
    if rec is None or not rec.mlx_requantized:
        return False
    ref = rec.match(name)
    return ref is not None and ref.role in rec.mlx_requantized


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.\d+\.((?:gate|up|down)_proj)$")


def mlx_module(module: str) -> str:
    """The module path mlx_lm gives a source module: routed experts are stacked (by the model's ``sanitize``)
    into ``mlp.switch_mlp.{gate,up,down}_proj``; every other path is the Hugging Face one."""
    m = _EXPERT.match(module)
    return f"{m.group(1)}.switch_mlp.{m.group(2)}" if m else module


def _plan(src: Source, cfg: dict, dtype: torch.dtype) -> tuple[list[_Out], list[str]]:
    outs: list[_Out] = []
    skipped: Counter[str] = Counter()
    stacked: dict[str, tuple[str, str | None]] = {}  # switch_mlp module -> (first expert weight, its format)
    rec = ARCHITECTURES.get(cfg.get("model_type"))
    pending: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}  # switch_mlp module -> (expert, name, shape)
    slots: dict[str, _Out] = {}
    for name, e in src.entries.items():
        why = _skip(name, cfg)
        if why:
            skipped[why] += 1
            continue
        mod = name.removesuffix(".weight")
        if (target := mlx_module(mod)) != mod:
            first, fmt = stacked.setdefault(target, (name, e.format))
            if fmt != e.format:
                raise UnsupportedError(
                    f"{name}: {e.format or 'float'} but {first} is {fmt or 'float'}; mlx_lm stacks a layer's experts "
                    "into one tensor, so they need one format: give them the same one in the recipe"
                )
            if e.format is not None and rec is not None and rec.mlx_stack_experts:
                # mlx_lm's sanitize stacks only the experts' .weight here: write switch_mlp's tensors ourselves
                if target not in pending:
                    pending[target] = []
                    outs.append(_Out(name, [], "stacked", mlx_quant(e.format, name)))
                    slots[target] = outs[-1]
                ref = rec.match(name)
                pending[target].append((ref.expert if ref is not None else 0, name, e.shape))
                continue
        if e.format is None:
            if not e.float_dtype.is_floating_point:
                raise UnsupportedError(f"{name}: {e.float_dtype} tensor; MLX-LM models hold float tensors only")
            outs.append(_Out(name, [PlannedTensor(name, dtype, e.shape)], "float"))
            continue
        if _requantized_at_load(name, cfg):
            outs.append(_Out(name, [PlannedTensor(name, torch.float32, e.shape)], "dequantized"))
            continue
        mq = mlx_quant(e.format, name)
        rows, cols = e.shape
        groups = (rows, cols // mq.group_size)
        outs.append(_Out(name, [
            PlannedTensor(mod + ".weight", torch.uint32, (rows, cols * mq.bits // 32)),
            PlannedTensor(mod + ".scales", dtype, groups),
            PlannedTensor(mod + ".biases", dtype, groups),
        ], "quantized", mq))
    for target, parts in pending.items():
        parts.sort()
        o, (rows, cols) = slots[target], parts[0][2]
        mq = o.quant
        n = len(parts)
        o.sources = [name for _, name, _ in parts]
        o.planned = [
            PlannedTensor(target + ".weight", torch.uint32, (n, rows, cols * mq.bits // 32)),
            PlannedTensor(target + ".scales", dtype, (n, rows, cols // mq.group_size)),
            PlannedTensor(target + ".biases", dtype, (n, rows, cols // mq.group_size)),
        ]
    notes = [f"{n} tensor(s) left out: {why}" for why, n in skipped.items()]
    return outs, notes


def _shards(outs: list[_Out], max_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for o in outs:
        n = sum(p.nbytes for p in o.planned)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += n
    return shards


def mlx_config(cfg: dict, outs: list[_Out]) -> dict:
    """config.json for mlx_lm: the source config without its quantization_config, plus ``quantization``.

    The most common (group_size, bits) is the default; modules packed otherwise are listed by path, as
    mlx_lm.convert writes mixed recipes. transformers 5 nests ``rope_theta`` in ``rope_parameters``; mlx_lm's
    model args read the top-level key, so it is copied up (and a non-default rope type as ``rope_scaling``)."""
    out = {k: v for k, v in cfg.items() if k != "quantization_config"}
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", rope)
    rec = ARCHITECTURES.get(cfg.get("model_type"))
    for mlx_key, hf_key in rec.mlx_keys if rec is not None else ():
        if mlx_key not in out and hf_key in cfg:
            out[mlx_key] = cfg[hf_key]
    if rec is not None and rec.mlx_yarn_rope and not out.get("rope_scaling"):
        # mlx_lm's deepseek_v2 always builds its YaRN rotary embedding from rope_scaling; with factor 1 and
        # no mscale that embedding is the plain rotary one the source uses.
        out["rope_scaling"] = {"type": "yarn", "factor": 1.0}
    out["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    quant = {mlx_module(o.planned[0].name.removesuffix(".weight")): o.quant for o in outs if o.quant is not None}
    if quant:
        count = Counter((q.group_size, q.bits) for q in quant.values())
        (group, bits), _ = count.most_common(1)[0]
        q_cfg: dict = {"group_size": group, "bits": bits, "mode": "affine"}
        for mod, q in quant.items():
            if (q.group_size, q.bits) != (group, bits):
                q_cfg[mod] = {"group_size": q.group_size, "bits": q.bits}
        out["quantization"] = q_cfg
        out["quantization_config"] = q_cfg  # mlx_lm.utils.save_config writes both keys
    return out


def _float_value(t: torch.Tensor, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """A float tensor cast to ``dtype``, and the largest absolute change the cast made."""
    if dtype == torch.float16 and t.dtype != torch.float16:
        big = t.to(torch.float32).abs().max().item() if t.numel() else 0.0
        if big > FP16_MAX:
            raise BadWeightsError(f"{name}: values up to {big:.3g} overflow float16; export with dtype float32")
    out = t.to(dtype)
    change = (out.to(torch.float64) - t.to(torch.float64)).abs().max().item() if t.numel() else 0.0
    return out, change


def export_mlx(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float16",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Write ``src_dir`` (a dsq quantized checkpoint, or a float HF directory) as an MLX-LM folder ``out_dir``.

    ``dtype``: float16 (default; asymmetric-int4 biases rounded within the bound above) or float32 (every
    value exact). Returns the report (also written as mlx-report.json): per format counts, notes, the
    largest asymmetric bias rounding and float cast change. Raises UnsupportedError for a format without an
    MLX twin (int8_channel, fp8_b128), BadWeightsError for values float16 cannot hold, OutputError for an
    existing output without ``overwrite``.

    Shapes: each quantized linear [out, in] becomes ``weight`` uint32 [out, in * bits / 32] and ``scales``/
    ``biases`` [out, in / group_size] (see the module docstring); shards hold at most ``max_shard_bytes`` bytes."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise UnsupportedError(
            f"dtype {dtype}: MLX export writes float16 or float32 (bfloat16 cannot hold dsq's fp16 scales exactly)"
        )
    tdt = DTYPES[dtype]
    src = Source(src_dir)
    cfg = src.config
    outs, notes = _plan(src, cfg, tdt)  # every refusal happens here, before anything is written
    side_files = src.side_files()  # tokenizer, template, generation settings: checked to lie inside the folder
    shards = _shards(outs, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    formats: Counter[str] = Counter()
    worst_bias, worst_cast = (0.0, ""), (0.0, "")
    done = 0
    with atomic_dir(out_dir, overwrite) as tmp:
        weight_map: dict[str, str] = {}
        for shard_name, shard in zip(names, shards, strict=True):
            writer = SafetensorsWriter(tmp / shard_name, [p for o in shard for p in o.planned], METADATA)
            for o in shard:
                if o.kind == "stacked":
                    values = [src.load(name) for name in o.sources]
                    packed = [to_mlx(v, name, tdt) for v, name in zip(values, o.sources, strict=True)]
                    for i, p in enumerate(o.planned):
                        writer.write(p.name, torch.stack([parts[i] for parts in packed]))
                    for v, name in zip(values, o.sources, strict=True):
                        bound = bias_bound(v, tdt)
                        if bound.numel() and (b := float(bound.max())) > worst_bias[0]:
                            worst_bias = (b, name)
                        formats[v.format] += 1
                    weight_map.update({p.name: shard_name for p in o.planned})
                    done += 1
                    if progress:
                        progress(done, len(outs), o.source)
                    del values, packed
                    continue
                value = src.load(o.source)
                if o.kind == "quantized":
                    assert isinstance(value, QuantizedTensor)
                    for p, data in zip(o.planned, to_mlx(value, o.source, tdt), strict=True):
                        writer.write(p.name, data)
                    bound = bias_bound(value, tdt)
                    if bound.numel() and (b := float(bound.max())) > worst_bias[0]:
                        worst_bias = (b, o.source)
                    formats[value.format] += 1
                elif o.kind == "dequantized":
                    writer.write(o.source, value.dequantize())
                    formats[value.format + " -> float32"] += 1
                else:
                    data, change = _float_value(value, o.source, tdt)
                    writer.write(o.source, data)
                    if change > worst_cast[0]:
                        worst_cast = (change, o.source)
                    formats["float:" + str(value.dtype).removeprefix("torch.")] += 1
                weight_map.update({p.name: shard_name for p in o.planned})
                done += 1
                if progress:
                    progress(done, len(outs), o.source)
                del value
            writer.close()
        if len(shards) > 1:
            total = sum(p.nbytes for o in outs for p in o.planned)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = mlx_config(cfg, outs)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in side_files:
            shutil.copy2(f, tmp / f.name)
        if n_deq := sum(o.kind == "dequantized" for o in outs):
            notes.append(f"{n_deq} DeepSeek-V3 kv_b_proj weight(s) written as float32 dsq-dequantized values (exact): "
                         "mlx_lm re-quantizes a quantized kv_b_proj when it splits it per head")
        if worst_bias[0]:
            notes.append(f"asymmetric int4 biases rounded to float16: at most {worst_bias[0]:.3g} per weight "
                         f"({worst_bias[1]}); dtype float32 keeps them exact")
        if worst_cast[0]:
            notes.append(f"float tensors cast to {dtype}: largest change {worst_cast[0]:.3g} ({worst_cast[1]})")
        size = sum((tmp / n).stat().st_size for n in names)
        params = sum(math.prod(o.planned[0].shape) * (32 // o.quant.bits if o.quant else 1) for o in outs)
        report = {
            "source": str(src.path),
            "output": str(out_dir),
            "model_type": cfg.get("model_type"),
            "dtype": dtype,
            "quantization": config.get("quantization"),
            "formats": dict(formats),
            "max_bias_bound": worst_bias[0],
            "max_float_cast_change": worst_cast[0],
            "notes": notes,
            "files": names,
            "bytes": size,
            "bits_per_weight": round(8 * size / params, 3) if params else 0.0,  # embeddings and norms included
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "mlx-report.json").write_text(json.dumps(report, indent=2))
    return report


__all__ = ["export_mlx", "to_mlx", "mlx_quant", "bias_bound", "mlx_config"]
