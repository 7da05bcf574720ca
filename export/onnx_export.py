"""``dsq export --to onnx``: a dsq quantized checkpoint (or a plain HF directory) -> an ONNX decoder folder.

Output: ``model.onnx`` (+ ``model.onnx.data`` when the weights pass 2 GB, the protobuf limit), the tokenizer
files and ``genai_config.json`` for onnxruntime-genai. Weights stream in one at a time and are re-packed,
never re-rounded: dsq's int4/int8 codes and scales go into ``MatMulNBits`` as they are (see onnx_weights).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx

from ..dsquant.atomic import atomic_dir
from ..dsquant.checkpoint import SIDE_FILES
from ..dsquant.errors import InputError, UnsupportedError
from ..dsquant.formats import FORMATS, QuantizedTensor
from ..dsquant.paths import resolve_model_file
from ..dsquant.recipes import load_recipe
from ..dsquant.schema import load_config
from ..dsquant.source import Source
from .onnx_genai import genai_config
from .onnx_graph import arch_spec, attention_kind, build_decoder
from .onnx_guard import check_model_dir
from .onnx_weights import DATA_NAME, InitializerSink, PackedWeight, WeightTable

MODEL_NAME = "model.onnx"
PROTOBUF_LIMIT = 2 * 1024**3
# --int4-block: the blocks of dsq's 4-bit integer formats (each is a MatMulNBits block_size as it is)
INT4_BLOCKS = tuple(sorted({f.block_cols for f in FORMATS.values() if f.packing == "int" and f.bits == 4 and f.block_cols}))

# Execution provider -> the MatMulNBits bit widths it has kernels for (onnxruntime's contrib op registry:
# CPU and CUDA register 4 and 8 bits; DirectML 4 bits; CoreML has no com.microsoft kernels, so a
# quantized graph would fall back to CPU node by node: refused, export with float weights instead).
EP_NBITS: dict[str, tuple[int, ...]] = {"cpu": (4, 8), "cuda": (4, 8), "dml": (4,), "coreml": ()}
# Default MatMulNBits accuracy_level per EP. On CPU, 4 quantizes activations to int8 per block inside the kernel:
# measured 2.5x faster int4 decode and ~35x faster int8 at M=1 than level 0 (exact float math), for a KL change of
# < 1% (bench/onnx_bench.py, bench/onnx_int8_bench.py). Pass accuracy_level=0 for bit-faithful float compute.
DEFAULT_ACCURACY: dict[str, int] = {"cpu": 4, "cuda": 0, "dml": 0, "coreml": 0}
# EPs with kernels for the contrib ops the fused graph uses (GroupQueryAttention, SkipSimplifiedLayerNormalization,
# onnxruntime's contrib op registry). CoreML runs no com.microsoft op: --attention auto gives it the plain graph.
EP_CONTRIB: dict[str, bool] = {"cpu": True, "cuda": True, "dml": True, "coreml": False}


def _source_weights(src: Path, cfg: dict, recipe: str | None, int4_block: int | None) -> Iterator[tuple]:
    """(name, QuantizedTensor | tensor, kind) from a quantized checkpoint as stored, or from an HF checkpoint
    quantized by ``recipe`` as ``dsq quantize`` does (``dsquant/source.py``; float when no recipe)."""
    stored = bool(cfg.get("quantization_config")) and recipe is None  # values as stored, never re-rounded
    rec = None
    if not stored and (recipe is not None or int4_block is not None):
        rec = load_recipe(recipe or "int4")
        if int4_block is not None:
            rec = _with_int4_block(rec, int4_block)
    s = Source(src, rec)  # a recipe on a quantized checkpoint (block-FP8 aside) is refused here
    for name, t in s.iter_weights():
        stored_block = t.fmt.block_cols if stored and isinstance(t, QuantizedTensor) and _is_int4(t.fmt) else None
        if int4_block and stored_block and stored_block != int4_block:
            raise UnsupportedError(
                f"{name}: stored as {t.format}; --int4-block {int4_block} would re-round dsq's values. "
                f"Drop the flag, or re-quantize with a g{int4_block} recipe"
            )
        yield name, t, s.entries[name].kind


def _is_int4(fmt) -> bool:
    return fmt.packing == "int" and fmt.bits == 4


def _with_int4_block(rec, block: int):
    """``rec`` with each 4-bit integer format it names in blocks of ``block`` (sym/asym kept)."""
    return rec.map_formats(lambda name: FORMATS[name].regrouped(block).name if _is_int4(FORMATS[name]) else name)


def _skip(name: str, cfg: dict) -> bool:
    """DeepSeek-V3's multi-token-prediction layer (index num_hidden_layers) is not part of the decoder."""
    parts = name.split(".")
    return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= cfg["num_hidden_layers"]


# The matrices an export may quantize itself (recipe roles ``embed`` / ``lm_head``, see Recipe.export_format).
HEAD_ROLES = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head"}


def _recorded_recipe(src: Path):
    """The recipe a dsq checkpoint was quantized with (its dsq-report.json), None when there is no report."""
    from ..dsquant.errors import CorruptFileError
    from ..dsquant.recipes import Recipe

    f = resolve_model_file(src, "dsq-report.json")
    if f is None:
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))["recipe"]
        return Recipe(str(rec["name"]), str(rec["default"]), dict(rec.get("roles") or {}))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CorruptFileError(f"{f}: not a dsq report with a `recipe` entry; remove it or re-quantize") from None


def head_formats(src: Path, cfg: dict, recipe: str | None, embed: str | None, lm_head: str | None) -> dict[str, str]:
    """{role: dsq format} for the embedding and the lm_head the export quantizes (roles absent stay float).

    Explicit ``embed``/``lm_head`` win; otherwise the recipe's ``[roles]`` entries (``--recipe`` for a float
    source, the recipe recorded in a dsq checkpoint's dsq-report.json). ``keep`` means float. A tied model has
    one matrix, so both roles name the same format (giving two different ones is refused). The format must
    pack for MatMulNBits/GatherBlockQuantized (int4_sym, int4_asym, int8 with blocks of 16..., a power of 2).
    Raises UnsupportedError / RecipeError naming the role."""
    from ..dsquant.recipes import KEEP, load_recipe

    asked = {"embed": embed, "lm_head": lm_head}
    rec = load_recipe(recipe) if recipe else _recorded_recipe(src) if cfg.get("quantization_config") else None
    for role, fmt in asked.items():
        if fmt is None and rec is not None:
            asked[role] = rec.export_format(role)
    out = {}
    for role, fmt in asked.items():
        if fmt in (None, KEEP):
            continue
        if fmt not in FORMATS:
            raise UnsupportedError(f"{role} = {fmt!r}: unknown format; use keep or one of {', '.join(FORMATS)}")
        from .onnx_weights import packing_for

        if packing_for(fmt).op != "MatMulNBits":
            raise UnsupportedError(f"{role} = {fmt}: no quantized ONNX lookup/head for it (int4_* or int8_g* only)")
        out[role] = fmt
    if cfg.get("tie_word_embeddings") and out:
        if len(set(out.values())) > 1:
            raise UnsupportedError(
                f"embed = {out['embed']}, lm_head = {out['lm_head']}: tie_word_embeddings makes them one matrix; "
                "give one format (lm_head's decides in llama.cpp's policy too)"
            )
        fmt = next(iter(out.values()))
        out = {"embed": fmt, "lm_head": fmt}
    return out


def _quantize_head(name: str, t, fmt: str):
    """The embedding / lm_head in ``fmt``: quantized here from a float tensor (dsq's own rounding, as
    ``dsq quantize`` would) straight into MatMulNBits bytes, in row slices (``quantize_packed``: the 7B
    152064x3584 matrices are never held as float32 or unpacked codes), or kept when the checkpoint already
    stores it in ``fmt``."""
    from .onnx_weights import quantize_packed

    if isinstance(t, QuantizedTensor):
        if t.format != fmt:
            raise UnsupportedError(f"{name}: stored as {t.format}; {HEAD_ROLES[name]} = {fmt} would re-round "
                                   "dsq's values. Ask for its stored format, or re-quantize")
        return t
    block = FORMATS[fmt].block_cols or t.shape[1]
    if block < 16 or block & (block - 1) or t.shape[1] % block:
        raise UnsupportedError(f"{name}: {fmt} on rows of {t.shape[1]} has no GatherBlockQuantized/MatMulNBits block "
                               "(a power of two >= 16 dividing the row); pick int4_*_g32 or int8_g32")
    return quantize_packed(fmt, t, name)


def check_ep(ep: str, lin) -> None:
    """Refuse (at export, at the first such weight) a MatMulNBits width the EP has no kernel for."""
    if lin is not None and lin.packed is not None and lin.packed.bits not in EP_NBITS[ep]:
        have = ", ".join(f"{b}-bit" for b in EP_NBITS[ep]) or "no"
        raise UnsupportedError(
            f"--ep {ep}: {lin.name} is {lin.format} (MatMulNBits bits={lin.packed.bits}) and {ep} has {have} "
            "MatMulNBits kernels; export for another EP or from an unquantized checkpoint"
        )


def export_onnx(
    src: str | Path,
    out_dir: str | Path,
    *,
    int4_block: int | None = None,
    ep: str = "cpu",
    overwrite: bool = False,
    recipe: str | None = None,
    accuracy_level: int | None = None,
    attention: str = "auto",
    embed: str | None = None,
    lm_head: str | None = None,
    precision: str = "fp32",
    external_threshold: int = PROTOBUF_LIMIT,
    progress=None,
) -> dict:
    """Export ``src`` to an ONNX folder at ``out_dir``; returns the report (also written as onnx-report.json).

    ``src``: a dsq quantized checkpoint (int formats go into ``com.microsoft::MatMulNBits`` unchanged, FP8 is
    dequantized to float32) or a float HF checkpoint, optionally quantized first by ``recipe`` exactly as
    ``dsq quantize -r recipe`` would; ``int4_block`` (``INT4_BLOCKS``) picks the group of a float source's int4
    formats and must match a quantized source's. ``out_dir`` gets model.onnx (inputs ``input_ids``,
    ``attention_mask``, ``position_ids`` [batch, seq] int64 and float32 ``past_key_values.{i}.key/value``
    [batch, kv_heads, past, head_dim]; outputs ``logits`` [batch, seq, vocab] float32 and ``present.*``),
    model.onnx.data when the model reaches ``external_threshold`` bytes (protobuf's 2 GiB), the tokenizer
    files and genai_config.json. ``ep``: the execution provider to target (``EP_NBITS``);
    ``accuracy_level``: MatMulNBits' 0-4 (None: the EP's default); ``attention``: plain, contrib or auto.

    ``embed`` / ``lm_head``: dsq formats for the embedding and output matrix (see :func:`head_formats`);
    by default the recipe's roles decide, and without any they stay float32. The presets keep lm_head 16-bit, so
    the default ONNX holds the values the default GGUF export writes (token_embd / output in 16 bits): the two
    default exports are one model. A quantized head is a choice: int4_sym_g32 / int8_g32 are GGUF Q4_0 / Q8_0. ``precision``: fp32, or fp16
    activations and cache for GPU EPs (:func:`to_fp16`; it runs on CPU too, slower).

    Raises UnsupportedError for an unknown EP, precision, accuracy level, int4 block, architecture or attention, a
    MatMulNBits width the EP lacks, or an ``int4_block`` that would re-round stored values; InputError for a
    missing config.json or ``recipe`` on a quantized source; OutputError when ``out_dir`` exists (without
    ``overwrite``). Written atomically: on any error nothing is left."""
    t0 = time.time()
    if precision not in PRECISIONS:
        raise UnsupportedError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if ep not in EP_NBITS:
        raise UnsupportedError(f"--ep {ep}: unknown execution provider; choose one of {', '.join(EP_NBITS)}")
    if accuracy_level is None:
        accuracy_level = DEFAULT_ACCURACY[ep]
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UnsupportedError(f"accuracy_level {accuracy_level}: MatMulNBits takes 0-4")
    if int4_block is not None and int4_block not in INT4_BLOCKS:
        raise UnsupportedError(f"--int4-block {int4_block}: choose one of {', '.join(map(str, INT4_BLOCKS))}")
    src = Path(src)
    cfg_file = resolve_model_file(src, "config.json")
    if cfg_file is None:
        raise InputError(f"{src}: no config.json; give a dsq output or Hugging Face model directory")
    cfg = load_config(cfg_file, src / "config.json")  # types and ranges: before any graph is sized from them
    # Side files must resolve inside the folder; checked before any work, copied from the checked paths.
    side_files = {name: f for name in SIDE_FILES if (f := resolve_model_file(src, name)) is not None}
    if not EP_CONTRIB[ep]:
        if attention == "contrib":
            raise UnsupportedError(f"--attention contrib: {ep} has no com.microsoft kernels; use plain (or auto)")
        attention = "plain"
    attention_kind(cfg, attention)  # unsupported architecture / attention: fail before reading any weight
    heads = head_formats(src, cfg, recipe, embed, lm_head)

    with atomic_dir(out_dir, overwrite) as tmp:
        weights = WeightTable(InitializerSink(tmp), accuracy_level=accuracy_level)
        try:
            formats: Counter[str] = Counter()
            for i, (name, t, kind) in enumerate(_source_weights(src, cfg, recipe, int4_block)):
                if progress:
                    progress(i + 1, 0, f"weights: {name}")
                if _skip(name, cfg):
                    continue
                if name in HEAD_ROLES and HEAD_ROLES[name] in heads:
                    t = _quantize_head(name, t, heads[HEAD_ROLES[name]])
                formats[t.format if isinstance(t, QuantizedTensor | PackedWeight) else "float:" + str(t.dtype).removeprefix("torch.")] += 1
                weights.ingest(name, t, kind)
                check_ep(ep, weights.linears.get(name))
                if name == "model.embed_tokens.weight" and cfg.get("tie_word_embeddings"):
                    weights.tie("lm_head.weight", name)
            if progress:
                progress(i + 1, 0, "building the graph")
            model = build_decoder(cfg, weights, attention)
        finally:
            weights.sink.close()  # also on failure: the temp dir is then removed
        if progress:
            progress(i + 1, 0, f"writing {MODEL_NAME} and checking it")
        if precision == "fp16":
            model = to_fp16(model, tmp)
        _save(model, tmp, -1 if precision == "fp16" else weights.sink.external_bytes, external_threshold)
        onnx.checker.check_model(str(tmp / MODEL_NAME))
        for name, f in side_files.items():
            shutil.copy2(f, tmp / name)
        share = attention_kind(cfg, attention) == "gqa_contrib"
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(cfg, src, ep, share), indent=2))
        from .onnx_genai import write_tokenizer_files

        tok_notes = write_tokenizer_files(src, tmp)  # after the side files are copied: it rewrites some of them
        report = {
            "source": str(src),
            "model_type": cfg["model_type"],
            "ep": ep,
            "attention": attention,
            "attention_impl": attention_kind(cfg, attention),
            "accuracy_level": accuracy_level,
            "precision": precision,
            "heads": heads,
            "formats": dict(formats),
            "matmulnbits": sorted({f"{lin.format}->bits{lin.packed.bits}" for lin in weights.linears.values() if lin.packed}),
            "notes": sorted(weights.notes) + tok_notes,
            "float32": _float_summary(weights, cfg),
            "external_data": (tmp / DATA_NAME).exists(),
            "bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(MODEL_NAME)),
            "kv_cache_bytes_per_token_fp32": kv_bytes_per_token(cfg),
            "kv_cache_bytes_per_token": kv_bytes_per_token(cfg) // (2 if precision == "fp16" else 1),
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "onnx-report.json").write_text(json.dumps(report, indent=2))
    return report


def _float_summary(weights: WeightTable, cfg: dict) -> list[dict]:
    """What stayed float32 in the graph, grouped by why, largest first (the export summary prints it)."""
    tied = cfg.get("tie_word_embeddings") and "lm_head.weight" in weights.linears
    groups: dict[str, dict] = {}
    for name, (why, nbytes) in weights.float_bytes.items():
        if why == "embedding" and tied and name == "model.embed_tokens.weight":
            why = "embedding, shared with the tied lm_head"
        g = groups.setdefault(why, {"why": why, "tensors": 0, "bytes": 0, "example": name})
        g["tensors"] += 1
        g["bytes"] += nbytes
    return sorted(groups.values(), key=lambda g: -g["bytes"])


PRECISIONS = ("fp32", "fp16")


def to_fp16(model: onnx.ModelProto, out: Path) -> onnx.ModelProto:
    """The graph with fp16 activations, KV cache, logits and float weights (onnxruntime's own converter,
    ``onnxruntime.transformers.float16``, which keeps ops without fp16 kernels in fp32 behind Casts).

    What changes in value: dsq's scales are fp16 already (MatMulNBits/GatherBlockQuantized/DequantizeLinear
    scales convert exactly); bf16 norm/bias weights are exact unless outside fp16's range (then clipped to
    +-65504, or flushed below 2^-24 by the converter); float (unquantized or fp8-dequantized) matrices and the
    RoPE caches round to fp16. The external-data file is read in and replaced (the converter needs the data)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    onnx.external_data_helper.load_external_data_for_model(model, str(out))
    if (out / DATA_NAME).exists():
        (out / DATA_NAME).unlink()
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True,
                                     op_block_list=DEFAULT_OP_BLOCK_LIST)
    # ScatterND with reduction=add (the MoE combine) has no fp16 CPU kernel: it runs in fp32 between Casts (the
    # converter's own block list needs value types the contrib ops leave unknown, so the Casts are put here).
    nodes = []
    for n in model.graph.node:
        reduction = next((a.s for a in n.attribute if a.name == "reduction"), b"none")
        if n.op_type != "ScatterND" or reduction != b"add":
            nodes.append(n)
            continue
        for j in (0, 2):
            nodes.append(onnx.helper.make_node("Cast", [n.input[j]], [f"{n.name}_in{j}_fp32"], to=onnx.TensorProto.FLOAT))
            n.input[j] = f"{n.name}_in{j}_fp32"
        out16 = n.output[0]
        n.output[0] = f"{n.name}_out_fp32"
        nodes += [n, onnx.helper.make_node("Cast", [n.output[0]], [out16], to=onnx.TensorProto.FLOAT16)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _save(model: onnx.ModelProto, out: Path, external_bytes: int, threshold: int) -> None:
    """Keep external data only when the model would pass the protobuf limit; otherwise inline it.
    ``external_bytes`` < 0: the weights are in memory (fp16 conversion); written external past the limit."""
    if external_bytes < 0:
        if model.ByteSize() >= threshold:
            onnx.save_model(model, str(out / MODEL_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_NAME, size_threshold=1024)
        else:
            onnx.save_model(model, str(out / MODEL_NAME))
        return
    if external_bytes and external_bytes + model.ByteSize() < threshold:
        onnx.external_data_helper.load_external_data_for_model(model, str(out))
        (out / DATA_NAME).unlink()
    onnx.save_model(model, str(out / MODEL_NAME))


def kv_bytes_per_token(cfg: dict) -> int:
    """KV-cache bytes one token adds across all layers (float32 cache), from the graph's cache shapes."""
    from .onnx_graph import ATTENTION

    key, value = ATTENTION[arch_spec(cfg).attention][1](cfg)
    return 4 * cfg["num_hidden_layers"] * (key[1] * key[3] + value[1] * value[3])


def load_session(model_dir: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",), opt_all: bool = True):
    """An onnxruntime session for an exported folder, after ``check_model_dir``."""
    import onnxruntime as ort

    path = check_model_dir(model_dir)
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if opt_all else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), so, providers=list(providers))


__all__ = ["export_onnx", "check_model_dir", "load_session", "kv_bytes_per_token"]
