"""ONNX export benchmark: dsq's int4 ONNX against onnxruntime-genai's own builder and llama.cpp, in one run.

Default (the comparison, on SmolLM2-135M-Instruct bf16 from ``dsq.dsquant.default_model``):

* **dsq int4 ONNX**: ``dsq quantize int4`` (int4_sym_g32 = Q4_0 values) -> ``export_onnx`` with the tied
  embedding/lm_head in int4_sym_g32 (GatherBlockQuantized + MatMulNBits on one matrix) and, as a second row,
  in int8_g32 (Q8_0 values, what llama.cpp's Q4_0 policy gives a 576-wide output matrix);
* **builder int4**: ``python -m onnxruntime_genai.models.builder -i MODEL -p int4 -e cpu``;
* **llama.cpp**: llama-cpp-python on dsq's GGUF of the same values as each dsq row (``--type q4_0 --pure``:
  token_embd Q4_0; ``--type q4_0``: llama.cpp's policy, token_embd Q8_0).

Each measurement runs in its own process (``--worker``), runtimes interleaved over ``--rounds`` rounds, with the
load average printed per round (the machine is shared: compare the ratios within a round, not across runs).
ONNX folders are driven by onnxruntime-genai (the runtime they are made for; past/present buffers shared where the
graph allows): prefill tokens/s (appending the prompt, best of 3) and decode tokens/s (``--decode`` greedy steps),
plus decode CPU ms/token. llama.cpp computes every prompt position's logits (logits_all), as the ONNX graphs do.
KL(bf16 reference || runtime) and top-1 agreement over ``--kl-tokens`` tokens of held-out text (one forward pass;
ONNX through onnxruntime directly), file sizes of each model.

    .venv/bin/python bench/onnx_bench.py [--work DIR] [--rounds 3] [--threads 2] [--synthetic]

``--synthetic`` instead runs the older speed table on a random Qwen2-0.5B-bodied model (part A below).
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

SMOLLM = Path.home() / ".cache/dsq/default-model/smollm2-135m-instruct-perm0-bf16"
EVAL_TEXT = Path(__file__).resolve().parent.parent / "calib_data" / "heldout.txt"
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


# -- the comparison ---------------------------------------------------------------------------------------
def kl_stats(ref: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(P_ref || P) over positions, and top-1 agreement."""
    def logsoftmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lp = logsoftmax(ref), logsoftmax(logits)
    kl = (np.exp(lr) * (lr - lp)).sum(-1)
    return float(kl.mean()), float((ref.argmax(-1) == logits.argmax(-1)).mean())


def _genai_model(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def genai_speed(folder: Path, prompt: list[int], n: int, threads: int) -> dict:
    """Prefill (best of 3 fresh generators) and decode speed of an ONNX folder under onnxruntime-genai."""
    import onnxruntime_genai as og

    model = _genai_model(folder, threads)
    best = float("inf")
    for _ in range(3):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(np.array([prompt], np.int32))
        best = min(best, time.perf_counter() - t)
    t, c, k = time.perf_counter(), time.process_time(), 0
    while not gen.is_done():
        gen.generate_next_token()
        k += 1
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"prefill_tok_s": len(prompt) / best, "decode_tok_s": k / wall, "decode_cpu_ms": 1e3 * cpu / k}


def llama_speed(gguf: Path, prompt: list[int], n: int, threads: int) -> dict:
    from llama_cpp import Llama
    from llamacpp_tools import greedy_decode

    llm = Llama(str(gguf), n_ctx=len(prompt) + n + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=len(prompt), logits_all=True, verbose=False)
    best = float("inf")
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best = min(best, time.perf_counter() - t)
    wall, cpu = greedy_decode(llm, n)
    return {"prefill_tok_s": len(prompt) / best, "decode_tok_s": n / wall, "decode_cpu_ms": 1e3 * cpu / n}


def onnx_logits(folder: Path, ids: list[int], threads: int) -> np.ndarray:
    s = ort_session(folder, threads)
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    s._dsq_head_size = cfg["head_size"]
    return ort_logits(s, ids)


def llama_logits(gguf: Path, ids: list[int], threads: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=len(ids) + 8, n_threads=threads, n_batch=len(ids), n_ubatch=len(ids),
                logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


def worker(args) -> None:
    """One measurement in this process; prints one JSON line."""
    spec = json.loads(args.worker)
    path, kind = Path(spec["path"]), spec["kind"]
    prompt, out = spec["prompt"], {}
    if spec.get("kl_ids"):
        ids = spec["kl_ids"]
        logits = onnx_logits(path, ids, args.threads) if kind == "onnx" else llama_logits(path, ids, args.threads)
        out["kl"], out["top1"] = kl_stats(np.load(spec["ref"]), logits)
    speed = genai_speed if kind == "onnx" else llama_speed
    out.update(speed(path, prompt, args.decode, args.threads))
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(spec: dict, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(args.threads),
           "--decode", str(args.decode)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
        raise RuntimeError(f"worker {spec['path']} failed: {res.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1][7:])


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("model.onnx*"))


def prepare(work: Path, model: Path) -> dict[str, tuple[str, Path]]:
    """label -> (kind, path) for every runtime under test, building what is missing."""
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.export.gguf_writer import export_gguf
    from dsq.export.onnx_export import export_onnx

    q = work / "smol-int4"
    if not q.exists():
        step("dsq quantize int4", lambda: quantize_checkpoint(model, q, "int4"))
    runs = {}
    for head, gguf_args in (("int4_sym_g32", {"type": "q4_0", "pure": True}), ("int8_g32", {"type": "q4_0"})):
        tag = head.split("_")[0]
        d = work / f"smol-dsq-int4-head-{tag}"
        if not d.exists():
            step(f"dsq export onnx (lm_head {head})", lambda d=d, head=head: export_onnx(q, d, lm_head=head))
        g = work / f"smol-dsq-int4-head-{tag}.gguf"
        if not g.exists():
            step(f"dsq export gguf {gguf_args}", lambda g=g, a=gguf_args: export_gguf(q, g, **a))
        runs[f"dsq ONNX, head {tag}"] = ("onnx", d)
        runs[f"llama.cpp, head {tag}"] = ("gguf", g)
    builder = work / "smol-genai-builder-int4"
    if not builder.exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(builder),
               "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")]
        with open(work / "builder.log", "w") as fh:
            step("onnxruntime-genai builder -p int4 -e cpu", lambda: subprocess.run(cmd, stdout=fh, stderr=fh, check=True))
    runs["genai builder int4"] = ("onnx", builder)
    return runs


def compare(work: Path, args) -> dict:
    import os

    import transformers
    from tokenizers import Tokenizer

    model = args.model
    log(f"== {model.name}: dsq int4 ONNX vs onnxruntime-genai builder vs llama.cpp, {args.threads} threads ==")
    runs = prepare(work, model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tok.encode(args.eval_text.read_text()).ids[: args.kl_tokens]
    ref_file = work / f"ref-{len(ids)}.npy"
    if not ref_file.exists():
        m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        with torch.no_grad():
            np.save(ref_file, m(torch.tensor([ids])).logits[0].numpy())
        del m
    prompt = ids[: args.prompt]
    rounds: list[dict[str, dict]] = []
    quality: dict[str, dict] = {}
    for r in range(args.rounds):
        load = os.getloadavg()
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # alternate the order: no runtime always goes first
        res = {}
        for label in order:
            kind, path = runs[label]
            spec = {"kind": "onnx" if kind == "onnx" else "gguf", "path": str(path), "prompt": prompt}
            if r == 0:
                spec.update(kl_ids=ids, ref=str(ref_file))
            res[label] = run_worker(spec, args)
            if r == 0:
                quality[label] = {"kl": res[label]["kl"], "top1": res[label]["top1"], "bytes": size_of(path)}
        rounds.append(res)
        log(f"  round {r + 1}: load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; decode tok/s "
            + ", ".join(f"{k} {v['decode_tok_s']:.1f}" for k, v in res.items()))

    def med(label: str, key: str) -> float:
        return float(np.median([rd[label][key] for rd in rounds]))

    def ratio(a: str, b: str, key: str) -> float:  # the median of per-round ratios: both ran under the same load
        return float(np.median([rd[a][key] / rd[b][key] for rd in rounds]))

    log(f"\n  {'runtime':<22}{'MB':>8}{'KL':>9}{'top-1':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'decode CPU ms/tok':>19}")
    for label in runs:
        qd = quality[label]
        log(f"  {label:<22}{qd['bytes'] / 1e6:>8.1f}{qd['kl']:>9.4f}{qd['top1']:>8.3f}{med(label, 'prefill_tok_s'):>15.1f}"
            f"{med(label, 'decode_tok_s'):>14.1f}{med(label, 'decode_cpu_ms'):>19.2f}")
    b = "genai builder int4"
    summary = {}
    for tag in ("int4", "int8"):
        d, ll = f"dsq ONNX, head {tag}", f"llama.cpp, head {tag}"
        summary[tag] = {
            "decode_vs_builder": ratio(d, b, "decode_tok_s"), "decode_vs_llama": ratio(d, ll, "decode_tok_s"),
            # CPU time per token: what a loaded machine distorts least (the other's CPU ms over ours: >1 is faster)
            "decode_cpu_vs_builder": ratio(b, d, "decode_cpu_ms"), "decode_cpu_vs_llama": ratio(ll, d, "decode_cpu_ms"),
            "prefill_vs_builder": ratio(d, b, "prefill_tok_s"), "prefill_vs_llama": ratio(d, ll, "prefill_tok_s"),
            "size_vs_builder": quality[d]["bytes"] / quality[b]["bytes"], "kl_vs_builder": quality[d]["kl"] / quality[b]["kl"],
        }
        s_ = summary[tag]
        log(f"  dsq head {tag}: decode x{s_['decode_vs_builder']:.2f} builder, x{s_['decode_vs_llama']:.2f} llama.cpp "
            f"(by CPU time/token x{s_['decode_cpu_vs_builder']:.2f}, x{s_['decode_cpu_vs_llama']:.2f}); "
            f"prefill x{s_['prefill_vs_builder']:.2f} builder, x{s_['prefill_vs_llama']:.2f} llama.cpp; "
            f"size x{s_['size_vs_builder']:.3f} builder; KL x{s_['kl_vs_builder']:.2f} builder")
    return {"model": str(model), "threads": args.threads, "prompt": len(prompt), "decode": args.decode,
            "kl_tokens": len(ids), "quality": quality, "rounds": rounds, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/dsq-bench/onnx")
    ap.add_argument("--model", type=Path, default=SMOLLM)
    ap.add_argument("--eval-text", type=Path, default=EVAL_TEXT)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--kl-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--synthetic", action="store_true", help="the older synthetic speed table (part A) instead")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    out = part_a(args.work, args) if args.synthetic else compare(args.work, args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
