#!/usr/bin/env python3
"""dsq's GGUFs against llama.cpp's own (with and without an importance matrix), same model, same held-out text,
one table (issue 16, "Peers").

    .venv/bin/python bench/gguf_peers.py [--rows llama,dsq,budget] [--chunks 16] [--json out.json]

Model: SmolLM2-135M-Instruct, permuted (``/work/shared/models/make_smollm2.py``:
``~/.cache/dsq-bench/smollm2-135m-instruct-perm0-bf16``). Calibration text: ``calib_mixed.txt``; evaluation
text: ``eval_austen.txt`` (they share no 12-word shingle).

Rows:
* llama.cpp (its own CLI tools, built by bench/llamacpp_tools.py from llama-cpp-python's vendored sources):
  the float model as an F32 GGUF (``dsq export --type f32``: exact for a bf16 checkpoint), ``llama-imatrix``
  on the calibration text, then ``llama-quantize`` Q4_0, Q4_K_M, Q4_K_M + imatrix, Q5_K_M, Q3_K_M,
  IQ4_XS + imatrix. With ``--no-build``: the same quantizer through llama-cpp-python's binding, and the
  imatrix written by ``dsq quantize --method imatrix --imatrix-out`` from the same calibration text (rows
  labelled "imatrix by dsq");
* dsq: ``export --type q4_0|q4_k_m`` straight from the float model (round to nearest, llama.cpp's type
  policy), and ``quantize --gguf-type q4_0|q4_k_m --method imatrix|gptq`` on the calibration text (each linear
  calibrated onto the grid of its type under that policy), then ``export`` (the recorded types, carried exactly);
* dsq's size-budget search (``export --target-size``) at each llama.cpp row's file size (``--rows budget``), and
  the same with ``--imatrix`` (the llama.cpp rows' imatrix: K-quants rounded on ggml's importance path).

Every GGUF is scored by ``dsq eval``'s machinery (runtimes/eval/evaluate.py) in llama.cpp (llama-cpp-python) against
the bf16 checkpoint run in torch: KL(reference || GGUF) per token (mean, p99), top-1 agreement, perplexity;
the F32 GGUF's row is the floor (llama.cpp's arithmetic, no weight rounding). Every producing step runs in its
own process: wall seconds, and CPU seconds (user + sys, os.wait4) which are what to compare on a shared
machine; the load averages at start and end are printed with the table. Budget rows also show the KL the
search predicted (on the calibration text, weights only, so below the measured value by about the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = Path.home() / ".cache" / "dsq-bench"
MODEL = BENCH / "smollm2-135m-instruct-perm0-bf16"
PY = sys.executable

# label -> (llama-quantize type, with the imatrix)
LLAMA_ROWS: dict[str, tuple[str, bool]] = {
    "llama.cpp Q4_0": ("Q4_0", False),
    "llama.cpp Q4_K_M": ("Q4_K_M", False),
    "llama.cpp Q4_K_M+imatrix": ("Q4_K_M", True),
    "llama.cpp Q5_K_M": ("Q5_K_M", False),
    "llama.cpp Q3_K_M": ("Q3_K_M", False),
    "llama.cpp IQ4_XS+imatrix": ("IQ4_XS", True),
}


# llama-cpp-python's binding of the same quantizer, when the tools are not built; an imatrix file (argv[5]) is
# passed as params.imatrix, the mean x^2 per column llama-quantize reads from the file (dsq's reader)


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float, str]:
    """Run one step in its own process: (wall s, CPU s of it and its children, stdout). Output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=fh, text=True,
                                env={**os.environ, **(env or {})})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        fh.write(out[-4000:] + "\n")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))} (see {log})")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, out


def dsq(*args: str) -> list[str]:
    return [PY, "-m", "dsq.cli", *args]


def json_of(out: str) -> dict:
    return json.loads(out[out.index("{"):])


def validate(model_dir: Path, calib: Path, target: int, tensors: int = 6) -> list[dict]:
    """The search's prediction against the KL measured in torch on the same calibration tokens: a few tensors
    alone at two candidate types each, then the whole choice at ``target`` bytes (every tensor at its chosen
    type at once, so the prediction's additivity is tested too)."""
    import torch

    from dsq.dsquant.source import Source
    from dsq.export.gguf_budget import candidates, held, measure_kl, plan_budget, reference
    from dsq.export.gguf_quants import GGUF_TYPES
    from dsq.export.gguf_tensors import plan_tensors

    src = Source(model_dir)
    outs, _ = plan_tensors(src)
    keep: dict = {}
    types, _ = plan_budget(src, outs, target, "--target-size", calib=str(calib), keep=keep)
    model, sel, opts = keep["model"], keep["selection"], keep["options"]
    ref = reference(model, keep["ids"])
    params = dict(model.named_parameters(remove_duplicate=False))
    param_of = {p.key.split("#")[0]: p.param for p in keep["probes"]}
    shape_of = {t.name: t.shape for t in outs}
    names = sorted(param_of)
    picked = [names[0]] + names[1:: max(1, len(names) // tensors)][: tensors - 1]
    out = []
    for n in picked:
        w = params[param_of[n]].detach().float()
        cands = candidates(shape_of[n])
        for c in (cands[0], cands[len(cands) // 2]):
            pred = next(o.kl for o in opts[n] if o.type == c)
            kl = float(measure_kl(model, ref, {param_of[n]: held(w, GGUF_TYPES[c])}).mean())
            out.append({"tensor": n, "type": c, "predicted": pred, "measured": kl})
            print(f"validate {n} {c}: predicted {pred:.5f}, measured {kl:.5f}", flush=True)
    replace = {param_of[n]: held(params[param_of[n]].detach().float(), GGUF_TYPES[types[n]]) for n in sel.types}
    with torch.no_grad():
        kl = float(measure_kl(model, ref, replace).mean())
    out.append({"tensor": "all", "type": f"choice at {target} bytes", "predicted": sel.predicted_kl, "measured": kl})
    print(f"validate whole choice at {target:,} bytes: predicted {sel.predicted_kl:.5f}, measured {kl:.5f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--calib", type=Path, default=BENCH / "calib_mixed.txt")
    ap.add_argument("--eval", type=Path, default=BENCH / "eval_austen.txt")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsq-peers"))
    ap.add_argument("--rows", default="llama,dsq,budget", help="which groups: llama, dsq, calib (imatrix/GPTQ), budget")
    ap.add_argument("--methods", default="imatrix,gptq", help="calib rows: dsq methods to run (each per file type)")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=PATH",
                    help="also score a GGUF another tool made (e.g. auto-round's); its costs are that tool's to report")
    ap.add_argument("--chunks", type=int, default=16, help="evaluation chunks of --ctx tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--imatrix-chunks", type=int, default=64, help="llama-imatrix chunks of 512 calibration tokens")
    ap.add_argument("--imatrix-samples", type=int, default=32,
                    help="without llama-imatrix: dsq's imatrix calibration windows of 512 tokens")
    ap.add_argument("--samples", type=int, default=64, help="dsq calibration windows (imatrix/GPTQ rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-build", action="store_true",
                    help="do not build llama.cpp's tools: llama.cpp rows through llama-cpp-python, imatrix rows skipped")
    ap.add_argument("--validate", type=int, default=0, metavar="BYTES",
                    help="only check the search's predicted KL against torch-measured KL at this target and exit")
    ap.add_argument("--reuse", action="store_true", help="keep files an earlier run in --work built (and their costs)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.validate:
        res = validate(args.model, args.calib, args.validate)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return
    groups = set(args.rows.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "steps.log"
    load0 = os.getloadavg()
    rows: list[dict] = []
    imatrix: Path | None = None

    costs_file = args.work / "costs.json"  # what each file cost to build, so --reuse can skip rebuilding it
    costs = json.loads(costs_file.read_text()) if costs_file.is_file() else {}

    def row(label: str, path: Path, wall: float, cpu: float, **extra) -> None:
        rows.append({"label": label, "path": str(path), "bytes": path.stat().st_size, "wall_s": round(wall, 1),
                     "cpu_s": round(cpu, 1), **extra})
        costs[label] = rows[-1]
        costs_file.write_text(json.dumps(costs, indent=1))
        print(f"built {label}: {path.stat().st_size:,} bytes, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)

    def reused(label: str) -> bool:
        """--reuse: a file this work dir already built (same label, file still there) is not rebuilt."""
        old = costs.get(label)
        if args.reuse and old and Path(old["path"]).is_file():
            rows.append(old)
            return True
        return False

    f32 = args.work / "f32.gguf"
    if not f32.is_file():
        run(dsq("export", str(args.model), "--to", "gguf", "--type", "f32", "-o", str(f32), "--no-check"), log)
    rows.append({"label": "F32 GGUF (floor)", "path": str(f32), "bytes": f32.stat().st_size, "wall_s": 0, "cpu_s": 0})

    if "llama" in groups or "budget" in groups:
        sys.path.insert(0, str(HERE))
        from llamacpp_tools import ensure_tools, tool_paths

        tools = tool_paths() if args.no_build else ensure_tools()
        built = all(t.is_file() for t in tools.values())
        imatrix = args.work / "imatrix.gguf"
        im_cost = (0.0, 0.0)
        if not built:  # the importance from dsq's own calibration, written in llama.cpp's imatrix format
            imatrix = args.work / "imatrix-dsq.gguf"
            if not imatrix.is_file():
                w, c, _ = run(dsq("quantize", str(args.model), "-o", str(args.work / "dsq-int4-imatrix-im"), "-r",
                                  "int4", "--method", "imatrix", "--calib", str(args.calib), "--samples",
                                  str(args.imatrix_samples), "--seqlen", "512", "--imatrix-out", str(imatrix),
                                  "--overwrite"), log)
                im_cost = (w, c)
        elif not imatrix.is_file():
            w, c, _ = run([tools["llama-imatrix"], "-m", f32, "-f", args.calib, "-o", imatrix, "--chunks",
                           str(args.imatrix_chunks), "-c", "512", "-t", str(args.threads), "--no-ppl"], log)
            im_cost = (w, c)
        for label, (qtype, with_im) in LLAMA_ROWS.items():
            if reused(label) or (not built and with_im and reused(label + " (imatrix by dsq)")):
                continue
            out = args.work / f"llama-{qtype}{'-imat' if with_im else ''}.gguf"
            if not built and with_im:
                label += " (imatrix by dsq)"
            cmd = ([tools["llama-quantize"], *(["--imatrix", imatrix] if with_im else []), f32, out, qtype,
                    str(args.threads)] if built else [PY, str(HERE / "llamacpp_tools.py"), "quantize", f32, out, f"LLAMA_FTYPE_MOSTLY_{qtype}",
                                                      str(args.threads), *([imatrix] if with_im else [])])
            w, c, _ = run(cmd, log)
            if with_im:  # the imatrix is part of the price of this file
                w, c = w + im_cost[0], c + im_cost[1]
            row(label, out, w, c)

    if "dsq" in groups:
        for t in ("q4_0", "q4_k_m"):
            if reused(f"dsq RTN {t}"):
                continue
            out = args.work / f"dsq-rtn-{t}.gguf"
            w, c, _ = run(dsq("export", str(args.model), "--to", "gguf", "--type", t, "-o", str(out), "--overwrite",
                              "--no-check"), log)
            row(f"dsq RTN {t}", out, w, c)
    if "calib" in groups:  # calibrated straight onto each tensor's type under llama.cpp's policy (--gguf-type)
        for method in args.methods.split(","):
            for t in ("q4_0", "q4_k_m"):
                label = f"dsq {method} {t}"
                if reused(label):
                    continue
                q = args.work / f"dsq-{method}-{t}"
                wq, cq, _ = run(dsq("quantize", str(args.model), "-o", str(q), "--gguf-type", t, "--method", method,
                                    "--calib", str(args.calib), "--samples", str(args.samples), "--seqlen", "512",
                                    "--overwrite"), log)
                out = args.work / f"dsq-{method}-{t}.gguf"
                w, c, _ = run(dsq("export", str(q), "--to", "gguf", "-o", str(out), "--overwrite", "--no-check"), log)
                row(label, out, w + wq, c + cq)

    if "budget" in groups:
        peers = [r for r in rows if r["label"].startswith("llama.cpp")]
        for peer in peers:
            if reused(f"dsq budget @ {peer['label'].removeprefix('llama.cpp ')}"):
                continue
            out = args.work / f"dsq-budget-{peer['bytes']}.gguf"
            w, c, stdout = run(dsq("export", str(args.model), "--to", "gguf", "--target-size", str(peer["bytes"]),
                                   "--calib", str(args.calib), "-o", str(out), "--overwrite", "--no-check", "--json"),
                               log)
            b = json_of(stdout)["budget"]
            row(f"dsq budget @ {peer['label'].removeprefix('llama.cpp ')}", out, w, c,
                predicted_kl=b["predicted_kl"], types=b["types"])
            if imatrix is not None and imatrix.is_file():  # the same choice, rounded on ggml's imatrix path
                label = f"dsq budget+imatrix @ {peer['label'].removeprefix('llama.cpp ')}"
                if reused(label):
                    continue
                out = args.work / f"dsq-budget-imat-{peer['bytes']}.gguf"
                w, c, stdout = run(dsq("export", str(args.model), "--to", "gguf", "--target-size", str(peer["bytes"]),
                                       "--calib", str(args.calib), "--imatrix", str(imatrix), "-o", str(out),
                                       "--overwrite", "--no-check", "--json"), log)
                b = json_of(stdout)["budget"]
                row(label, out, w, c, predicted_kl=b["predicted_kl"], types=b["types"])

    for spec in args.extra:
        label, _, path = spec.partition("=")
        if not Path(path).is_file():
            sys.exit(f"--extra {spec}: no such GGUF file")
        if not reused(label):
            row(label, Path(path), 0.0, 0.0)

    from dsq.runtimes.eval.evaluate import EvalSettings, evaluate

    settings = EvalSettings(ctx=args.ctx, chunks=args.chunks, threads=args.threads)
    scored = f"{args.eval.name}:{args.chunks}x{args.ctx}"  # --reuse keeps scores taken on the same tokens
    todo = [r for r in rows if r.get("scored") != scored]
    report = evaluate([(Path(r["path"]), "llama-cpp") for r in todo], args.model, args.eval, settings, {},
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    by_path = {r.model: r for r in report.results if not r.is_reference}
    for r in todo:
        res = by_path[str(Path(r["path"]).resolve())] if str(Path(r["path"]).resolve()) in by_path else by_path[r["path"]]
        r.update(kl_mean=res.kld_mean, kl_p99=res.kld_p99, top1=res.top1, ppl=res.ppl, scored=scored)
        costs[r["label"]] = r
    costs_file.write_text(json.dumps(costs, indent=1))
    n_weights = None
    for r in rows:
        if n_weights is None:  # F32: 4 bytes per weight (plus a header that is small against it)
            n_weights = r["bytes"] / 4
        r["bpw"] = 8 * r["bytes"] / n_weights
    load1 = os.getloadavg()
    ref = next(r for r in report.results if r.is_reference)
    print(f"\nSmolLM2-135M ({args.model.name}); eval {args.chunks}x{args.ctx} tokens of {args.eval.name} "
          f"(reference ppl {ref.ppl:.3f}, torch bf16 weights in fp32); calib {args.calib.name}")
    print(f"load average at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, at end "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} (2 cores shared): compare CPU seconds, not wall\n")
    print("| row | MB | bits/weight | KL mean | KL p99 | top-1 | PPL | predicted KL | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pred = f"{r['predicted_kl']:.4f}" if "predicted_kl" in r else ""
        print(f"| {r['label']} | {r['bytes'] / 1e6:.2f} | {r['bpw']:.2f} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | "
              f"{r['top1']:.3f} | {r['ppl']:.3f} | {pred} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load_start": load0, "load_end": load1}, indent=2))


if __name__ == "__main__":
    main()
