"""Where an ONNX decoder's decode step spends its time: onnxruntime's per-op profile, and session-option A/B.

For each ONNX folder given (and each ``.gguf``, run by llama.cpp through llama-cpp-python with the same prompt,
threads and steps: the reference) (dsq's export, onnxruntime-genai's builder output, ...) this runs, in its own process
(``--worker``), a prompt prefill then ``--decode`` single-token steps with past and present bound to one
preallocated buffer per cache tensor (GroupQueryAttention graphs, as onnxruntime-genai's past_present_share_buffer;
graphs without it get the usual present -> past feed), and reports:

* decode CPU ms/token and wall ms/token (process CPU time: what a shared machine distorts least);
* with ``--profile``: onnxruntime's profiler (``SessionOptions.enable_profiling``) summed per op type over the
  decode steps only (the prefill run is left out), as % of the summed kernel time and µs/token;
* ``--variants``: session-option variants, e.g. ``spin0`` (``session.intra_op.allow_spinning=0``), ``basic``
  (ORT_ENABLE_BASIC), ``noprepack`` (``session.disable_prepacking=1``), ``run`` (plain ``InferenceSession.run``
  feeding present back as past instead of IOBinding on a shared buffer), ``genai`` (onnxruntime-genai's own
  generator loop on the folder), ``dsq`` (dsq's onnxruntime runtime: ``OnnxRuntime.prefill`` / ``decode``),
  ``dsq-installed`` (the same with PYTHONPATH unset: the installed dsq, e.g. main, for a before/after).

Variants and folders are interleaved over ``--rounds`` rounds; the load average is printed per round.

    .venv/bin/python bench/onnx_profile.py DIR [DIR ...] [--threads 1] [--profile] [--variants base,spin0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

VARIANTS = ("base", "spin0", "spin1", "basic", "noprepack", "run", "genai", "dsq", "dsq-installed")


def session(folder: Path, threads: int, variant: str, profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if variant == "basic"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if variant in ("spin0", "spin1"):
        so.add_session_config_entry("session.intra_op.allow_spinning", variant[-1])
    if variant == "noprepack":
        so.add_session_config_entry("session.disable_prepacking", "1")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


class Stepper:
    """Prefill + decode steps on one session: shared past/present buffers through IOBinding (``shared``), or
    ``session.run`` feeding each step's present back as the next past."""

    def __init__(self, sess, folder: Path, capacity: int, shared: bool):
        import onnxruntime as ort

        self.sess, self.ort, self.shared = sess, ort, shared
        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        ins = {i.name: i for i in sess.get_inputs()}
        self.has_pos = "position_ids" in ins
        self.past = []
        for name, i in ins.items():
            if name.startswith("past_key_values."):
                heads = i.shape[1] if isinstance(i.shape[1], int) else cfg["num_key_value_heads"]
                dim = i.shape[3] if isinstance(i.shape[3], int) else cfg["head_size"]
                self.past.append((name, name.replace("past_key_values.", "present."), heads, dim))
        self.outs = ["logits"] + [p[1] for p in self.past]
        self.cap = capacity
        if shared:
            self.kv = {n: np.zeros((1, h, capacity, d), np.float32) for n, _, h, d in self.past}
            self.vals = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.kv.items()}
        self.cache = None

    def step(self, ids: list[int], start: int) -> int:
        total = start + len(ids)
        if self.shared:
            b = self.sess.io_binding()
            b.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
            b.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            if self.has_pos:
                b.bind_cpu_input("position_ids", np.arange(start, total, dtype=np.int64)[None])
            b.bind_output("logits")
            for n, o, _, _ in self.past:
                b.bind_ortvalue_input(n, self.vals[n])
                b.bind_ortvalue_output(o, self.vals[n])
            self.sess.run_with_iobinding(b)
            return int(b.get_outputs()[0].numpy()[0, -1].argmax())
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        if self.has_pos:
            feed["position_ids"] = np.arange(start, total, dtype=np.int64)[None]
        for n, _, h, d in self.past:
            feed[n] = self.cache[n] if self.cache else np.zeros((1, h, 0, d), np.float32)
        out = self.sess.run(self.outs, feed)
        self.cache = {p[0]: o for p, o in zip(self.past, out[1:], strict=True)}
        return int(out[0][0, -1].argmax())


def _shares(folder: Path) -> bool:
    try:
        return json.loads((folder / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    except (OSError, KeyError, ValueError):
        return False


def op_table(profile_file: str) -> dict[str, float]:
    """{op type: summed kernel µs} over every model_run after the first (the prefill), plus ``(model_run)``: the
    runs' own summed duration (kernels + onnxruntime's scheduling between them)."""
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    if len(runs) < 2:
        return {}
    start = runs[1][0]
    acc: dict[str, float] = defaultdict(float)
    acc["(model_run)"] = sum(d for _, d in runs[1:])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            acc[e["args"].get("op_name", "?")] += e["dur"]
    return dict(acc)


def llama_worker(gguf: Path, prompt: list[int], n: int, threads: int) -> dict:
    """llama.cpp (llama-cpp-python) on a GGUF: the same prompt, one warm-up step, then ``n`` greedy steps."""
    from llama_cpp import Llama
    from llamacpp_tools import greedy_decode

    llm = Llama(str(gguf), n_ctx=len(prompt) + n + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=len(prompt), logits_all=True, verbose=False)  # scores[n_tokens - 1] is the last row
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([tok])  # the warm-up step
    wall, cpu = greedy_decode(llm, n)
    return {"decode_cpu_ms": 1e3 * cpu / n, "decode_wall_ms": 1e3 * wall / n}


def genai_worker(folder: Path, prompt: list[int], n: int, threads: int) -> dict:
    """onnxruntime-genai's generator on the folder: prompt appended, one warm-up step, then ``n`` greedy steps."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n + 1, min_length=len(prompt) + n + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    gen.generate_next_token()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        gen.generate_next_token()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"decode_cpu_ms": 1e3 * cpu / n, "decode_wall_ms": 1e3 * wall / n}


def worker(spec: dict) -> dict:
    folder, variant, threads = Path(spec["folder"]), spec["variant"], spec["threads"]
    prompt, n = spec["prompt"], spec["decode"]
    if folder.suffix == ".gguf":
        return llama_worker(folder, prompt, n, threads)
    if variant == "genai":
        return genai_worker(folder, prompt, n, threads)
    if variant in ("dsq", "dsq-installed"):
        from dsq.runtimes.onnxruntime_runtime import OnnxRuntime

        rt = OnnxRuntime.load(folder, threads=threads, n_ctx=len(prompt) + n + 2)
        tok = int(rt.prefill(prompt).argmax())
        tok = int(rt.decode(tok).argmax())
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            tok = int(rt.decode(tok).argmax())
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        return {"decode_cpu_ms": 1e3 * cpu / n, "decode_wall_ms": 1e3 * wall / n}
    prof = spec.get("profile")
    sess = session(folder, threads, variant, prof)
    st = Stepper(sess, folder, len(prompt) + n + 1, _shares(folder) and variant != "run")
    tok = st.step(prompt, 0)
    tok = st.step([tok], len(prompt))  # one warm-up decode step (first-call allocations)
    pos = len(prompt) + 1
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        tok = st.step([tok], pos)
        pos += 1
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    out = {"decode_cpu_ms": 1e3 * cpu / n, "decode_wall_ms": 1e3 * wall / n}
    if prof:
        f = sess.end_profiling()
        ops = op_table(f)
        os.unlink(f)
        out["ops_us_per_token"] = {k: v / (n + 1) for k, v in ops.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--profile", action="store_true", help="also one profiled run per folder (op table)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 40000, args.prompt)]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: {v} is not one of {', '.join(VARIANTS)}")

    def run(folder: Path, variant: str, profile: str | None = None) -> dict:
        spec = {"folder": str(folder), "variant": variant, "threads": args.threads, "prompt": prompt,
                "decode": args.decode, "profile": profile}
        env = {k: v for k, v in os.environ.items() if not (variant == "dsq-installed" and k == "PYTHONPATH")}
        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                           env=env)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not lines:
            raise RuntimeError(f"{folder} {variant}: {r.stderr.strip().splitlines()[-3:]}")
        return json.loads(lines[-1][7:])

    def variants_of(f: Path) -> list[str]:
        if f.suffix == ".gguf":
            return ["llama.cpp"]
        # the dsq runtime reads only folders with fixed cache head sizes (dsq's own exports)
        return [v for v in variants if not v.startswith("dsq") or (f / "onnx-report.json").is_file()]

    keys = [(f, v) for f in args.folders for v in variants_of(f)]
    res: dict[tuple, list[dict]] = defaultdict(list)
    for r in range(args.rounds):
        load = os.getloadavg()
        order = keys if r % 2 == 0 else keys[::-1]
        for k in order:
            res[k].append(run(*k))
        print(f"round {r + 1} load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}: "
              + ", ".join(f"{f.name}/{v} {res[(f, v)][-1]['decode_cpu_ms']:.2f}" for f, v in keys), flush=True)
    print(f"\n{args.threads} thread(s), prompt {args.prompt}, {args.decode} decode steps; medians over {args.rounds} rounds")
    print(f"{'folder':<40}{'variant':<11}{'CPU ms/tok':>11}{'wall ms/tok':>12}")
    for f, v in keys:
        cpu = np.median([x["decode_cpu_ms"] for x in res[(f, v)]])
        wall = np.median([x["decode_wall_ms"] for x in res[(f, v)]])
        print(f"{f.name:<40}{v:<11}{cpu:>11.2f}{wall:>12.2f}")
    if args.profile:
        for f in (f for f in args.folders if f.suffix != ".gguf"):
            ops = run(f, variants[0], f"/tmp/ortprof-{os.getpid()}")["ops_us_per_token"]
            run_us = ops.pop("(model_run)")
            total = sum(ops.values())
            print(f"\n{f.name}: model_run {run_us / 1e3:.2f} ms/token, of which kernels {total / 1e3:.2f}")
            for op, us in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {op:<36}{us:>10.0f} µs/token {100 * us / total:>6.1f} %")


if __name__ == "__main__":
    main()
