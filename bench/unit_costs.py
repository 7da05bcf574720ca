"""Per-unit costs that ``dsq plan --cluster`` extrapolates from (dsquant/cluster_plan.py ``COSTS``).

Quantizes, in one process with one torch thread (what a Ray worker with ``num_cpus=1`` gets), one
DeepSeek-V3 routed expert at the real widths (gate/up [2048, 7168] and down [7168, 2048], block-FP8
with scales, 44 MB) with each preset, and a tiny V3-shaped checkpoint (bench/make_v3_shaped.py,
scale 512: ~2400 tensors of a few KB) whose cost is almost all per-tensor overhead. CPU seconds,
not wall seconds, so a busy machine changes the numbers less.

    python bench/unit_costs.py /tmp/unit-costs
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_v3_shaped import Spec, _write_shard, make_v3_shaped, v3_config  # noqa: E402


def one_expert(out: Path) -> Path:
    """A checkpoint holding one real-width V3 routed expert (and nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = v3_config(1)
    p = "model.layers.3.mlp.experts.0."
    specs = []
    for name, shape in (("gate_proj", (2048, 7168)), ("up_proj", (2048, 7168)), ("down_proj", (7168, 2048))):
        specs += [Spec(p + name + ".weight", shape, torch.float8_e4m3fn),
                  Spec(p + name + ".weight_scale_inv", (shape[0] // 128, shape[1] // 128), torch.float32)]
    _write_shard(out / "model.safetensors", specs, torch.Generator().manual_seed(0))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def main() -> None:
    from dsq.dsquant.quantize import quantize_checkpoint

    torch.set_num_threads(1)
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    expert = one_expert(work / "expert")
    elements = 3 * 2048 * 7168
    out = {}
    for recipe in ("int4", "int8", "fp8"):
        shutil.rmtree(work / "q", ignore_errors=True)
        c0 = time.process_time()
        quantize_checkpoint(expert, work / "q", recipe)
        out[recipe] = (time.process_time() - c0) / elements * 1e9
    tiny = work / "tiny"
    if not (tiny / "config.json").is_file():
        make_v3_shaped(tiny, 512, 5)
    shutil.rmtree(work / "q", ignore_errors=True)
    c0 = time.process_time()
    rep = quantize_checkpoint(tiny, work / "q", "int4")
    per_tensor = (time.process_time() - c0) / rep["summary"]["tensors"]
    print(json.dumps({"ns_per_element": out, "per_tensor_s": per_tensor}, indent=2))


if __name__ == "__main__":
    main()
