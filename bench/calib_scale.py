#!/usr/bin/env python3
"""Calibration at 7B widths: GPTQ / AWQ / imatrix per-layer seconds, CPU seconds and peak RSS on an N-layer
copy of the 7B-shaped checkpoint, and the extrapolation to all of its layers.

    flock /tmp/dsq-bench.lock .venv/bin/python bench/calib_scale.py --layers 2 --methods gptq,imatrix,awq

The checkpoint (``--checkpoint``, default the one ``bench/real_scale.py`` builds) is trimmed to ``--layers``
decoder layers plus embedding, final norm and lm_head (real_scale's ``trimmed()``). Each method runs
``dsq quantize --recipe int4 --method M`` (``quantize_checkpoint``: calibration, then the writer reading the
calibrated tensors back from disk) in its own child process, which reports per layer the wall and CPU
seconds (process time, all threads) and the ETA the progress bar showed after each layer; the parent adds
the child's peak RSS (VmHWM). Extrapolation to the full depth: the fixed part (everything outside the
layers) plus the full model's layer count times the *last* layer's time (layer 0 includes warm-up).

Measured 2026-11-30 (calib7b branch; 2-core Zen4 shared with other jobs, 1-min load 3-4; 128x512 tokens;
bfloat16 forwards, drift off, as ``CalibOptions()`` resolves at this size):

| method | layers | s/layer wall | CPU s/layer | peak RSS | 28 layers, extrapolated |
|---|---|---|---|---|---|
| gptq | 2 | 502, 555 | 682, 671 | 5.60 GiB | 4.3 h wall at that load (5.2 CPU-h; ~2.6 h if both cores were ours) |
| imatrix | 1 | 491 | 499 | 4.54 GiB | 3.8 h wall (3.9 CPU-h) |
| awq | 1 | 497 | 963 | 6.66 GiB | 3.9 h wall (7.5 CPU-h; the scale search's float32 products over 4096 rows) |

The two forwards (2 x 30 TFLOP in bfloat16, ~175 GFLOP/s on this loaded box) are most of every method's
layer; GPTQ adds the float32 X^T X sums (~33 TFLOP over 4 distinct inputs, down_proj's 18944 columns
dominating) and ~1 min of inverse factor + column sweep. ETA shown after layer 0: 502 s for layer 1, which
took 555 s (-5 % on the finish).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import HWM_WRAPPER  # noqa: E402
from real_scale import CKPT_NAME, trimmed  # noqa: E402

CHILD = r"""
import json, sys, time, io
import torch
from dsq.dsquant.calib.hook import CalibSpec
from dsq.dsquant.calib.methods import CalibOptions
from dsq.dsquant.progress import Reporter
from dsq.dsquant.quantize import quantize_checkpoint

src, out, method, samples, seqlen, calib, result = sys.argv[1:8]
rows = []
reporter = Reporter("calibrate", "layers", stream=io.StringIO(), tty=False)
t0, c0 = time.perf_counter(), time.process_time()

def progress(done, total, detail):
    reporter.update(done, total, detail)
    rows.append({"done": done, "total": total, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                 "eta": reporter.eta()})

spec = CalibSpec(method, calib, int(samples), int(seqlen), options=CalibOptions())
report = quantize_checkpoint(src, out, "int4", overwrite=True, calibration=spec, calib_progress=progress)
cal = report["calibration"]
json.dump({"progress": rows, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
           "layers": cal["layers"], "threads": torch.get_num_threads()}, open(result, "w"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/r1distill") / CKPT_NAME)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsq-calib-scale"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--methods", default="gptq,imatrix,awq")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default=str(Path.home() / ".cache" / "dsq-bench" / "calib_mixed.txt"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    full_layers = json.loads((a.checkpoint / "config.json").read_text())["num_hidden_layers"]
    src = trimmed(a.checkpoint, a.layers, a.work)
    rows = []
    for method in a.methods.split(","):
        out, res, hwm = a.work / f"q-{method}", a.work / f"{method}.json", a.work / f".hwm-{method}"
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", HWM_WRAPPER, str(hwm), "code", CHILD, str(src), str(out), method,
                               str(a.samples), str(a.seqlen), a.calib, str(res)],
                              env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"{method}: exit {proc.returncode}")
        r = json.loads(res.read_text())
        prog = [p for p in r["progress"] if p["done"] > 0]
        per_wall = [b["wall"] - a_["wall"] for a_, b in pairwise(r["progress"])]
        per_cpu = [b["cpu"] - a_["cpu"] for a_, b in pairwise(r["progress"])]
        fixed_wall, fixed_cpu = r["wall"] - sum(per_wall), r["cpu"] - sum(per_cpu)
        row = {
            "method": method, "layers": a.layers, "tokens": a.samples * a.seqlen, "threads": r["threads"],
            "layer_wall_s": [round(x, 1) for x in per_wall], "layer_cpu_s": [round(x, 1) for x in per_cpu],
            "rel_err": [round(x["rel_err"], 4) for x in r["layers"]],
            "eta_after_layer": [None if p["eta"] is None else round(p["eta"], 1) for p in prog],
            "fixed_wall_s": round(fixed_wall, 1), "fixed_cpu_s": round(fixed_cpu, 1),
            "child_wall_s": round(wall, 1), "peak_rss_gib": round(int(hwm.read_text()) / 1024**3, 2),
            f"extrapolated_{full_layers}_layers_wall_h": round((fixed_wall + full_layers * per_wall[-1]) / 3600, 2),
            f"extrapolated_{full_layers}_layers_cpu_h": round((fixed_cpu + full_layers * per_cpu[-1]) / 3600, 2),
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        hwm.unlink(missing_ok=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
