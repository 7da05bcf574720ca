"""``dsq export --to gguf``: a checkpoint -> one GGUF file llama.cpp runs, written tensor by tensor.

Choosing a GGUF type per tensor (``choose_type``):

* norms, biases, the MoE router and its bias: F32 (what llama.cpp's converter writes for them);
* a dsq-quantized weight: its exact twin (int4_sym_g* -> Q4_0, int4_asym_g* -> Q4_1, int8_g*/channel ->
  Q8_0; blocks of 64/128 become 2/4 blocks of 32 that repeat the scale), codes and scales carried over;
  FP8 goes to the nearest type (``nearest_type``) and is re-quantized, with the added error in the report;
* a float weight: its own float type. ``recipe`` quantizes a float checkpoint first, through the plan and
  quantizer ``dsq quantize`` uses (``dsquant/source.py``): the file is the one ``dsq quantize -r RECIPE``
  followed by an export writes, its tensors chosen as for any dsq-quantized weight;
* ``type`` (``--type``) names a llama.cpp file type (q4_0, q5_1, q4_k_m, q6_k, ...; ``q4_k`` is llama-quantize's
  alias for Q4_K_M): every tensor gets the type llama.cpp's ``llama_model_quantize`` gives it in that file
  (gguf_policy.py: output matrix Q6_K/Q8_0, attn_v/ffn_down bumps, fallbacks for rows that are not whole
  blocks). A tensor whose dsq format is that type's twin is carried exactly; any other quantized tensor is
  re-quantized from its dequantized values (status "requantized" in the report). ``pure`` puts the
  default type everywhere (llama-quantize --pure). f16/bf16/f32 cast every 2-D weight but the router.

The header (metadata + tensor table) is computed from shapes alone, then each tensor is loaded,
packed, written and dropped: peak memory is about the largest tensor (a layer's stacked experts).
The file appears atomically: written under a temporary name, renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter

from dsq.dsquant.archs import ROLE_INFO
from dsq.dsquant.atomic import check_output, make_partial_dir
from dsq.dsquant.direct_io import DirectWriter
from dsq.dsquant.errors import InputError, OutputError, UnsupportedError
from dsq.dsquant.formats import QuantizedTensor, StreamPool
from dsq.dsquant.source import Source

from .gguf_meta import add_hparams
from .gguf_policy import TYPE_NAMES, Mix, ModelFacts, get_mix, plan_types
from .gguf_quants import FLOAT_OF, GGUF_TYPES, GGUFType, encode, get_type, is_exact, nbytes, nearest_type
from .gguf_tensors import OutTensor, build_value, plan_tensors
from .gguf_tokenizer import add_tokenizer

F32_KINDS = ("norm", "bias", "router")


def choose_type(t: OutTensor, forced: GGUFType | None) -> tuple[GGUFType, list[str]]:
    """The GGUF type of one output tensor, and notes on any fallback."""
    kind = ROLE_INFO[t.role].kind
    notes: list[str] = []
    if kind in F32_KINDS or len(t.shape) == 1:
        return GGUF_TYPES["f32"], notes
    own = GGUF_TYPES[FLOAT_OF.get(t.float_dtype, "f16")]
    formats = t.formats
    if forced is not None:
        chosen = forced
    elif None not in formats:
        # mixed formats in one stacked tensor (experts): the type that loses least, the most bits per weight
        # (a tie: the larger block, i.e. the k-quant, whose sub-block scales fit the values more closely)
        chosen = max({nearest_type(f).name: nearest_type(f) for f in formats}.values(),
                     key=lambda g: (nbytes(g, (g.block,)) / g.block, g.block))
        if t.transform == "k_b" and chosen.name != "q8_0":
            chosen = GGUF_TYPES["q8_0"]
            notes.append("kv_b transposed into k_b: blocks run along a new axis, re-quantized to Q8_0")
    else:
        chosen = own
    if chosen.quantized and not chosen.fits(t.shape):
        # llama.cpp's fallback for rows that are not whole super-blocks is Q8_0; rows not whole blocks of 32: F16
        fallback = GGUF_TYPES["q8_0"] if GGUF_TYPES["q8_0"].fits(t.shape) else GGUF_TYPES["f16"]
        notes.append(f"rows of {t.shape[-1]} are not whole blocks of {chosen.block}: "
                     f"{chosen.name.upper()} -> {fallback.name.upper()}")
        chosen = fallback
    return chosen, notes


_BY_GGML = {t.gtype: t for t in GGUF_TYPES.values()}



def _imatrix_entries(path: str | Path) -> dict:
    from dsq.dsquant.calib.imatrix_file import read_imatrix

    return read_imatrix(path).entries


def _importances(entries: dict, name: str, values: list) -> list[np.ndarray | None]:
    """Per row-block (expert) importance of GGUF tensor ``name`` from the imatrix entries (mean x^2 per column,
    llama-quantize's reading), or Nones when the file has no entry for it (llama-quantize then quantizes it
    without one too)."""
    entry = entries.get(name)
    if entry is None:
        return [None] * len(values)
    cols = int(values[0].shape[-1])
    try:
        imp = entry.importance(cols)
    except InputError:
        imp = None
    if imp is None or imp.shape[1] != cols or imp.shape[0] not in (1, len(values)):
        raise InputError(
            f"--imatrix: entry `{name}` has {entry.sums.size} values over {entry.counts.size} matrices, which does not "
            f"fit the tensor ({len(values)} x {cols} input columns); is the imatrix for another model?"
        )
    return [imp[min(i, imp.shape[0] - 1)] for i in range(len(values))]


def policy_types(outs: list[OutTensor], mix: Mix, src: Source, pure: bool = False, imatrix: bool = False) -> dict:
    """{GGUF name: (GGUFType, notes, why)} under llama.cpp's ``mix`` (gguf_policy.plan_types).

    Raises UnsupportedError before anything is written when the policy needs a type dsq has no packer for.
    """
    facts = ModelFacts.from_config(src.arch.gguf_arch, src.config)
    plan = plan_types(mix, [(t.name, tuple(t.shape)) for t in outs], facts, pure=pure, imatrix=imatrix)
    missing = {n: c.type.name for n, c in plan.items() if c.type not in _BY_GGML}
    if missing:
        first = next(iter(missing))
        raise UnsupportedError(
            f"--type {mix.name.lower()}: llama.cpp's {mix.name} file puts {len(missing)} tensor(s) of this model in "
            f"{', '.join(sorted(set(missing.values())))} (e.g. {first}), which dsq cannot write yet; "
            f"choose one of {', '.join(TYPE_NAMES)}"
        )
    out = {}
    for t in outs:
        c = plan.get(t.name)
        if c is None:  # norms, biases, the router, 1-D tensors: F32, as llama.cpp's converter writes them
            out[t.name] = (GGUF_TYPES["f32"], [], "not quantized by llama.cpp")
        else:
            notes = [c.why.split("; ", 1)[1]] if "; rows of" in c.why else []
            out[t.name] = (_BY_GGML[c.type], notes, c.why)
    return out


def _status(values: list, t: GGUFType) -> str:
    if all(isinstance(v, QuantizedTensor) for v in values):
        return "exact" if all(is_exact(v, t) for v in values) else "requantized"
    return "quantized" if t.quantized else "cast"


def _rel_error(stats: list[tuple[float, float] | None]) -> float:
    """Relative RMS change over all row-blocks of a tensor (sums from ``encode``)."""
    change = sum(st[0] for st in stats if st)
    norm = sum(st[1] for st in stats if st)
    return (change / norm) ** 0.5 if norm else 0.0


def export_gguf(
    src_dir: str | Path,
    out_path: str | Path,
    type: str = "auto",  # noqa: A002 - the CLI flag's name
    recipe: str | None = None,
    overwrite: bool = False,
    split_max_size: int | str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    pure: bool = False,
    imatrix: str | Path | None = None,
    target_size: int | str | None = None,
    target_bpw: float | None = None,
    calib: str | None = None,
    types: dict[str, str] | None = None,
) -> dict:
    """Write ``src_dir`` as a GGUF file at ``out_path``; returns a report dict.

    ``src_dir``: a dsq (or other tool's) quantized checkpoint, or a float HF checkpoint; ``recipe`` quantizes
    a float one first, exactly as ``dsq quantize -r recipe`` would (``dsquant.source.Source``).
    ``type``: "auto", a llama.cpp file type name (``TYPE_NAMES``; its per-tensor policy applies) or a float type;
    ``pure``: that type everywhere. ``split_max_size``: bytes (or "500M"/"2G", decimal units) per shard,
    named as llama.cpp's gguf-split does. Tensors are in GGUF's order and shapes (ggml's ne reversed:
    [experts, rows, cols]); the report lists per tensor its GGUF type, shape, status (exact: dsq's codes and
    scales carried; requantized/quantized: re-rounded, with ``rel_error`` = relative RMS change; cast) and
    bytes, plus totals, bits per weight (file bytes * 8 / parameters) and seconds.

    Raises UnsupportedError for an unknown type, one whose policy needs a type dsq cannot pack, an architecture
    or tensor with no GGUF name, rows a type cannot hold, or a tokenizer llama.cpp cannot take; InputError for
    ``recipe`` on a quantized source, ``pure`` without a quantized type or a bad ``split_max_size``; OutputError when ``out_path``
    exists (without ``overwrite``) or cannot be written (nothing is left behind).

    ``imatrix``: a llama.cpp imatrix file (GGUF or legacy .dat); every tensor it has an entry for is re-rounded
    on ggml's imatrix path (bytes as ``llama-quantize --imatrix`` writes them) and the policy's imatrix rule
    applies. Raises InputError when an entry does not fit its tensor.

    ``target_size`` (bytes or "105MB") / ``target_bpw``: choose each weight's type so the file is at most that
    big with the least predicted KL divergence (gguf_budget.py; calibrated on ``calib``, default "mixed"); the
    report gets a "budget" section. ``types``: {GGUF tensor name: type name}, given per tensor (what the budget
    search chose, or any caller's plan); tensors not named get the default choice. Without ``type``, ``recipe``
    and ``types``, a ``dsq-gguf-types.json`` that ``dsq quantize --target-size`` left in ``src_dir`` gives them.
    InputError for a budget flag combined with --type/--recipe/--pure/--split-max-size or a budget too small.
    """
    t0 = time.perf_counter()
    out_path = Path(out_path)
    src = Source(src_dir, recipe)  # a recipe: quantized as `dsq quantize` does, one tensor at a time
    mix = None if type in ("auto", *FLOAT_OF.values()) else get_mix(type)
    forced = None if type == "auto" or mix is not None else get_type(type)
    if pure and mix is None:
        raise InputError("--pure applies to a quantized --type (q4_0, q4_k_m, ...): it puts that type everywhere")
    outs, notes = plan_tensors(src)
    entries = _imatrix_entries(imatrix) if imatrix is not None else None
    budget = None
    if target_size is not None or target_bpw is not None:
        from .gguf_budget import plan_budget, resolve_target

        flag = "--target-size" if target_size is not None else "--target-bpw"
        if type != "auto" or recipe is not None or pure or types is not None:
            raise InputError(f"{flag} chooses every tensor's type itself: leave out --type, --recipe and --pure")
        if split_max_size:
            raise InputError(f"{flag} sizes one file: leave out --split-max-size")
        target, flag = resolve_target(target_size, target_bpw, outs)
        check_output(out_path, overwrite)  # before the calibration, not after
        types, budget = plan_budget(src, outs, target, flag, calib=calib or "mixed",
                                    log=(lambda m: progress(0, len(outs), m)) if progress else None)
    elif calib is not None:
        raise InputError("--calib applies to --target-size/--target-bpw (the size-budget search)")
    elif type == "auto" and recipe is None and not pure and types is None:
        from .gguf_budget import read_record

        record = read_record(src.path)  # what `dsq quantize --target-size` chose
        if record is not None:  # or --gguf-type: llama.cpp's policy types, no budget
            types = record["types"]
            budget = {**record["budget"], "recorded": True} if record.get("budget") else None
    if mix is not None:
        chosen = policy_types(outs, mix, src, pure, imatrix=entries is not None)
    else:
        chosen = {t.name: (*choose_type(t, forced), None) for t in outs}
    if types is not None:
        known = {t.name: t for t in outs}
        for name, tname in types.items():
            if name not in known:
                raise InputError(f"types: {name} is not a tensor of this GGUF file")
            gt = get_type(tname)
            if not gt.fits(known[name].shape):
                raise InputError(f"types: {name} has rows of {known[name].shape[-1]}, not whole blocks of "
                                 f"{gt.block} that {tname.upper()} needs")
            chosen[name] = (gt, [], "size budget" if budget else "given")
    split = parse_size(split_max_size) if split_max_size else 0
    check_output(out_path, overwrite)

    # Everything is written into a temporary directory beside the output, then renamed into place
    # (one file, or the shards of a split: <stem>-0000i-of-0000n.gguf, llama.cpp's gguf-split names).
    tmp_dir = make_partial_dir(out_path)  # removes what a killed earlier run on out_path left
    rows: list[dict] = []
    stack = contextlib.ExitStack()
    try:
        w, extra, tok = _write_header(tmp_dir / out_path.name, src, outs, chosen, mix, split)
        sink = _DirectSink(w, tmp_dir / out_path.name) if len(w.fout) == 1 else None
        stack.callback(sink.abort if sink else lambda: None)
        for _, arr in extra:
            (sink.write if sink else w.write_tensor_data)(arr)
        pool = stack.enter_context(StreamPool())  # chunk workers; torch single-threaded meanwhile
        for i, t in enumerate(outs):
            gt, tnotes, why = chosen[t.name]
            values = build_value(t, src)
            imps = _importances(entries, t.name, values) if entries is not None and gt.quantized else [None] * len(values)
            # Encoded a row block at a time: straight into the file when it is written here (the output of a
            # 545M-weight output matrix is never held whole), else gathered for gguf-py's writer (splits).
            status = _status(values, gt)
            stats, held, written = [], [], 0
            if sink is not None:
                sink.begin()
            for v, imp in zip(values, imps, strict=True):
                for piece in _row_blocks(v, sink is not None):
                    data, st = encode(piece, gt, t.name, pool, imp)
                    stats.append(st)
                    written += data.nbytes
                    if sink is not None:
                        sink.piece(data)
                    else:
                        held.append(data)
                    del data
            # What the reader itself re-rounded (GPTQ act-order blocks, dsquant/foreign.py) counts as requantized.
            read = [r for s in t.sources if (r := src.rerounded.get(s.name.removesuffix(".weight")))]
            if read:
                status = "requantized"
                stats += [(r["change"], r["norm"]) for r in read]
                tnotes = [*tnotes, f"GPTQ act-order: {sum(r['blocks'] for r in read)} of {sum(r['of'] for r in read)} "
                                   "column blocks of 32 mix groups and were re-rounded on reading"]
            err = _rel_error(stats)
            if written != nbytes(gt, t.shape):
                raise AssertionError(f"{t.name}: {written} bytes encoded, the tensor table says {nbytes(gt, t.shape)}")
            if sink is not None:
                sink.end(written)
            else:
                w.write_tensor_data(np.concatenate(held) if len(held) > 1 else held[0])
            rows.append({"name": t.name, "type": gt.name, "shape": list(t.shape), "status": status,
                         "rel_error": err, "bytes": int(written), "notes": tnotes,
                         **({"policy": why} if why else {}),
                         "sources": [s.name for s in t.sources][:1] + ([f"+{len(t.sources) - 1}"] if len(t.sources) > 1 else [])})
            del values, held
            if progress:
                progress(i + 1, len(outs), t.name)
        shards = w.format_shard_names(tmp_dir / out_path.name)
        w.close()
        if sink is not None:
            sink.close()
        finals = [out_path.with_name(p.name) for p in shards]
        if len(finals) > 1:  # a split writes other names than out_path: check them too
            for final in finals:
                check_output(final, overwrite)
        for shard, final in zip(shards, finals, strict=True):
            os.replace(shard, final)
    except OSError as e:  # numpy's tofile reports a short write without errno: name the output instead
        if e.errno not in (None, errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise OutputError(
            f"{out_path}: cannot write ({e.strerror or e}); is the disk full? Nothing was written"
        ) from None
    finally:
        stack.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    report = _report(src, finals, type, recipe, rows, notes, tok, time.perf_counter() - t0, mix)
    if budget is not None:
        report["budget"] = budget
        if budget.get("recorded"):
            report["notes"].append(f"tensor types from {src.path.name}/dsq-gguf-types.json (dsq quantize "
                                   f"{budget['flag']}): file {report['bytes']} bytes, target {budget['target_bytes']}")
        elif report["bytes"] != budget["predicted_bytes"]:  # the layout is computed exactly; say so if it ever is not
            report["notes"].append(f"size budget: the file has {report['bytes']} bytes, the search counted "
                                   f"{budget['predicted_bytes']}")
    return report


class _DirectSink:
    """The tensor data of a single-file GGUF, written with O_DIRECT (dsquant/direct_io.py) after gguf-py has
    written the header, metadata and tensor table: the same bytes and padding as ``GGUFWriter.write_tensor_data``
    (each tensor starts on ``data_alignment`` and is padded to it), without the page-cache copy of every byte."""

    def __init__(self, w: GGUFWriter, path: Path) -> None:
        fout = w.fout[0]
        fout.flush()
        head = fout.tell()
        fout.close()
        w.fout = None  # gguf-py's close() has nothing left to do
        with open(path, "rb") as f:
            header = f.read(head)
        self.align = w.data_alignment
        self.f = DirectWriter(path)  # rewrites the file: header, then the data as it comes
        self.f.write(header)

    def _pad(self, n: int) -> None:
        if n % self.align:
            self.f.write(bytes(self.align - n % self.align))

    def begin(self) -> None:
        """A tensor's data starts: on the alignment."""
        self._pad(self.f.tell())

    def piece(self, arr: np.ndarray) -> None:
        """The next bytes of the current tensor."""
        self.f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))

    def end(self, nbytes: int) -> None:
        """The tensor had ``nbytes``: padded to the alignment, as gguf-py pads it."""
        self._pad(nbytes)

    def write(self, arr: np.ndarray) -> None:
        self.begin()
        self.piece(arr)
        self.end(arr.nbytes)

    def close(self) -> None:
        self.f.close()

    def abort(self) -> None:
        self.f.abort()


STREAM_ELEMENTS = 1 << 25  # weights per encode call when the bytes go straight to the file


def _row_blocks(v: QuantizedTensor | torch.Tensor, stream: bool) -> list:
    """``v`` as row blocks of about ``STREAM_ELEMENTS`` weights (on 128-row boundaries, whole blocks of every
    dsq format), or whole when not streaming or small. Quantizing is row-local, so the bytes are the same."""
    shape = tuple(v.shape)
    if not stream or len(shape) != 2 or shape[0] * shape[1] <= STREAM_ELEMENTS:
        return [v]
    step = max(128, STREAM_ELEMENTS // shape[1] // 128 * 128)
    if isinstance(v, QuantizedTensor):
        return [v.rows(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]
    return [v[r:r + step] for r in range(0, shape[0], step)]


def _write_header(path: Path, src: Source, outs: list[OutTensor], chosen: dict, mix: Mix | None,
                  split: int = 0) -> tuple[GGUFWriter, list, dict]:
    """Open a GGUFWriter at ``path`` and write metadata and the tensor table; -> (writer, extra tensors, tokenizer
    report). The extra tensors (rope factors, ...) are written next, then ``outs`` in order."""
    w = GGUFWriter(path, src.arch.gguf_arch, split_max_size=split)
    w.add_name(src.path.name)
    w.add_quantization_version(GGML_QUANT_VERSION)
    extra = add_hparams(w, src.config, src.arch.gguf_arch)
    tok = add_tokenizer(w, src.path, int(src.config["vocab_size"]))
    w.add_file_type(int(mix.file_type) if mix is not None else _file_type(outs, chosen))
    for name, arr in extra:
        w.add_tensor_info(name, arr.shape, np.dtype(np.float32), arr.nbytes, raw_dtype=GGMLQuantizationType.F32)
    for t in outs:
        gt = chosen[t.name][0]
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(gt, t.shape), raw_dtype=gt.gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, extra, tok


ALIGNMENT = 32  # gguf-py's default data alignment: every tensor's data starts (and the file ends) on it


def padded(n: int) -> int:
    """Bytes a tensor of ``n`` data bytes takes in the file (gguf-py pads each to ``ALIGNMENT``)."""
    return -(-n // ALIGNMENT) * ALIGNMENT


def file_overhead(src: Source, outs: list[OutTensor]) -> int:
    """Bytes of a single-file GGUF of ``src`` that are not ``outs``' data: header, metadata, tokenizer, tensor
    table, padding, and the extra tensors (rope factors). The table's size does not depend on the tensor types
    (fixed-width fields), so the file is exactly this plus ``padded(nbytes(type, shape))`` per tensor: what the
    size-budget search (export/gguf_budget.py) spends its bytes against."""
    placeholder = {t.name: (GGUF_TYPES["f32"], [], None) for t in outs}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "header.gguf"
        w, extra, _ = _write_header(path, src, outs, placeholder, None)
        w.close()
        size = padded(path.stat().st_size)
    return size + sum(padded(arr.nbytes) for _, arr in extra)


_UNITS = {"K": 1000, "M": 1000**2, "G": 1000**3}


def parse_size(value: int | str) -> int:
    """Bytes from 123, "500M", "2G" (llama.cpp's --split-max-size spelling, decimal units)."""
    text = str(value).strip().upper()
    try:
        n = int(text[:-1]) * _UNITS[text[-1]] if text and text[-1] in _UNITS else int(text)
    except ValueError:
        n = -1
    if n <= 0:
        raise InputError(f"--split-max-size {value}: expected a positive size like 500M or 2G")
    return n


def _file_type(outs: list[OutTensor], chosen: dict) -> int:
    """general.file_type: the type holding most weights among the linear ones (llama.cpp's 'mostly X')."""
    weight: dict[str, int] = {}
    for t in outs:
        if ROLE_INFO[t.role].kind == "linear":
            gt = chosen[t.name][0]
            weight[gt.name] = weight.get(gt.name, 0) + int(np.prod(t.shape))
    return int(GGUF_TYPES[max(weight, key=weight.get)].file_type) if weight else int(GGUF_TYPES["f32"].file_type)


def _report(src: Source, files: list[Path], type_: str, recipe, rows, notes, tok, seconds: float,
            mix: Mix | None = None) -> dict:
    total = sum(f.stat().st_size for f in files)
    params = sum(int(np.prod(r["shape"])) for r in rows)
    requant = [r for r in rows if r["status"] == "requantized"]
    by_type: dict[str, int] = {}
    for r in rows:
        by_type[r["type"]] = by_type.get(r["type"], 0) + 1
    act = [r for r in requant if any("act-order" in n for n in r["notes"])]
    if act:  # re-rounded by the GPTQ reader (dsquant/foreign.py), not by a type mismatch
        worst = max(act, key=lambda r: r["rel_error"])
        notes = [*notes, f"{len(act)} tensor(s) of a GPTQ act-order checkpoint have groups scattered along the row "
                         "(desc_act g_idx) and were re-rounded into blocks of 32; largest added relative RMS error "
                         f"{worst['rel_error']:.3g} ({worst['name']})"]
    requant_other = [r for r in requant if r not in act]
    if requant_other:
        worst = max(requant_other, key=lambda r: r["rel_error"])
        why = (f"are stored in a dsq format other than the type llama.cpp's {mix.name} gives them"
               if mix is not None else "had no exact GGUF twin")
        notes = [*notes, f"{len(requant_other)} tensor(s) {why} and were re-quantized from their dequantized values; "
                         f"largest added relative RMS error {worst['rel_error']:.3g} ({worst['name']})"]
    if not src.quantized and not any(r["status"] == "quantized" for r in rows):
        notes = [*notes, "source is not quantized and no recipe/--type asked for quantization: weights kept as floats"]
    notes = [*notes, *tok.get("notes", [])]
    return {
        "source": str(src.path),
        "output": str(files[0]),
        "files": [str(f) for f in files],
        "architecture": src.arch.gguf_arch,
        "model_type": src.arch.model_type,
        "type": type_,
        "policy": f"llama.cpp {mix.name}" if mix is not None else None,
        "recipe": recipe,
        "bytes": total,
        "bits_per_weight": 8 * total / params if params else 0.0,
        "types": by_type,
        "exact": sum(r["status"] == "exact" for r in rows),
        "requantized": len(requant),
        "tokenizer": tok,
        "notes": notes,
        "seconds": seconds,
        "tensors": rows,
    }

