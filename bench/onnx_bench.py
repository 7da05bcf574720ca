"""ONNX export benchmark: onnxruntime CPU speed of dsq's int4 vs fp32 graphs vs llama.cpp, and dsq's int4 ONNX
against the one onnxruntime-genai's model builder makes from the same checkpoint.

Part A (speed, synthetic): a random-weight model with Qwen2-0.5B's body (hidden 896, 24 layers, 14 heads / 2 KV
heads, MLP 4864) and SmolLM2's 49k vocab (its tokenizer, so a GGUF can be written): ~0.4B parameters.
dsq quantize int4 (int4_sym_g32 = Q4_0 bit-exact) -> ONNX int4 (MatMulNBits, accuracy_level 0 and 4) and,
from the bf16 source, ONNX fp32; dsq's GGUF (Q4_0) of the same int4 checkpoint -> llama-cpp-python.
Prefill tokens/s (one prompt) and decode tokens/s (single-token steps with the KV cache), ratios to ORT fp32.

Part B (quality, real): SmolLM2-135M (see /work/shared/models/README.md). dsq int4 ONNX vs
``python -m onnxruntime_genai.models.builder -p int4 -e cpu``: mean KL(float reference || model) of the next-token
distributions over eval text, top-1 agreement, and decode tokens/s with onnxruntime-genai driving both folders.

    .venv/bin/python bench/onnx_bench.py [--work DIR] [--skip-a] [--skip-b] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SMOLLM = Path.home() / ".cache/dsq-bench/smollm2-135m-instruct-perm0-bf16"
EVAL_TEXT = Path.home() / ".cache/dsq-bench/eval_austen.txt"
SYNTH = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- model preparation -------------------------------------------------------------------------------------
def make_synthetic(out: Path) -> Path:
    """Random N(0, 0.02) weights (norms 1) in bf16, written tensor by tensor (no slow nn.init of 0.4B params)."""
    import transformers
    from safetensors.torch import save_file

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((SMOLLM / "config.json").read_text())["vocab_size"]
    cfg = transformers.Qwen2Config(vocab_size=vocab, **SYNTH)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (SMOLLM / f).is_file():
            shutil.copy2(SMOLLM / f, out / f)
    return out


def step(label: str, fn):
    t = time.perf_counter()
    r = fn()
    log(f"  {label}: {time.perf_counter() - t:.1f} s")
    return r


# -- onnxruntime timing ------------------------------------------------------------------------------------
def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _feeds(session, ids: np.ndarray, past: dict | None, total: int) -> dict:
    names = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), np.int64)}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
    if past is None:
        past = {}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                shape = [1 if d == "batch_size" else 0 if d == "past_sequence_length" else d for d in i.shape]
                if isinstance(shape[3], str):  # genai builder names the head size ``kv_cache_dim``
                    shape[3] = session._dsq_head_size
                past[i.name] = np.zeros(shape, np.float32)
    feeds.update(past)
    return feeds


def ort_logits(session, ids: list[int]) -> np.ndarray:
    arr = np.array([ids], np.int64)
    return session.run(["logits"], _feeds(session, arr, None, len(ids)))[0][0]


def ort_speed(session, prompt: list[int], n_decode: int, reps: int = 3) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): best-of-reps prefill, then n_decode single-token steps."""
    outs = [o.name for o in session.get_outputs()]
    ids = np.array([prompt], np.int64)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        res = session.run(outs, _feeds(session, ids, None, len(prompt)))
        best = min(best, time.perf_counter() - t)
    out = dict(zip(outs, res, strict=True))
    total, tok = len(prompt), int(out["logits"][0, -1].argmax())
    t = time.perf_counter()
    for _ in range(n_decode):
        total += 1
        past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        out = dict(zip(outs, session.run(outs, _feeds(session, np.array([[tok]], np.int64), past, total)),
                       strict=True))
        tok = int(out["logits"][0, -1].argmax())
    return len(prompt) / best, n_decode / (time.perf_counter() - t)


def llama_cpp_speed(gguf: Path, prompt: list[int], n_decode: int, threads: int, reps: int = 3) -> tuple[float, float]:
    from llama_cpp import Llama

    # logits_all: llama.cpp computes every prompt position's logits, as the ONNX graph does.
    llm = Llama(str(gguf), n_ctx=len(prompt) + n_decode + 8, n_threads=threads, n_batch=len(prompt), logits_all=True,
                verbose=False)
    best = float("inf")
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best = min(best, time.perf_counter() - t)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return len(prompt) / best, n_decode / (time.perf_counter() - t)


def part_a(work: Path, args) -> dict:
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.export.gguf_writer import export_gguf
    from dsq.export.onnx_export import export_onnx

    log("== Part A: speed on a synthetic Qwen2-0.5B-bodied model (49k vocab) ==")
    src = step("make synthetic checkpoint", lambda: make_synthetic(work / "synth"))
    q = work / "synth-int4"
    if not q.exists():
        step("dsq quantize int4", lambda: quantize_checkpoint(src, q, "int4"))
    outs = {
        "onnx int4 (acc 0)": (q, 0, "plain"),
        "onnx int4 (acc 4)": (q, 4, "plain"),
        "onnx int4 GQA (acc 4)": (q, 4, "contrib"),
        "onnx fp32": (src, 0, "plain"),
    }
    dirs = {}
    for label, (s, acc, attn) in outs.items():
        d = work / label.replace(" ", "_").replace("(", "").replace(")", "")
        if not d.exists():
            step(f"export {label}", lambda s=s, d=d, acc=acc, attn=attn: export_onnx(
                s, d, accuracy_level=acc, attention=attn))
        dirs[label] = d
    gguf = work / "synth-q4_0.gguf"
    if not gguf.exists():
        step("dsq export gguf (Q4_0 from the int4 checkpoint)", lambda: export_gguf(q, gguf))
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(10, 40000, args.prompt)]
    results = {}
    for label, d in dirs.items():
        s = ort_session(d, args.threads)
        results[label] = ort_speed(s, prompt, args.decode)
        del s
        log(f"  {label}: prefill {results[label][0]:.1f} tok/s, decode {results[label][1]:.2f} tok/s")
    try:
        results["llama.cpp Q4_0"] = llama_cpp_speed(gguf, prompt, args.decode, args.threads)
        log(f"  llama.cpp Q4_0: prefill {results['llama.cpp Q4_0'][0]:.1f}, decode {results['llama.cpp Q4_0'][1]:.2f}")
    except Exception as e:  # noqa: BLE001 - report and go on: the ONNX numbers stand alone
        log(f"  llama.cpp: not measured ({type(e).__name__}: {e})")
    base = results["onnx fp32"]
    log(f"\n  {'runtime':<22}{'prefill tok/s':>14}{'decode tok/s':>14}{'prefill x':>11}{'decode x':>10}   (x = / ORT fp32)")
    for label, (p, dcd) in results.items():
        log(f"  {label:<22}{p:>14.1f}{dcd:>14.2f}{p / base[0]:>11.2f}{dcd / base[1]:>10.2f}")
    sizes = {label: sum(f.stat().st_size for f in d.glob("model.onnx*")) for label, d in dirs.items()}
    sizes["llama.cpp Q4_0"] = gguf.stat().st_size
    return {"prompt": args.prompt, "decode": args.decode, "threads": args.threads,
            "tok_per_s": {k: {"prefill": v[0], "decode": v[1]} for k, v in results.items()}, "bytes": sizes}


# -- part B ------------------------------------------------------------------------------------------------
def kl_stats(ref: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(P_ref || P) over positions, and top-1 agreement."""
    def logsoftmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lp = logsoftmax(ref), logsoftmax(logits)
    kl = (np.exp(lr) * (lr - lp)).sum(-1)
    return float(kl.mean()), float((ref.argmax(-1) == logits.argmax(-1)).mean())


def genai_decode_speed(folder: Path, prompt: list[int], n: int) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))  # prefill
    t, k = time.perf_counter(), 0
    while not gen.is_done():
        gen.generate_next_token()
        k += 1
    return k / (time.perf_counter() - t)


def part_b(work: Path, args) -> dict:
    import transformers
    from tokenizers import Tokenizer

    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.export.onnx_export import export_onnx

    log("\n== Part B: SmolLM2-135M, dsq int4 ONNX vs onnxruntime-genai model builder int4 ==")
    if not SMOLLM.is_dir():
        log(f"  skipped: {SMOLLM} missing (see /work/shared/models/README.md)")
        return {}
    q = work / "smol-int4"
    if not q.exists():
        step("dsq quantize int4", lambda: quantize_checkpoint(SMOLLM, q, "int4"))
    variants = {  # label -> (folder, accuracy_level, attention)
        "dsq int4 (acc 0)": ("smol-dsq-int4-acc0", 0, "plain"),
        "dsq int4 (acc 4)": ("smol-dsq-int4-acc4", 4, "plain"),
        "dsq int4 GQA (acc 4)": ("smol-dsq-int4-gqa-acc4", 4, "contrib"),
    }
    folders = {}
    for label, (name, acc, attn) in variants.items():
        d = folders[label] = work / name
        if not d.exists():
            step(f"export {label}", lambda d=d, acc=acc, attn=attn: export_onnx(q, d, accuracy_level=acc, attention=attn))
    builder = work / "smol-genai-builder-int4"
    if not builder.exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(SMOLLM), "-o", str(builder),
               "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")]
        with open(work / "builder.log", "w") as fh:
            step("onnxruntime-genai builder -p int4 -e cpu", lambda: subprocess.run(cmd, stdout=fh, stderr=fh, check=True))
    folders["genai builder int4"] = builder

    tok = Tokenizer.from_file(str(SMOLLM / "tokenizer.json"))
    ids = tok.encode(EVAL_TEXT.read_text()[:20000]).ids[: args.kl_tokens]
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    del model
    head = json.loads((SMOLLM / "config.json").read_text())
    head_size = head.get("head_dim") or head["hidden_size"] // head["num_attention_heads"]
    results = {}
    prompt = ids[:64]
    for label, d in folders.items():
        s = ort_session(d, args.threads)
        s._dsq_head_size = head_size
        kl, top1 = kl_stats(ref, ort_logits(s, ids))
        del s
        speed = genai_decode_speed(d, prompt, args.decode)
        size = sum(f.stat().st_size for f in d.glob("model.onnx*"))
        results[label] = {"kl": kl, "top1": top1, "decode_tok_s": speed, "bytes": size}
        log(f"  {label}: KL {kl:.4f}, top-1 {top1:.3f}, genai decode {speed:.1f} tok/s, {size / 1e6:.1f} MB")
    b = results["genai builder int4"]
    for label in variants:
        r = results[label]
        log(f"  {label} / builder: decode x{r['decode_tok_s'] / b['decode_tok_s']:.2f}, KL x{r['kl'] / b['kl']:.2f}")
    return {"kl_tokens": len(ids), "models": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/dsq-bench/onnx")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--kl-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = {}
    if not args.skip_a:
        out["a"] = part_a(args.work, args)
    if not args.skip_b:
        out["b"] = part_b(args.work, args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
