#!/usr/bin/env python3
"""The llama.cpp yardstick for bench/calib_bench.py: KL to the float model of llama.cpp's own Q4_0 and
Q4_K_M, computed by llama.cpp, on the same evaluation tokens.

    .venv/bin/python bench/calib_llamacpp.py [--eval-tokens 2048] [--json out.json]

Steps: dsq exports the float checkpoint as an F32 GGUF; ``llama_model_quantize`` (llama.cpp's own
quantizer, through llama-cpp-python) writes Q4_0 and Q4_K_M from it (no imatrix: llama-cpp-python does
not expose llama-imatrix); each GGUF is evaluated by llama.cpp on the evaluation chunks and its logits
are compared with the float reference from transformers (the same reference calib_bench.py uses). The
F32 GGUF's own KL is the floor: llama.cpp's arithmetic vs transformers', with no weight quantization.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from calib_bench import BENCH, MODEL, eval_ids, load_model, logprobs

TYPES = ("f32", "Q4_0", "Q4_K_M")


def quantize(src: Path, dst: Path, ftype_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype_name} failed ({rc})")


def llama_logprobs(path: Path, ids: torch.Tensor, threads: int) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=ids.shape[1], logits_all=True, n_threads=threads, verbose=False)
    out = []
    for row in ids:
        llm.reset()
        llm.eval(row.tolist())
        out.append(torch.log_softmax(torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32)), -1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--eval", type=Path, default=BENCH / "eval_austen.txt")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from dsq.export.gguf_writer import export_gguf

    ids = eval_ids(args.model, args.eval, args.eval_tokens, args.eval_seqlen)
    ref = logprobs(load_model(args.model), ids)
    p = ref.exp()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        export_gguf(args.model, f32, type="f32")
        for t in TYPES:
            path = f32 if t == "f32" else Path(tmp) / f"{t}.gguf"
            t0 = time.perf_counter()
            if t != "f32":
                quantize(f32, path, t)
            q_seconds = time.perf_counter() - t0
            lp = llama_logprobs(path, ids, args.threads)
            kl = (p * (ref - lp)).sum(-1)
            nll = -lp[:-1].gather(-1, ids.reshape(-1)[1:, None])
            row = {
                "method": f"llama.cpp {t}", "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
                "ppl": float(nll.mean().exp()), "quantize_seconds": round(q_seconds, 1),
                "bytes": path.stat().st_size,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
