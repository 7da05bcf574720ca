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
from .onnx_weights import DATA_NAME, InitializerSink, WeightTable

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
    attention: str = "plain",
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
    ``accuracy_level``: MatMulNBits' 0-4 (None: the EP's default); ``attention``: plain or contrib.

    Raises UnsupportedError for an unknown EP, accuracy level, int4 block, architecture or attention, a
    MatMulNBits width the EP lacks, or an ``int4_block`` that would re-round stored values; InputError for a
    missing config.json or ``recipe`` on a quantized source; OutputError when ``out_dir`` exists (without
    ``overwrite``). Written atomically: on any error nothing is left."""
    t0 = time.time()
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
    attention_kind(cfg, attention)  # unsupported architecture / attention: fail before reading any weight

    with atomic_dir(out_dir, overwrite) as tmp:
        weights = WeightTable(InitializerSink(tmp), accuracy_level=accuracy_level)
        try:
            formats: Counter[str] = Counter()
            for i, (name, t, kind) in enumerate(_source_weights(src, cfg, recipe, int4_block)):
                if progress:
                    progress(i + 1, 0, f"weights: {name}")
                if _skip(name, cfg):
                    continue
                formats[t.format if isinstance(t, QuantizedTensor) else "float:" + str(t.dtype).removeprefix("torch.")] += 1
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
        _save(model, tmp, weights.sink.external_bytes, external_threshold)
        onnx.checker.check_model(str(tmp / MODEL_NAME))
        for name, f in side_files.items():
            shutil.copy2(f, tmp / name)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(cfg, src, ep), indent=2))
        from .onnx_genai import write_tokenizer_files

        tok_notes = write_tokenizer_files(src, tmp)  # after the side files are copied: it rewrites some of them
        report = {
            "source": str(src),
            "model_type": cfg["model_type"],
            "ep": ep,
            "attention": attention,
            "accuracy_level": accuracy_level,
            "formats": dict(formats),
            "matmulnbits": sorted({f"{lin.format}->bits{lin.packed.bits}" for lin in weights.linears.values() if lin.packed}),
            "notes": sorted(weights.notes) + tok_notes,
            "float32": _float_summary(weights, cfg),
            "external_data": (tmp / DATA_NAME).exists(),
            "bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(MODEL_NAME)),
            "kv_cache_bytes_per_token_fp32": kv_bytes_per_token(cfg),
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


def _save(model: onnx.ModelProto, out: Path, external_bytes: int, threshold: int) -> None:
    """Keep external data only when the model would pass the protobuf limit; otherwise inline it."""
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
