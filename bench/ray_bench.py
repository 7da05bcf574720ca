"""Local vs Ray (1 and 2 worker CPUs) on a DeepSeek-V3-shaped checkpoint (issue 15).

Builds the checkpoint with make_v3_shaped.py (real counts: 61 layers, 256+1 experts, 163 shards) at
``--scale`` (32: ~0.7 GB of FP8 at 61 layers), quantizes it once per mode (local; local1: local with one
torch thread; ray1/ray2: a Ray cluster of 1 or 2 CPUs), each in a fresh process, and prints a table:
wall seconds, the driver process's CPU seconds, the CPU seconds measured inside the Ray tasks, the
driver's and the largest worker's peak RSS, the number of tasks, and the load average around each
run. It checks every output shard is the same bytes as the first mode's, and writes the measured
per-unit costs (worker seconds per input byte, by unit kind) as JSON (``--json``).

    python bench/ray_bench.py /tmp/v3-s32 --scale 32 --recipe int4 --json bench-ray.json

``--method gptq|awq|imatrix``: a calibrated run (``--samples`` x ``--seqlen`` tokens of ``--calib``).
Its modes default to local1, ray1, ray2: the driver runs one torch thread in every mode (and each Ray
task one, ``--task-cpus 1``), so the Ray outputs must be the same bytes as local1's. CPU seconds are
the driver process's plus, for Ray, the CPU seconds measured inside the tasks; peak RSS is the
driver's and the largest worker's.

    python bench/ray_bench.py /tmp/v3-s32 --scale 32 --layers 8 --method gptq --samples 16 --seqlen 128
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_v3_shaped import make_v3_shaped  # noqa: E402


def _kind(key: str) -> str:
    m = re.match(r"layer \d+ (expert|shared expert|mlp|attention)", key)
    return m.group(1) if m else "alone"


def run_mode(mode: str, src: str, out: str, recipe: str, calib: dict | None = None) -> dict:
    """One quantization in this process; returns its measurements. ``calib``: CalibSpec fields (a
    calibrated run), else RTN."""
    from dsq.dsquant.quantize import quantize_checkpoint

    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    ex = None
    spec = None
    if calib:
        from dsq.dsquant.calib.hook import CalibSpec

        spec = CalibSpec(**calib)
    if mode == "local1" or (calib and mode.startswith("ray")):  # one torch thread, as each Ray task runs
        import torch

        torch.set_num_threads(1)
    if mode.startswith("ray"):
        import ray

        from dsq.dsquant.ray_executor import RayExecutor

        ray.init(num_cpus=int(mode[3:]), include_dashboard=False, log_to_driver=False)
        t0, c0 = time.perf_counter(), time.process_time()  # cluster start-up is not the executor's cost
        ex = RayExecutor()
    report = quantize_checkpoint(src, out, recipe, executor=ex, calibration=spec)
    res = {
        "mode": mode,
        "wall_s": time.perf_counter() - t0,
        "driver_cpu_s": time.process_time() - c0,
        "load_before": load0,
        "load_after": os.getloadavg(),
        "bytes_in": report["summary"]["bytes_in"],
        "bytes_out": report["summary"]["bytes_out"],
        "tensors": report["summary"]["tensors"],
    }
    res["driver_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if ex is None:
        res["worker_s"] = res["driver_cpu_s"]
        res["peak_rss"] = res["driver_rss"]
    elif ex.calib is not None:  # calibrated: the pool's tasks
        import ray

        res["worker_s"] = sum(v["cpu_s"] for v in ex.calib.nodes.values())
        res["peak_rss"] = max(v["max_rss"] for v in ex.calib.nodes.values())
        res["units"] = ex.calib.tasks
        res["task_memory_request"] = ex.calib.max_task_memory
        ray.shutdown()
    else:
        import ray

        res["worker_s"] = sum(v["cpu_s"] for v in ex.nodes.values())
        res["peak_rss"] = max(v["max_rss"] for v in ex.nodes.values())
        res["units"] = ex.units_total
        # per-unit cost by kind: worker seconds per GB of input, from the units this run measured
        from dsq.dsquant.checkpoint import Checkpoint
        from dsq.dsquant.plan import make_plan
        from dsq.dsquant.ray_executor import unit_key
        from dsq.dsquant.recipes import load_recipe

        plan = make_plan(Checkpoint(src), load_recipe(recipe))
        unit_bytes: dict[str, int] = {}
        for e in plan.entries:
            t = e.tensor
            unit_bytes[unit_key(e)] = unit_bytes.get(unit_key(e), 0) + t.info.nbytes + (t.scale_info.nbytes if t.scale_info else 0)
        costs: dict[str, list[float]] = {}
        for key, s in ex.unit_seconds.items():
            c = costs.setdefault(_kind(key), [0, 0.0, 0])
            c[0] += unit_bytes[key]
            c[1] += s
            c[2] += 1
        res["unit_costs"] = {k: {"units": n, "bytes": b, "seconds": s, "s_per_gb": s / (b / 1e9)}
                             for k, (b, s, n) in costs.items()}
        ray.shutdown()
    return res


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="folder for the checkpoint and the outputs")
    ap.add_argument("--scale", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--recipe", default="int4")
    ap.add_argument("--modes", default=None, help="default: local,local1,ray1,ray2 (calibrated: local1,ray1,ray2)")
    ap.add_argument("--method", default="rtn", help="rtn, or calibrated: gptq, awq, imatrix")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--calib", default=str(Path(__file__).resolve().parents[1] / "calib_data" / "prose.txt"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_one", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    calib = None if a.method == "rtn" else {"method": a.method, "calib": a.calib, "samples": a.samples, "seqlen": a.seqlen}
    modes = (a.modes or ("local,local1,ray1,ray2" if calib is None else "local1,ray1,ray2")).split(",")
    if a._one:
        print(json.dumps(run_mode(a._one[0], a._one[1], a._one[2], a.recipe, calib)))
        return
    src = a.work / f"v3-scale{a.scale}-{a.layers or 61}"
    if not (src / "config.json").is_file():
        make_v3_shaped(src, a.scale, a.layers)
    rows = []
    extra = ["--method", a.method, "--samples", str(a.samples), "--seqlen", str(a.seqlen), "--calib", a.calib]
    for mode in modes:
        out = a.work / f"out-{a.method}-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run([sys.executable, __file__, str(a.work), "--recipe", a.recipe, *extra, "--_one", mode, str(src),
                            str(out)], capture_output=True, text=True, check=False)
        if r.returncode:
            sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        rows[-1]["identical_to_local"] = _digests(out) == _digests(a.work / f"out-{a.method}-{modes[0]}")
    print(f"{src.name}: {rows[0]['tensors']} tensors, {rows[0]['bytes_in'] / 1e9:.2f} GB in (as bf16) -> "
          f"{rows[0]['bytes_out'] / 1e9:.2f} GB, recipe {a.recipe}, method {a.method}"
          + (f" on {a.samples}x{a.seqlen} tokens" if calib else ""))
    print(f"| mode | wall s | driver CPU s | worker CPU s | driver RSS MB | peak worker RSS MB | tasks | same bytes as {modes[0]} "
          "| load before/after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {r['driver_cpu_s']:.1f} | "
              f"{r['worker_s'] - (r['driver_cpu_s'] if r['mode'].startswith('local') else 0):.1f} | "
              f"{r['driver_rss'] / 2**20:.0f} | {r['peak_rss'] / 2**20 if r['mode'].startswith('ray') else 0:.0f} | "
              f"{r.get('units', '-')} | {r['identical_to_local']} | {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")
    for r in rows:
        for k, c in sorted(r.get("unit_costs", {}).items()):
            print(f"  {r['mode']} {k}: {c['units']} units, {c['bytes'] / 1e6:.1f} MB, {c['s_per_gb']:.1f} worker s/GB")
    if a.json:
        a.json.write_text(json.dumps({"checkpoint": src.name, "scale": a.scale, "recipe": a.recipe, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
