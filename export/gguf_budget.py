"""The GGUF side of the size-budget search (``dsq export SRC --to gguf --target-size 105MB`` / ``--target-bpw 4.8``).

For a float checkpoint: every tensor llama.cpp would quantize gets the candidate types ``CANDIDATES`` (with
llama.cpp's fallbacks for rows that are not whole 256-blocks, gguf_policy.FALLBACK: a 576-wide row offers
Q4_0/Q5_0/Q5_1/Q8_0 for Q2_K..Q6_K), each with its exact bytes in the file and a predicted KL from
dsquant/budget.py's Fisher sensitivity times the squared rounding error of dsq's own packers (the ones the
export then uses) on the same sampled rows; the knapsack picks the types; ``export_gguf`` writes them. The
file is exactly ``file_overhead`` + the chosen tensors' padded bytes, so it never exceeds the target.

Covered: 2-D weights read from one source tensor, including llama's permuted q/k (a row permutation does not
change what rounding does to a row) and a tied embedding (also the output matrix). Stacked MoE experts and
MLA's k_b/v_b are not searched: they get ``FIXED`` (Q8_0), said in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsq.dsquant.budget import (
    Option,
    Probe,
    Selection,
    choose,
    fisher_rows,
    human,
    parse_target_size,
    predicted_kl,
    sample_rows,
    target_from_bpw,
)
from dsq.dsquant.errors import InputError, UnsupportedError
from dsq.dsquant.formats import FORMATS
from dsq.dsquant.source import Source

from .gguf_policy import _fit, is_quantizable
from .gguf_quants import GGUF_TYPES, GGUFType, nbytes
from .gguf_tensors import OutTensor

#: The types the search chooses among (before fallbacks), smallest first.
CANDIDATES: tuple[str, ...] = ("q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0")
FIXED = "q8_0"  # tensors the search does not cover
_SEARCHABLE = (None, "permute_q", "permute_k")
_BY_GGML = {t.gtype: t.name for t in GGUF_TYPES.values()}


def candidates(shape: tuple[int, ...], names: tuple[str, ...] = CANDIDATES) -> list[str]:
    """The distinct types a tensor of ``shape`` can take: each of ``names`` after llama.cpp's fallback for rows
    that are not whole blocks (gguf_policy._fit), in the order given."""
    out: list[str] = []
    for n in names:
        t = _BY_GGML[_fit(GGUF_TYPES[n].gtype, shape[-1], "").type]
        if t not in out:
            out.append(t)
    return out


def held(x: torch.Tensor, t: GGUFType, name: str = "<rows>") -> torch.Tensor:
    """The values a GGUF of type ``t`` holds for float rows ``x`` [N, k], as dsq's export packs them."""
    if t.kquant is not None:
        return t.kquant(x)[1]
    if t.twin is not None:
        return FORMATS[t.twin].quantize(x, name).dequantize()
    return x.to(t.torch_dtype).to(torch.float32)


def searchable(t: OutTensor) -> bool:
    return (is_quantizable(t.name, t.shape) and len(t.shape) == 2 and len(t.sources) == 1
            and t.transform in _SEARCHABLE)


def resolve_target(target_size: str | int | None, target_bpw: float | None, outs: list[OutTensor]) -> tuple[int, str]:
    """(target bytes, the flag it came from). Raises InputError when both or neither flag is given."""
    if (target_size is None) == (target_bpw is None):
        raise InputError("give one of --target-size and --target-bpw")
    if target_size is not None:
        return parse_target_size(target_size), "--target-size"
    n = sum(int(torch.tensor(t.shape).prod()) for t in outs)
    return target_from_bpw(target_bpw, n), "--target-bpw"


def plan_budget(src: Source, outs: list[OutTensor], target: int, flag: str, *, calib: str = "mixed",
                samples: int = 8, seqlen: int = 256, rows: int = 64, draws: int = 2, seed: int = 0,
                log: Callable[[str], None] | None = None, keep: dict | None = None) -> tuple[dict[str, str], dict]:
    """Choose a GGUF type per tensor of ``outs`` so the file is at most ``target`` bytes with the least predicted
    KL. -> ({GGUF name: type name} for every weight llama.cpp would quantize, the report's "budget" section).

    ``samples`` x ``seqlen`` calibration tokens from ``calib`` (dsq calib sets or a file), ``rows`` sampled rows
    per tensor, ``draws`` sampled label sets. ``keep``: if a dict, the model, calibration ids and sensitivities
    are left in it (bench/gguf_peers.py measures KLs with them). Raises InputError for a quantized source or a
    target below the smallest file."""

    from dsq.dsquant.calib.data import calibration_batch, load_tokenizer

    from .gguf_writer import choose_type, file_overhead, padded

    t0 = time.perf_counter()
    if src.quantized:
        raise InputError(f"{flag}: {src.path} is already quantized; the size-budget search chooses types for a "
                         "float checkpoint (export the original model)")
    searched = [t for t in outs if searchable(t)]
    fixed = [t for t in outs if is_quantizable(t.name, t.shape) and not searchable(t)]
    fixed_types = {t.name: candidates(t.shape, (FIXED,))[0] for t in fixed}
    fixed_bytes = file_overhead(src, outs) + sum(
        padded(nbytes(GGUF_TYPES[fixed_types[t.name]] if t.name in fixed_types else choose_type(t, None)[0], t.shape))
        for t in outs if t not in searched)
    smallest = fixed_bytes + sum(padded(nbytes(GGUF_TYPES[candidates(t.shape)[0]], t.shape)) for t in searched)
    if smallest > target:  # refuse before loading the model and calibrating
        choose({t.name: [Option("x", padded(nbytes(GGUF_TYPES[candidates(t.shape)[0]], t.shape)), 0.0)]
                for t in searched}, fixed_bytes, target, flag)

    batch = calibration_batch(calib, load_tokenizer(src.path), samples, seqlen, seed=seed)
    cache = _cache_file(src, batch.ids, rows, draws, seed)
    options = _load_options(cache) if keep is None else None
    cached = options is not None
    if options is None:
        options = _measure(src, searched, batch.ids, rows, draws, seed, log, keep)
        _save_options(cache, options)
    sel: Selection = choose(options, fixed_bytes, target, flag)
    if keep is not None:
        keep["selection"] = sel
    types = {**fixed_types, **sel.types}
    counts: dict[str, int] = {}
    for c in types.values():
        counts[c] = counts.get(c, 0) + 1
    report = {
        "target_bytes": target,
        "flag": flag,
        "predicted_bytes": sel.bytes,
        "predicted_kl": sel.predicted_kl,
        "fixed_bytes": fixed_bytes,
        "types": counts,
        "searched": len(searched),
        "not_searched": {n: t for n, t in fixed_types.items()},
        "calibration": {"source": calib, "samples": int(batch.ids.shape[0]), "seqlen": int(batch.ids.shape[1]),
                        "rows_per_tensor": rows, "draws": draws, "seed": seed},
        "sensitivity_cached": str(cache) if cached else None,
        "method": "diagonal Fisher of the output distribution (sampled labels) x squared rounding error on sampled "
                  "rows, summed over tensors; exact knapsack over bytes",
        "seconds": time.perf_counter() - t0,
        "per_tensor": {n: {"type": sel.types[n], "predicted_kl": sel.kl[n],
                           "options": {o.type: [o.bytes, o.kl] for o in options[n]}} for n in sorted(sel.types)},
    }
    if log:
        log(f"budget: {human(sel.bytes)} of {human(target)}, predicted KL {sel.predicted_kl:.4g}")
    return types, report


CACHE_VERSION = 1


def _cache_file(src: Source, ids: torch.Tensor, rows: int, draws: int, seed: int) -> Path:
    """Where the sensitivities of this model on these calibration tokens are kept: a second export at another
    size (or the bench's several) skips the calibration. Keyed by the model's full content (dsq eval's
    fingerprint), the tokens, the settings and the candidate types."""
    from dsq.runtimes.eval.evaluate import default_cache_dir, model_fingerprint

    base = default_cache_dir()
    key = hashlib.sha256(json.dumps([
        CACHE_VERSION, model_fingerprint(Path(src.path), base), hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        list(ids.shape), rows, draws, seed, CANDIDATES, torch.__version__,
    ]).encode()).hexdigest()[:32]
    return base.parent / "budget" / f"{key}.json"


def _load_options(path: Path) -> dict[str, list[Option]] | None:
    try:
        raw = json.loads(path.read_text())
        return {n: [Option(str(t), int(b), float(k)) for t, b, k in opts] for n, opts in raw.items()}
    except (OSError, ValueError, TypeError):
        return None  # absent or damaged: measure again


def _save_options(path: Path, options: dict[str, list[Option]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({n: [[o.type, o.bytes, o.kl] for o in opts] for n, opts in options.items()}))
        os.replace(tmp, path)
    except OSError:
        pass  # a full or read-only cache costs a recalibration next time


def _measure(src: Source, searched: list[OutTensor], ids: torch.Tensor, rows: int, draws: int, seed: int,
             log: Callable[[str], None] | None, keep: dict | None) -> dict[str, list[Option]]:
    """Each searched tensor's options (type, bytes, predicted KL): Fisher pass, then rounding errors."""
    from transformers import AutoModelForCausalLM

    from .gguf_writer import padded

    model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float32).eval()
    batch_ids = ids

    params = dict(model.named_parameters(remove_duplicate=False))
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    embed_weight = model.get_input_embeddings().weight
    present = torch.unique(batch_ids)  # the embedding rows the calibration text uses
    probes: list[Probe] = []
    per_tensor: dict[str, list[Probe]] = {}
    for t in searched:
        name = t.sources[0].name
        if name not in params:
            raise InputError(f"{src.path}: transformers' model has no parameter {name} (for {t.name})")
        mine = []
        if id(params[name]) in linear_weights:
            mine.append(Probe(t.name, name, sample_rows(t.name, t.shape[0], rows, seed)))
        if params[name] is embed_weight:
            mine.append(Probe(t.name + "#embedding", name, present, "embedding"))
        if not mine:
            raise InputError(f"{src.path}: {name} is neither a linear weight nor the input embedding; "
                             "the size-budget search cannot measure it")
        probes += mine
        per_tensor[t.name] = mine
    fisher, positions = fisher_rows(model, batch_ids, probes, draws=draws, seed=seed, log=log)

    # Squared rounding error of each candidate on the sampled rows: rows of one width are quantized together
    # (the k-quant packers cost far less per weight on big batches).
    sq_err: dict[str, dict[str, torch.Tensor]] = {p.key: {} for p in probes}
    by_width: dict[int, list[Probe]] = {}
    for p in probes:
        by_width.setdefault(params[p.param].shape[1], []).append(p)
    for width, group in sorted(by_width.items()):
        x = torch.cat([params[p.param].detach()[p.rows].float() for p in group])
        for name in candidates((width,)):
            err = (held(x, GGUF_TYPES[name]) - x).pow(2)
            start = 0
            for p in group:
                sq_err[p.key][name] = err[start: start + len(p.rows)]
                start += len(p.rows)
        if log:
            log(f"rounding errors: rows of {width} done")
    options = {
        t.name: [Option(c, padded(nbytes(GGUF_TYPES[c], t.shape)),
                        sum(predicted_kl(fisher[p.key], sq_err[p.key][c], t.shape[0], positions, p.scaled)
                            for p in per_tensor[t.name]))
                 for c in candidates(t.shape)]
        for t in searched
    }
    if keep is not None:
        keep.update(model=model, ids=batch_ids, options=options, fisher=fisher, probes=probes)
    return options


# -- dsq quantize --target-size: the choice recorded in the quantized checkpoint --------------------------------
#: GGUF types whose values a dsq format holds exactly (gguf_quants.NEAREST's twins): those tensors are quantized
#: by ``dsq quantize`` (calibrated methods included) and carried byte for byte by the export.
TWIN_FORMAT: dict[str, str] = {"q4_0": "int4_sym_g32", "q4_1": "int4_asym_g32", "q8_0": "int8_g32"}
RECORD = "dsq-gguf-types.json"


def twin_format(gguf_type: str) -> str | None:
    """The dsq format ``dsq quantize`` writes for a tensor the search gave ``gguf_type``: its twin, or a dsq format
    of the same name where one is registered (GGUF-grid formats such as ``q4_k``), else None (kept float, the
    export quantizes it)."""
    if gguf_type in TWIN_FORMAT:
        return TWIN_FORMAT[gguf_type]
    return gguf_type if gguf_type in FORMATS else None


def budget_recipe(src_dir: str | Path, out_dir: str | Path, recipe_path: Path, *, target_size: str | None = None,
                  target_bpw: float | None = None, calib: str = "mixed", **search) -> dict:
    """For ``dsq quantize SRC -o OUT --target-size``: run the search on SRC's GGUF layout, write at ``recipe_path``
    a recipe that quantizes the tensors whose chosen type has a dsq twin (``twin_format``: Q4_0/Q4_1/Q8_0 ->
    int4_sym_g32/int4_asym_g32/int8_g32, and any GGUF-grid dsq format) and keeps the others in float, and return the record to store in OUT (``RECORD``):
    ``dsq export OUT --to gguf`` then writes every tensor in its chosen type.

    OUT's GGUF carries OUT's name instead of SRC's in ``general.name``: the search leaves room for the longer of
    the two names plus one alignment step, so the file stays within the target. ``search``: plan_budget's
    keyword settings (samples, seqlen, rows, ...). Raises as ``plan_budget``."""
    from .gguf_tensors import plan_tensors
    from .gguf_writer import ALIGNMENT

    src = Source(src_dir)
    outs, _ = plan_tensors(src)
    target, flag = resolve_target(target_size, target_bpw, outs)
    slack = max(0, len(Path(out_dir).name.encode()) - len(src.path.name.encode())) + ALIGNMENT
    types, budget = plan_budget(src, outs, target - slack, flag, calib=calib, **search)
    budget["target_bytes"] = target
    write_types_recipe(outs, types, recipe_path)
    return {"types": types, "budget": budget}


def write_types_recipe(outs: list, types: dict[str, str], recipe_path: Path) -> None:
    """Write at ``recipe_path`` the recipe that gives every single-source GGUF tensor of ``types`` ({GGUF name: type
    name}) the dsq format holding that type exactly (``twin_format``) and keeps every other tensor float."""
    lines = ['default = "keep"', 'fallback = "keep"', ""]
    for t in outs:
        fmt = twin_format(types.get(t.name, ""))
        if fmt is not None and len(t.sources) == 1:
            lines += ["[[override]]", f'pattern = "{t.sources[0].name}"', f'format = "{fmt}"', ""]
    recipe_path.write_text("\n".join(lines))


def policy_recipe(src_dir: str | Path, recipe_path: Path, gguf_type: str) -> dict:
    """For ``dsq quantize SRC -o OUT --gguf-type q4_k_m``: llama.cpp's per-tensor types for that file type
    (``gguf_policy``, as ``dsq export --type`` applies it) written as a recipe at ``recipe_path`` (``write_types_recipe``),
    so a calibrated method (GPTQ, AWQ, imatrix) rounds each linear straight onto the grid of the type the file will
    hold and ``dsq export OUT --to gguf`` carries it byte for byte. Returns the record to store in OUT (``RECORD``:
    ``{"types": {GGUF name: type}, "policy": gguf_type}``). Raises UnsupportedError for an unknown type (naming
    the ones there are) or a policy type dsq cannot pack."""
    from .gguf_policy import TYPE_NAMES, get_mix
    from .gguf_tensors import plan_tensors
    from .gguf_writer import policy_types

    mix = get_mix(gguf_type)
    if mix is None:
        raise UnsupportedError(f"--gguf-type {gguf_type}: not a llama.cpp file type dsq writes; choose one of "
                               f"{', '.join(n for n in TYPE_NAMES if get_mix(n) is not None)}")
    src = Source(src_dir)
    outs, _ = plan_tensors(src)
    types = {name: chosen[0].name for name, chosen in policy_types(outs, mix, src).items() if chosen[0].quantized}
    write_types_recipe(outs, types, recipe_path)
    return {"types": types, "policy": gguf_type}


def write_record(out_dir: str | Path, record: dict) -> Path:
    """Store the search's choice in the quantized checkpoint (atomically)."""
    path = Path(out_dir) / RECORD
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def read_record(src_dir: str | Path) -> dict | None:
    """The choice ``dsq quantize --target-size`` stored in ``src_dir``, or None. Raises InputError if damaged."""
    path = Path(src_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("types"), dict):
            raise ValueError("no types")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: damaged ({e}); delete it to export without the size budget's types") from None
    return record


# -- measured KL -------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """The unquantized model's next-token distributions on ``ids``, kept compactly (runtimes/eval/kld.py)."""

    ids: torch.Tensor
    top_idx: list[np.ndarray]
    top_logp: list[np.ndarray]
    batch: int


def reference(model: nn.Module, ids: torch.Tensor, batch: int = 4, coverage: float = 0.999,
              k_max: int = 2048) -> Reference:
    """Run the float model once and keep, per position, its most likely tokens (``runtimes.eval.kld.keep_most_likely``)."""
    from dsq.runtimes.eval.kld import keep_most_likely, log_softmax

    idx, lp = [], []
    with torch.inference_mode():
        for b0 in range(0, ids.shape[0], batch):
            out = model(ids[b0: b0 + batch]).logits.float()
            logits = out.reshape(-1, out.shape[-1]).numpy()
            i, top, _ = keep_most_likely(logits, coverage, k_max)
            full = log_softmax(logits)
            idx.append(i)
            lp.append(np.where(np.isfinite(top), np.take_along_axis(full, i, 1), -np.inf))
    return Reference(ids, idx, lp, batch)


def measure_kl(model: nn.Module, ref: Reference, replace: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """Per-position KL(reference || model) (nats; runtimes/eval/kld.py's lower bound, exact when the kept tokens hold all
    the mass) with the parameters named in ``replace`` swapped for the given values during the run."""
    from dsq.runtimes.eval.kld import kld_bounds, log_softmax

    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {}
    out = []
    try:
        with torch.no_grad():
            for name, value in (replace or {}).items():
                saved[name] = params[name].data
                params[name].data = value.to(saved[name].dtype).reshape(saved[name].shape)
        with torch.inference_mode():
            for k, b0 in enumerate(range(0, ref.ids.shape[0], ref.batch)):
                logits = model(ref.ids[b0: b0 + ref.batch]).logits.float()
                logits = logits.reshape(-1, logits.shape[-1])
                lower, _ = kld_bounds(ref.top_idx[k], ref.top_logp[k], log_softmax(logits.numpy()))
                out.append(lower)
    finally:
        for name, value in saved.items():
            params[name].data = value
    return np.concatenate(out)
