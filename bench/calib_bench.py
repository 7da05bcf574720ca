#!/usr/bin/env python3
"""Calibration benchmark: KL divergence to the float model of RTN, imatrix, AWQ and GPTQ at int4 g32/g128.

    .venv/bin/python bench/calib_bench.py                       # SmolLM2-135M from /work/shared/models
    .venv/bin/python bench/calib_bench.py --samples 32 --seqlen 256 --eval-tokens 2048 --json /tmp/calib.json

Model: the real SmolLM2-135M-Instruct checkpoint that ``/work/shared/models/make_smollm2.py`` writes
(``~/.cache/dsq-bench/smollm2-135m-instruct-perm0-bf16``; permuted so its weights are off the 4-bit grid).
Calibration text: ``calib_mixed.txt`` (Shakespeare + Python docs); evaluation text: the first
``--eval-tokens`` tokens of ``eval_austen.txt`` (Austen), in chunks of ``--eval-seqlen``. The two share no
12-word shingles (see the models README), so calibration never sees the evaluation text.

Each (method, format) runs in its own child process: ``calibrate()`` layer by layer (wall time and the
child's peak RSS are measured), then the calibrated weights (codes dequantized exactly as exporters
store them, plus AWQ's rescaled norms) are loaded into the transformers model and the per-token
KL(float || quantized) over the evaluation chunks is computed against the float model's logits (computed
once by the parent). The float reference is the bf16 checkpoint computed in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path.home() / ".cache" / "dsq-bench"
MODEL = BENCH / "smollm2-135m-instruct-perm0-bf16"
METHODS = ("rtn", "imatrix", "awq", "gptq")
FORMATS = ("int4_sym_g32", "int4_sym_g128")


def eval_ids(model: Path, text: Path, tokens: int, seqlen: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = tok(text.read_text()[: tokens * 8], add_special_tokens=False, verbose=False)["input_ids"][:tokens]
    n = len(ids) // seqlen
    return torch.tensor(ids[: n * seqlen]).reshape(n, seqlen)


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([torch.log_softmax(model(row[None]).logits.float(), -1)[0] for row in ids])


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def recipe_file(fmt: str, out_dir: Path) -> str:
    p = out_dir / f"{fmt}.toml"
    p.write_text(f'base = "int4"\ndefault = "{fmt}"\n')
    return str(p)


def child(args) -> None:
    """One (method, format): calibrate, load the result into the model, KL against the saved reference."""
    from dsq.dsquant.calib.data import calibration_batch, load_tokenizer
    from dsq.dsquant.calib.methods import CalibOptions
    from dsq.dsquant.calib.pipeline import calibrate
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.formats import QuantizedTensor
    from dsq.dsquant.plan import make_plan
    from dsq.dsquant.recipes import load_recipe

    torch.set_num_threads(args.threads)
    ckpt = Checkpoint(args.model)
    plan = make_plan(ckpt, load_recipe(recipe_file(args.format, Path(args.tmp))))
    t0 = time.perf_counter()
    batch = calibration_batch(str(args.calib), load_tokenizer(ckpt.path), args.samples, args.seqlen, seed=0)
    t_data = time.perf_counter() - t0
    res = calibrate(ckpt, plan, args.method, batch=batch,
                    options=CalibOptions(track_drift=False, compute_dtype=args.compute_dtype))
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    model = load_model(args.model)
    state = model.state_dict()
    with torch.no_grad():
        for name, v in res.tensors.items():
            state[name].copy_(v.dequantize() if isinstance(v, QuantizedTensor) else v.to(torch.float32))
        # untouched linears the plan quantizes (none with these recipes, but keep RTN semantics if any)
        for e in plan.entries:
            if e.format and e.name not in res.tensors:
                from dsq.dsquant.formats import FORMATS as F

                state[e.name].copy_(F[e.format].quantize(state[e.name]).dequantize())
    ref = torch.load(args.ref, weights_only=True)
    lp = logprobs(model, ref["ids"])
    p = ref["logprobs"].exp()
    kl = (p * (ref["logprobs"] - lp)).sum(-1)
    nll = -lp[:-1].gather(-1, ref["ids"].reshape(-1)[1:, None])  # ignores chunk borders (same for all)
    out = {
        "method": args.method,
        "format": args.format,
        "kl_mean": float(kl.mean()),
        "kl_p99": float(kl.quantile(0.99)),
        "ppl": float(nll.mean().exp()),
        "calib_seconds": round(seconds, 1),
        "data_seconds": round(t_data, 1),
        "peak_rss_mb": round(rss / 1024**2),
        "layer_rel_err_mean": sum(r.rel_err for r in res.layers) / len(res.layers),
        "threads": args.threads,
        "compute_dtype": args.compute_dtype,
    }
    Path(args.out).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--calib", type=Path, default=BENCH / "calib_mixed.txt",
                    help="a .txt/.jsonl file, or a shipped set name such as `mixed` (dsq's default)")
    ap.add_argument("--eval", type=Path, default=BENCH / "eval_austen.txt")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="calibration forwards / hidden states / X^T X products (CalibOptions.compute_dtype)")
    ap.add_argument("--json", type=Path)
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    for p in (args.model, args.calib, args.eval):
        if not p.exists() and not (p is args.calib and p.parent == Path(".")):  # a bare name: a shipped set
            sys.exit(f"{p} is missing: run /work/shared/models/run_all.sh (see its README) first")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ids = eval_ids(args.model, args.eval, args.eval_tokens, args.eval_seqlen)
        ref_lp = logprobs(load_model(args.model), ids)
        ref_path = Path(tmp) / "ref.pt"
        torch.save({"ids": ids, "logprobs": ref_lp}, ref_path)
        nll = -ref_lp[:-1].gather(-1, ids.reshape(-1)[1:, None])
        rows = [{"method": "float (bf16 weights)", "format": "-", "kl_mean": 0.0, "ppl": float(nll.mean().exp())}]
        print(f"eval: {ids.numel()} tokens; float ppl {rows[0]['ppl']:.3f}", flush=True)
        for fmt in args.formats.split(","):
            for method in args.methods.split(","):
                out = Path(tmp) / f"{method}-{fmt}.json"
                cmd = [
                    sys.executable, __file__, "--child", "--method", method, "--format", fmt, "--ref", str(ref_path),
                    "--out", str(out), "--tmp", tmp, "--model", str(args.model), "--calib", str(args.calib),
                    "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--threads", str(args.threads),
                    "--compute-dtype", args.compute_dtype,
                ]
                subprocess.run(cmd, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                row = json.loads(out.read_text())
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| method | format | KL mean | KL p99 | ppl | calib s | peak RSS MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['format']} | {r['kl_mean']:.4f} | {r.get('kl_p99', 0):.4f} | {r['ppl']:.3f} | "
            f"{r.get('calib_seconds', '-')} | {r.get('peak_rss_mb', '-')} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
