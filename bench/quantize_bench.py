#!/usr/bin/env python3
"""Quantize-time and peak-RSS benchmark of ``dsq quantize`` on a synthetic Qwen2-1.5B-shaped checkpoint.

    .venv/bin/python bench/quantize_bench.py                  # 6 layers: ~1.5 GB of bf16, sharded
    .venv/bin/python bench/quantize_bench.py --layers 2 --json /tmp/bench.json

What it does, all in a temporary directory (removed at the end unless ``--keep``):

1. writes a random-weight checkpoint with Qwen2-1.5B's shapes (hidden 1536, intermediate 8960, 12 heads /
   2 kv heads with q/k/v biases, vocab 151936, an untied lm_head) and ``--layers`` decoder layers, as sharded
   bf16 safetensors + index + config.json (model_type qwen2). Tensors are generated and written one at a
   time, so this process never holds the model;
2. measures, each in its own child process (peak RSS from ``os.wait4``'s rusage of that child):
   * ``overhead``: ``python -c "import torch, dsq.dsquant.quantize"``, the fixed cost of any run;
   * ``load-all``: the naive baseline, ``safetensors.torch.load_file`` of every shard, kept in memory;
   * ``dsq quantize -r int4 | int8 | fp8`` (presets: embeddings and lm_head stay bf16), and ``int4+lm_head``,
     a recipe that also quantizes the lm_head so the largest tensor goes through a quantizer;
3. prints wall time, throughput (input bytes / wall time) and peak RSS, and peak RSS against the target
   ``peak <= 1.3 x largest tensor + overhead`` (the largest tensor is the 151936 x 1536 embedding, 467 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dsq.dsquant.safetensors_io import PlannedTensor, SafetensorsWriter

MB = 1024**2
TARGET_FACTOR = 1.3

# Qwen2-1.5B (Qwen/Qwen2-1.5B config.json), except tie_word_embeddings: an untied lm_head makes the
# benchmark see both 467 MB vocab tensors.
QWEN2_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# Per-layer tensors: name -> shape as a function of (hidden, intermediate, kv_dim). Weights are random
# normal * 0.02, norms ones, biases small normals.
LAYER_SHAPES = {
    "input_layernorm.weight": lambda d, f, kv: (d,),
    "self_attn.q_proj.weight": lambda d, f, kv: (d, d),
    "self_attn.q_proj.bias": lambda d, f, kv: (d,),
    "self_attn.k_proj.weight": lambda d, f, kv: (kv, d),
    "self_attn.k_proj.bias": lambda d, f, kv: (kv,),
    "self_attn.v_proj.weight": lambda d, f, kv: (kv, d),
    "self_attn.v_proj.bias": lambda d, f, kv: (kv,),
    "self_attn.o_proj.weight": lambda d, f, kv: (d, d),
    "post_attention_layernorm.weight": lambda d, f, kv: (d,),
    "mlp.gate_proj.weight": lambda d, f, kv: (f, d),
    "mlp.up_proj.weight": lambda d, f, kv: (f, d),
    "mlp.down_proj.weight": lambda d, f, kv: (d, f),
}

INT4_WITH_LM_HEAD = 'base = "int4"\n[roles]\nlm_head = "int4_sym_g32"\n'


@dataclass
class Run:
    name: str
    wall_s: float
    peak_rss: int
    bytes_in: int = 0
    bytes_out: int = 0
    dsq_seconds: float | None = None
    rc: int = 0


def tensor_table(cfg: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, d))]
    for layer in range(layers):
        out += [(f"model.layers.{layer}.{n}", shape(d, f, kv)) for n, shape in LAYER_SHAPES.items()]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return out


def make_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    scale = 0.002 if name.endswith(".bias") else 0.02
    return (torch.randn(shape, generator=gen, dtype=torch.bfloat16) * scale).contiguous()


def write_checkpoint(out: Path, layers: int, shard_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Sharded bf16 safetensors, one tensor in memory at a time. Returns (total bytes, largest tensor bytes)."""
    cfg = dict(QWEN2_1_5B, num_hidden_layers=layers)
    planned = [PlannedTensor(n, torch.bfloat16, s) for n, s in tensor_table(cfg, layers)]
    shards: list[list[PlannedTensor]] = [[]]
    for p in planned:
        if shards[-1] and sum(q.nbytes for q in shards[-1]) + p.nbytes > shard_bytes:
            shards.append([])
        shards[-1].append(p)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(out / fname, shard)
        for p in shard:
            writer.write(p.name, make_tensor(p.name, p.shape, gen))
            weight_map[p.name] = fname
        writer.close()
    total = sum(p.nbytes for p in planned)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total, max(p.nbytes for p in planned)


from measure import HWM_WRAPPER  # noqa: E402 - bench/ is the script's own folder on sys.path


def run_child(name: str, kind: str, target: str, args: list[str], work: Path) -> Run:
    """Wall time and peak RSS (VmHWM) of ``python -m target args`` or ``python -c target args``."""
    hwm = work / f".hwm-{os.getpid()}"
    argv = [sys.executable, "-c", HWM_WRAPPER, str(hwm), kind, target, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(
            f"[{name}] exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}",
            file=sys.stderr,
        )
    peak = int(hwm.read_text()) if hwm.is_file() else 0
    hwm.unlink(missing_ok=True)
    return Run(name, wall, peak, rc=proc.returncode)


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


LOAD_ALL = (
    "import sys, glob\n"
    "from safetensors.torch import load_file\n"
    "sd = {}\n"
    "for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')):\n"
    "    sd.update(load_file(f))\n"
    "import torch\n"
    "# load_file maps the file lazily; touch every tensor as any consumer would (a reduction, no copy)\n"
    "print(sum(float(torch.sum(t)) for t in sd.values()))\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6, help="decoder layers (6: ~1.5 GB of bf16)")
    ap.add_argument("--shard-mb", type=int, default=1024, help="input shard size")
    ap.add_argument("--recipes", nargs="+", default=["int4", "int8", "fp8", "int4+lm_head"])
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the temporary checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dsq-bench-", dir=a.workdir))
    try:
        src = work / "qwen2-synthetic"
        src.mkdir()
        t0 = time.perf_counter()
        total, largest = write_checkpoint(src, a.layers, a.shard_mb * MB)
        print(
            f"checkpoint: {a.layers} layers, {total / MB:.0f} MiB bf16 in {len(list(src.glob('*.safetensors')))} "
            f"shards, largest tensor {largest / MB:.0f} MiB; written in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        runs = [run_child("overhead", "-c", "import torch, dsq.dsquant.quantize", [], work)]
        base = run_child("load-all", "-c", LOAD_ALL, [str(src)], work)
        base.bytes_in = total
        runs.append(base)
        (work / "int4+lm_head.toml").write_text(INT4_WITH_LM_HEAD)
        for recipe in a.recipes:
            out = work / f"out-{recipe}"
            spec = str(work / f"{recipe}.toml") if (work / f"{recipe}.toml").is_file() else recipe
            r = run_child(
                f"dsq {recipe}", "-m", "dsq.cli", ["quantize", str(src), "-o", str(out), "-r", spec], work
            )
            r.bytes_in = total
            if r.rc == 0:
                r.bytes_out = dir_bytes(out)
                r.dsq_seconds = json.loads((out / "dsq-report.json").read_text())["summary"]["seconds"]
            runs.append(r)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
            print(f"  {r.name}: {r.wall_s:.1f} s, peak RSS {r.peak_rss / MB:.0f} MiB", flush=True)
        report(runs, total, largest, a.layers)
        if a.json:
            a.json.write_text(
                json.dumps(
                    {
                        "layers": a.layers,
                        "bytes_in": total,
                        "largest_tensor": largest,
                        "runs": [asdict(r) for r in runs],
                    },
                    indent=2,
                )
            )
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(runs: list[Run], total: int, largest: int, layers: int) -> None:
    overhead = runs[0].peak_rss
    limit = overhead + TARGET_FACTOR * largest
    print(
        f"\nsynthetic Qwen2-1.5B shapes, {layers} layers, {total / MB:.0f} MiB bf16 in; largest tensor "
        f"{largest / MB:.0f} MiB; fixed overhead (import torch + dsq) {overhead / MB:.0f} MiB; "
        f"target peak <= {TARGET_FACTOR} x largest + overhead = {limit / MB:.0f} MiB\n"
    )
    head = f"{'run':<18}{'wall s':>8}{'dsq s':>8}{'MiB/s':>8}{'out MiB':>9}{'peak RSS MiB':>13}{'(peak-ovh)/largest':>20}  target"
    print(head)
    print("-" * len(head))
    for r in runs:
        mbps = f"{r.bytes_in / MB / r.wall_s:.0f}" if r.bytes_in else "-"
        dsq_s = f"{r.dsq_seconds:.1f}" if r.dsq_seconds is not None else "-"
        out = f"{r.bytes_out / MB:.0f}" if r.bytes_out else "-"
        ratio = (r.peak_rss - overhead) / largest
        ok = "-" if r.name == "overhead" else ("ok" if r.peak_rss <= limit else "OVER")
        if r.rc:
            ok = f"failed rc={r.rc}"
        print(
            f"{r.name:<18}{r.wall_s:>8.1f}{dsq_s:>8}{mbps:>8}{out:>9}{r.peak_rss / MB:>13.0f}{ratio:>20.2f}  {ok}"
        )


if __name__ == "__main__":
    main()
