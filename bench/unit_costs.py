"""Per-unit costs that ``dsq plan --cluster`` extrapolates from (dsquant/cluster_plan.py and
cluster_calib.py ``COSTS``). Everything runs in one process with one torch thread (what a Ray task
with ``num_cpus=1`` gets) and is timed in CPU seconds, so a busy machine changes the numbers less.

``--part rtn``: quantizes one DeepSeek-V3 routed expert at the real widths (gate/up [2048, 7168] and
down [7168, 2048], block-FP8 with scales, 44 MB) with each preset, and a tiny V3-shaped checkpoint
(bench/make_v3_shaped.py, scale 512: ~2400 tensors of a few KB) whose cost is almost all per-tensor
overhead.

``--part calib``: the rates the calibrated estimate divides FLOPs by --
* the float32 ``X^T X`` accumulation (calib.methods.InputStats, from float32 and from bfloat16 products), GPTQ (calib.gptq) and the imatrix
  scale search (calib.imatrix.search_scales, also AWQ's clip) on a routed expert's shapes, at the real widths (7168 x 2048, 2048 tokens: the mean an expert sees with 128 x
  512 calibration tokens, top-8 of 256) and at the bed's (``--scale``);
* a whole routed expert's task (moe_coverage.quantize_expert: statistics, GPTQ of gate/up/down, the
  expert's forward) at both widths, measured against what the rates predict for it;
* the decoder-layer forward per token (pipeline.LayerRunner on a dense and a MoE layer of the
  V3-shaped bed at ``--scale``, one batch of 8 x ``--seqlen`` tokens), as FLOPs per second with
  cluster_calib.forward_flops_per_token, in float32 and in bfloat16.

    python bench/unit_costs.py /tmp/unit-costs [--part rtn|calib|all] [--scale 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_v3_shaped import V3_CONFIG, Spec, _write_shard, make_v3_shaped, v3_config  # noqa: E402


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


def rtn_costs(work: Path) -> dict:
    """ns per weight of each preset on a real-width expert, and the per-tensor overhead."""
    from dsq.dsquant.quantize import quantize_checkpoint

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
    return {"ns_per_element": out, "per_tensor_s": per_tensor}


def _cpu(fn, *args, repeat: int = 1):
    """(result, CPU seconds per call), best of ``repeat``."""
    best, out = float("inf"), None
    for _ in range(repeat):
        c0 = time.process_time()
        out = fn(*args)
        best = min(best, time.process_time() - c0)
    return out, best


def expert_costs(hidden: int, inter: int, tokens: int, gen: torch.Generator) -> dict:
    """Rates of the statistics (float32 and bfloat16 products) and of GPTQ on one routed expert's shapes, and the whole expert
    task measured against the rates' prediction."""
    from dsq.dsquant.calib.gptq import GPTQOptions, gptq_quantize
    from dsq.dsquant.calib.imatrix import search_scales
    from dsq.dsquant.calib.methods import METHODS, CalibOptions, InputStats
    from dsq.dsquant.calib.moe_coverage import quantize_expert
    from dsq.dsquant.cluster_calib import gptq_flops, stats_flops
    from dsq.dsquant.formats import FORMATS

    fmt = FORMATS["int4_sym_g32"]
    x = torch.randn(tokens, hidden, generator=gen)
    st, t_stats = _cpu(lambda: (s := InputStats(hidden, True, 0), s.add(x))[0], repeat=2)
    _, t_bf16 = _cpu(lambda: (s := InputStats(hidden, True, 0, torch.bfloat16), s.add(x))[0], repeat=2)
    w = torch.randn(inter, hidden, generator=gen) * 0.02
    _, t_gptq = _cpu(gptq_quantize, fmt, w, st.hessian, GPTQOptions())
    _, t_search = _cpu(search_scales, fmt, w, st.importance)  # imatrix's (and AWQ clip's) scale search
    rates = {"stats_flops_per_s": stats_flops(tokens, hidden) / t_stats,
             "stats_bf16_flops_per_s": stats_flops(tokens, hidden) / t_bf16,
             "gptq_flops_per_s": gptq_flops(inter, hidden) / t_gptq,
             "search_s_per_element": t_search / w.numel()}
    # the whole task, as RayCalibPool runs it: every row routed to this expert
    names = {p: f"model.layers.3.mlp.experts.0.{p}_proj.weight" for p in ("gate", "up", "down")}
    formats = dict.fromkeys(names.values(), "int4_sym_g32")
    ws = [torch.randn(inter, hidden, generator=gen) * 0.02, torch.randn(inter, hidden, generator=gen) * 0.02,
          torch.randn(hidden, inter, generator=gen) * 0.02]
    routes = torch.zeros(tokens, 1, dtype=torch.long)
    with torch.inference_mode():
        _, t_task = _cpu(quantize_expert, 0, x, routes, tokens, *ws, torch.nn.SiLU(), METHODS["gptq"], formats, names,
                         CalibOptions(), None, False)
    predicted = (stats_flops(tokens, hidden) + stats_flops(tokens, inter)) / rates["stats_flops_per_s"] + (
        2 * gptq_flops(inter, hidden) + gptq_flops(hidden, inter)) / rates["gptq_flops_per_s"]
    return {"hidden": hidden, "inter": inter, "tokens": tokens, "stats_s": t_stats, "gptq_gate_s": t_gptq, **rates,
            "expert_task_s": t_task, "expert_task_predicted_s": predicted}


def forward_costs(work: Path, scale: int, seqlen: int) -> dict:
    """Forward FLOPs per second of a dense and a MoE layer of the V3-shaped bed at ``scale`` (one
    batch of 8 x ``seqlen`` tokens, as the calibration loop runs it)."""
    from dsq.dsquant.calib.pipeline import Decoder
    from dsq.dsquant.checkpoint import Checkpoint
    from dsq.dsquant.cluster_calib import forward_flops_per_token

    src = work / f"v3-scale{scale}-4"
    if not (src / "config.json").is_file():
        make_v3_shaped(src, scale, 4)
    dec = Decoder(Checkpoint(src))
    cfg = json.loads((src / "config.json").read_text())
    x = torch.randn(8, seqlen, cfg["hidden_size"], generator=torch.Generator().manual_seed(1))
    out = {"scale": scale, "hidden": cfg["hidden_size"], "tokens": 8 * seqlen}
    for kind, i in (("dense", 0), ("moe", 3)):
        for dtype, key in ((torch.float32, kind), (torch.bfloat16, f"{kind}_bf16")):
            layer, xd = dec.load_layer(i, dtype), x.to(dtype)
            with torch.inference_mode():
                dec.forward(layer, xd[:1, :32])  # warm-up (mask and rotary caches)
                _, t = _cpu(dec.forward, layer, xd)
            flops = forward_flops_per_token(cfg, kind == "moe", seqlen) * x.shape[0] * seqlen
            out[key] = {"s_per_token": t / (8 * seqlen), "flops_per_s": flops / t}
            del layer
    return out


def calib_costs(work: Path, scale: int, seqlen: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, inter = V3_CONFIG["hidden_size"], V3_CONFIG["moe_intermediate_size"]
    bed = v3_config(scale)
    return {
        "expert_real": expert_costs(h, inter, 2048, gen),
        "expert_bed": expert_costs(bed["hidden_size"], bed["moe_intermediate_size"], 2048, gen),
        "forward_bed": forward_costs(work, scale, seqlen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--part", choices=("rtn", "calib", "all"), default="all")
    ap.add_argument("--scale", type=int, default=32, help="the V3-shaped bed's width divisor for the calib part")
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    out = {}
    if a.part in ("rtn", "all"):
        out["rtn"] = rtn_costs(a.work)
    if a.part in ("calib", "all"):
        out["calib"] = calib_costs(a.work, a.scale, a.seqlen)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
