"""``dsq bench``: prefill and decode speed, time to first token, peak memory, per model and runtime.

Each run prefills the same prompt of ``prompt_tokens`` tokens, then decodes exactly ``new_tokens``
tokens greedily (EOS ignored, so every run does the same work). Warm-up runs are discarded; the
reported figures are medians over the measured runs. Peak RSS is sampled every 5 ms by a thread
during load and runs, so it is the process's peak while this model was in use.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .base import file_size

# Text the benchmark prompt is cut from (repeated as needed), so prompts are real words in every tokenizer.
_PROMPT_TEXT = (
    "The history of computing is a story of abstractions built on top of one another. Early machines were "
    "programmed by rewiring panels; later, stored programs let the same hardware run many tasks. Compilers "
    "translated readable code into instructions, operating systems shared one processor among many users, "
    "and networks connected machines across continents. "
)


@dataclass
class BenchResult:
    model: str
    runtime: str
    description: str
    file_size: int
    threads: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    warmup: int
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    peak_rss_mb: float
    samples: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class _PeakRSS:
    """Samples this process's resident set size in a background thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def prompt_ids(rt, n: int) -> list[int]:
    ids = rt.tokenize(_PROMPT_TEXT)
    while len(ids) < n:
        ids = ids + ids
    head = [rt.bos_id] if rt.add_bos and rt.bos_id is not None else []
    return (head + ids)[:n]


def _one_run(rt, ids: list[int], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    row = rt.prefill(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(row))
    t_first = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = int(np.argmax(rt.decode(tok)))
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "ttft_s": t_first - t0, "decode_s": t2 - t_first}


def bench_model(cls, path: Path, device: str = "cpu", threads: int | None = None, prompt_tokens: int = 128,
                new_tokens: int = 64, runs: int = 3, warmup: int = 1, log=lambda m: None) -> BenchResult:
    if new_tokens < 2 or prompt_tokens < 1 or runs < 1 or warmup < 0:
        from dsq.dsquant.errors import InputError

        raise InputError("--prompt-tokens >= 1, --new-tokens >= 2, --runs >= 1 and --warmup >= 0 are needed")
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        rt = cls.load(Path(path), device, threads=threads, n_ctx=prompt_tokens + new_tokens + 8)
        load_s = time.perf_counter() - t0
        try:
            ids = prompt_ids(rt, prompt_tokens)
            samples = []
            for i in range(warmup + runs):
                log(f"{Path(path).name} [{cls.name}]: {'warm-up' if i < warmup else 'run'} {i + 1}/{warmup + runs}")
                s = _one_run(rt, ids, new_tokens)
                if i >= warmup:
                    samples.append(s)
            desc, used_threads = rt.description, rt.threads or _default_threads()
        finally:
            rt.close()
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    return BenchResult(
        model=str(path), runtime=cls.name, description=desc, file_size=file_size(Path(path)), threads=used_threads,
        prompt_tokens=len(ids), new_tokens=new_tokens, runs=runs, warmup=warmup, load_s=load_s,
        prefill_tok_s=len(ids) / med["prefill_s"], decode_tok_s=(new_tokens - 1) / med["decode_s"],
        ttft_s=med["ttft_s"], peak_rss_mb=mem.peak / 2**20, samples=samples,
    )


def _default_threads() -> int:
    """onnxruntime's default intra-op pool: one thread per physical core."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


BENCH_HEADER = ["model", "runtime", "size", "threads", "prompt", "prefill tok/s", "decode tok/s", "TTFT", "load",
                "peak RSS"]


def bench_rows(results: list[BenchResult]) -> list[list[str]]:
    return [[Path(r.model).name, r.description, f"{r.file_size / 1e6:.1f} MB", str(r.threads), str(r.prompt_tokens),
             f"{r.prefill_tok_s:.1f}", f"{r.decode_tok_s:.1f}", f"{1000 * r.ttft_s:.0f} ms", f"{r.load_s:.2f} s",
             f"{r.peak_rss_mb:.0f} MB"] for r in results]
