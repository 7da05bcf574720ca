"""``dsq plan --cluster … --method gptq|awq|imatrix``: what a calibrated ``--executor ray`` run would take.

A calibrated run (calib/pipeline.py with ray_executor.RayCalibPool) is sequential over decoder layers,
and inside each layer these phases follow one another (wall time adds up):

1. *load*: the driver reads the layer from the shared filesystem and holds it in the compute dtype;
2. *reference forward*: the float layer over the float stream, split over the calibration batches as
   Ray tasks (at most ``samples / batch_size`` of them), only when the drift is tracked: by default
   (``track_drift=None``) only while the run is small, so never at DeepSeek-V3's size; the layer goes to
   each node's object store once;
3. *statistics forward*: in the driver, in batch order (its sums depend on the order), with one
   float32 ``X^T X`` per distinct input (q/k/v or MLA's q_a/kv_a share one, gate/up share one; GPTQ,
   upper column blocks only, calib.methods.add_gram), diagonals only for imatrix/AWQ, and the MoE
   inputs captured;
4. *linears*: each non-expert linear's GPTQ / search as its own task (their statistics shipped);
5. *experts*: each routed expert's statistics (gate/up share one) + GPTQ as its own task, on the
   layer's captured inputs (in each node's object store once);
6. *quantized forward*: as 2, on the quantized stream;
7. *save*: the layer's calibrated tensors to a per-layer file (resume.LayerStore: in ``--work-dir``, else
   a temporary directory under ``$TMPDIR``), with ``--work-dir`` also the streams.

Then the lm_head (statistics in the driver, GPTQ as a task) and the write: the driver reads the layer
files back one tensor at a time, rounds what calibration did not cover (the MTP layer, embeddings) and
writes every output byte. The driver never holds more than one layer's calibrated tensors.

Compute dtype (``CalibOptions.resolve``): with ``compute_dtype="auto"`` the forwards, the streams and the
``X^T X`` products run in bfloat16 when one forward over the calibration tokens (2 x decoder weights x
tokens) is at least ``AUTO_FLOP`` and every decoder tensor is bfloat16 in the dequantized model (FP8
blocks are), else float32; the sums are float32 either way. Expert tasks and the lm_head accumulate in
float32.

Costs are FLOPs divided by rates measured with one torch thread by bench/unit_costs.py (``COSTS``):
forward FLOPs per token from the config (MLA projections, attention over a mean context of
``seqlen/2``, the dense MLP or router + top-k and shared experts), GPTQ as ``rows*cols^2 + cols^3``
(the column loop's updates and the inverse), statistics as :func:`stats_flops`. Rates measured at
reduced widths run slower than large matrices do, so CPU figures lean high.

GPUs: dsq's calibration runs on CPUs; it has no GPU path. With ``gpus=`` the estimate adds a second,
*hypothetical* total in which the forwards, statistics and GPTQ run on the GPUs at an assumed rate
(``GPU_ASSUMED``: H100 SXM datasheet figures at a stated utilisation), not a measurement.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from .calib.methods import CalibOptions
from .cluster_plan import MEM_RESERVE_BYTES, NS_PER_ELEMENT, ClusterSpec, _clock, tensor_seconds
from .errors import InputError
from .plan import BASE_RSS_BYTES, Plan, PlanEntry, human_bytes

GRAM_BLOCK = 4096  # calib.methods.add_gram's column block

# Measured 2026-11-30 after calib7b's merge, one torch thread, CPU seconds, on the 2-core x86-64 machine
# (load average 1.2-2.7): the statistics, GPTQ, the search and the whole expert task on a routed expert's
# shapes at V3's real widths (7168 x 2048, 2048 tokens) with bench/unit_costs.py's expert_costs, both
# product dtypes; forwards on the V3-shaped bed at scale 32 (hidden 224, one batch of 8 x 512 tokens; small
# matrices, so likely below the real widths' rate: MoE layers there run no faster in bfloat16). The
# whole expert task against the rates' prediction: ``expert_task_factor``.
COSTS = {
    "forward_dense_flops_per_s": 31.7e9,  # a dense decoder layer's forward in float32, FLOPs per second per thread
    "forward_dense_bf16_flops_per_s": 39.4e9,  # the same in bfloat16
    "forward_moe_flops_per_s": 14.5e9,  # a MoE layer's (transformers' eager loop over the experts), float32
    "forward_moe_bf16_flops_per_s": 13.0e9,
    "gptq_flops_per_s": 63.0e9,  # GPTQ, in gptq_flops' model FLOPs
    "stats_flops_per_s": 92.5e9,  # X^T X from float32 products into the float32 sum (stats_flops' FLOPs)
    "stats_bf16_flops_per_s": 149.5e9,  # from bfloat16 products
    "search_s_per_element": 0.518e-6,  # imatrix scale search (and AWQ's clip), seconds per weight
    "expert_task_factor": 18.64 / 17.55,
}
COSTS_RUN = "2026-11-30, 1 thread, real-width expert, scale-32 forwards"
# The driver's serial phases run torch with all of its node's threads; threads scale sublinearly.
DRIVER_THREAD_EFFICIENCY = 0.6
DEFAULT_NET_GBPS = 1.25  # per-node network for Ray's object transfers, GB/s (10 GbE): an assumption, --net-gbps
GPU_ASSUMED = {
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (forwards), 67 TFLOP/s fp64 tensor core (statistics),
    # 67 TFLOP/s fp32 (GPTQ); the utilisations are assumptions, not measurements.
    "forward_dense_flops_per_s": 989e12 * 0.3,
    "forward_moe_flops_per_s": 989e12 * 0.3,
    "forward_dense_bf16_flops_per_s": 989e12 * 0.3,
    "forward_moe_bf16_flops_per_s": 989e12 * 0.3,
    "gptq_flops_per_s": 67e12 * 0.3,
    "stats_flops_per_s": 67e12 * 0.3,
    "stats_bf16_flops_per_s": 989e12 * 0.3,
    # the scale searches are elementwise, so memory-bound: 3.35 TB/s HBM3, ~20 candidate scales x 4 bytes per weight
    "search_elements_per_s": 3.35e12 * 0.3 / 80,
    "label": "H100 SXM: 989 TFLOP/s bf16 forwards and bf16 statistics, 67 TFLOP/s fp32 GPTQ and fp32 statistics, "
             "3.35 TB/s for the "
             "scale searches, all at 30% utilisation",
}
PHASES = ("load", "reference_forward", "statistics_forward", "linears", "experts", "quantized_forward", "save")


@dataclass(frozen=True)
class CalibRun:
    method: str = "gptq"
    samples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    task_cpus: int = 1
    work_dir: bool = True
    track_drift: bool | None = None  # None: as calib.methods.CalibOptions, only while the run is small
    compute_dtype: str = "auto"  # "auto", "float32" or "bfloat16", as CalibOptions
    awq_tokens: int = 4096
    awq_grid: int = 20

    @property
    def tokens(self) -> int:
        return self.samples * self.seqlen


def forward_flops_per_token(cfg: dict, moe: bool, seqlen: int) -> float:
    """FLOPs of one decoder layer per token: the attention projections (MLA when ``kv_lora_rank`` is set,
    else q/k/v/o), scores and weighted sum over a mean causal context of ``seqlen/2``, and the dense MLP
    or the router + ``num_experts_per_tok`` routed + ``n_shared_experts`` shared experts."""
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    if cfg.get("kv_lora_rank"):
        qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        v = cfg["v_head_dim"]
        q = h * cfg["q_lora_rank"] + cfg["q_lora_rank"] * heads * qk if cfg.get("q_lora_rank") else h * heads * qk
        proj = q + h * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) + cfg["kv_lora_rank"] * heads * (
            cfg["qk_nope_head_dim"] + v) + heads * v * h
    else:
        qk = v = cfg.get("head_dim") or h // heads
        kv = cfg.get("num_key_value_heads", heads)
        proj = h * heads * qk + 2 * h * kv * qk + heads * v * h
    attn = 2 * proj + 2 * heads * (qk + v) * seqlen / 2
    if moe:
        inter = cfg["moe_intermediate_size"]
        experts = cfg.get("n_routed_experts") or cfg.get("num_experts") or 0
        mlp = 2 * h * experts + 6 * h * inter * (cfg["num_experts_per_tok"] + cfg.get("n_shared_experts", 0))
    else:
        mlp = 6 * h * cfg["intermediate_size"]
    return attn + mlp


def gptq_flops(rows: int, cols: int) -> float:
    """Model FLOPs of GPTQ on a [rows, cols] weight: the column loop's updates and the Hessian inverse."""
    return float(rows) * cols * cols + float(cols) ** 3


def stats_flops(tokens: int, cols: int, block: int = GRAM_BLOCK) -> float:
    """FLOPs of accumulating ``X^T X`` over ``tokens`` rows of ``cols`` columns as calib.methods.add_gram
    does: only the upper column blocks of ``block`` (the lower ones are mirrored once at the end), so
    ``2*tokens*cols^2`` up to 4096 columns and ~0.6 of it at 18432."""
    widths = [min(block, cols - i) for i in range(0, cols, block)]
    return 2.0 * tokens * sum(a * b for k, a in enumerate(widths) for b in widths[k:])


def _src_bytes(e: PlanEntry) -> int:
    return e.tensor.info.nbytes + (e.tensor.scale_info.nbytes if e.tensor.scale_info else 0)


# linears that transformers calls on one tensor object, so calib.methods.SharedInputs gives them one X^T X
_SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "q_a_proj": "attn",
                 "kv_a_proj_with_mqa": "attn", "gate_proj": "mlp", "up_proj": "mlp"}


def _input_key(name: str) -> str:
    """Which input a linear's weight ``name`` reads: its parent module plus its input group."""
    parent, _, leaf = name.removesuffix(".weight").rpartition(".")
    return f"{parent}:{_SHARED_INPUT.get(leaf, leaf)}"


@dataclass
class _Layer:
    moe: bool
    linears: list[tuple[int, int]]  # non-expert quantized linears, (rows, cols)
    experts: int
    expert_shapes: list[tuple[int, int]]  # one routed expert's quantized linears
    src_bytes: int
    fp32_bytes: int
    out_bytes: int
    not_bf16: str = ""  # the first tensor that is not bfloat16 in the dequantized model ("": none)
    inputs: dict = field(default_factory=dict)  # distinct input of the non-expert linears -> its columns
    expert_inputs: dict = field(default_factory=dict)  # the same for one routed expert


def _layers(plan: Plan, n_layers: int) -> dict[int, _Layer]:
    out: dict[int, _Layer] = {}
    for e in plan.entries:
        ref = e.tensor.ref
        if ref is None or ref.layer is None or ref.layer >= n_layers:
            continue
        lay = out.setdefault(ref.layer, _Layer(False, [], 0, [], 0, 0, 0))
        lay.src_bytes += _src_bytes(e)
        lay.fp32_bytes += e.tensor.numel * 4
        lay.out_bytes += e.out_bytes
        if e.tensor.float_dtype != torch.bfloat16 and not lay.not_bf16:
            lay.not_bf16 = f"{e.name} ({str(e.tensor.float_dtype).removeprefix('torch.')})"
        if ref.expert is not None:
            lay.moe = True
            lay.experts = max(lay.experts, ref.expert + 1)
            if ref.expert == 0 and e.format:
                lay.expert_shapes.append(tuple(e.shape))
                lay.expert_inputs[_input_key(e.name)] = e.shape[1]
        elif e.format and len(e.shape) == 2:
            lay.linears.append(tuple(e.shape))
            lay.inputs[_input_key(e.name)] = e.shape[1]
    return out


def resolve_dtype(layers: dict[int, _Layer], run: CalibRun) -> tuple[str, bool]:
    """("bfloat16" or "float32", whether the drift is tracked) as calib.methods.CalibOptions.resolve decides
    them for this run: one forward over the calibration tokens (2 x decoder weights x tokens) against
    ``AUTO_FLOP``, and whether the decoder's tensors are all bfloat16. Raises InputError for an unknown
    ``run.compute_dtype``."""
    flop = 2.0 * sum(lay.fp32_bytes / 4 for lay in layers.values()) * run.tokens
    bf16 = not any(lay.not_bf16 for lay in layers.values())
    opts = CalibOptions(compute_dtype=run.compute_dtype, track_drift=run.track_drift)
    dtype, drift = opts.resolve(flop, bf16)
    return str(dtype).removeprefix("torch."), drift


def _lpt(times: list[float], slots: int) -> float:
    """Makespan of ``times`` over ``slots`` (longest first, each to the freest slot): Ray's queue."""
    heap = [0.0] * max(min(slots, len(times)), 1)
    for t in sorted(times, reverse=True):
        heapq.heapreplace(heap, heap[0] + t)
    return max(heap)


@dataclass
class _Setup:
    """What the phase costs depend on besides the layer: rates (FLOP/s) of the driver and of one task,
    task slots per node for each kind of task, and the bandwidths."""

    driver: dict
    task: dict
    slots: dict  # "forward", "expert", "linear" -> tasks a node runs at once
    nodes: int
    fs: float  # bytes/s
    net: float  # bytes/s
    expert_factor: float = 1.0  # measured expert task / the rates' prediction
    load_threads: float = 1.0  # the driver's effective threads for dequantizing a layer (on its CPUs)
    bf16: bool = False  # forwards, streams and the driver's X^T X products in bfloat16 (resolve_dtype)
    drift: bool = True  # the reference forward runs

    def fwd(self, moe: bool) -> str:
        """The rate key of a forward in this run's dtype."""
        return f"forward_{'moe' if moe else 'dense'}{'_bf16' if self.bf16 else ''}_flops_per_s"

    @property
    def item(self) -> int:
        """Bytes per element of the layer in the forwards and of the streams."""
        return 2 if self.bf16 else 4


def _phases(lay: _Layer, cfg: dict, run: CalibRun, st: _Setup, top_k: int) -> tuple[dict, int]:
    """Seconds of each phase of one layer (PHASES) and the bytes it sends over the network."""
    tokens, seqlen, bsz = run.tokens, run.seqlen, run.batch_size
    batches = math.ceil(run.samples / bsz)
    stream = tokens * cfg["hidden_size"] * st.item
    layer_bytes = lay.fp32_bytes // 4 * st.item
    full = run.method == "gptq"

    def quantize_s(rows: int, cols: int) -> float:
        if full:
            return gptq_flops(rows, cols) / st.task["gptq_flops_per_s"]
        return rows * cols / st.task["search_elements_per_s"]

    ph = dict.fromkeys(PHASES, 0.0)
    net = 0
    # read, then dequantize in the driver, on its CPUs
    ph["load"] = lay.src_bytes / st.fs + lay.fp32_bytes / 4 * NS_PER_ELEMENT["keep"] * 1e-9 / st.load_threads
    fpt = forward_flops_per_token(cfg, lay.moe, seqlen)
    chunks = min(batches, st.slots["forward"] * st.nodes)
    nodes_used = min(st.nodes, math.ceil(chunks / st.slots["forward"]))
    fwd = st.fwd(lay.moe)
    per_chunk = math.ceil(batches / chunks) * bsz * seqlen * fpt / st.task[fwd]
    # the layer to each other node; the batches of the chunks there out and back (a node's own are local)
    shipped = (nodes_used - 1) * (layer_bytes + 2 * stream / nodes_used)
    ph["quantized_forward"] = per_chunk + shipped / st.net
    ph["reference_forward"] = ph["quantized_forward"] if st.drift else 0.0
    net += (1 + st.drift) * shipped
    # one X^T X per distinct input, its products in the compute dtype
    hooked = sum(stats_flops(tokens, c) for c in lay.inputs.values()) if full else 0.0
    gram = "stats_bf16_flops_per_s" if st.bf16 else "stats_flops_per_s"
    ph["statistics_forward"] = tokens * fpt / st.driver[fwd] + hooked / st.driver[gram]
    if run.method == "awq":  # the per-group scale search over the kept rows, in the driver
        params = sum(r * c for r, c in lay.linears)
        ph["statistics_forward"] += run.awq_grid * 2 * run.awq_tokens * params / st.driver[fwd]
    # each linear's statistics (float32 X^T X, float64 diagonal), shipped to the node its task runs on
    # (the driver's own for 1 in nodes); linears sharing an input each get a copy
    stats = sum(c * c * 4 if full else c * 8 for _, c in lay.linears) * (st.nodes - 1) / st.nodes
    ph["linears"] = _lpt([quantize_s(r, c) for r, c in lay.linears], st.slots["linear"] * st.nodes) + stats / st.net
    net += stats
    if lay.experts:
        n_e = math.ceil(tokens * top_k / lay.experts)  # uniform routing: the mean tokens per expert
        t_e = sum(quantize_s(r, c) for r, c in lay.expert_shapes)
        if full:
            # float32 sums (moe_coverage's InputStats), gate/up sharing one
            t_e += sum(stats_flops(n_e, c) for c in lay.expert_inputs.values()) / st.task["stats_flops_per_s"]
        t_e += 2 * n_e * sum(r * c for r, c in lay.expert_shapes) / st.task[fwd]
        t_e *= st.expert_factor
        ph["experts"] = math.ceil(lay.experts / (st.slots["expert"] * st.nodes)) * t_e + (st.nodes - 1) * stream / st.net
        net += (st.nodes - 1) * stream
    # the layer's calibrated tensors to its file (resume.LayerStore); with --work-dir also the streams
    ph["save"] = (lay.out_bytes + run.work_dir * (1 + st.drift) * stream) / st.fs
    return ph, net


def _memory(lay: _Layer, cfg: dict, run: CalibRun, nodes: int, item: int) -> dict:
    """Peak bytes of one forward task, one expert task and one linear task of this layer; ``item``: bytes
    per element of the layer and the streams in the forwards (2: bfloat16)."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    tokens, seqlen, bsz = run.tokens, run.seqlen, run.batch_size
    stream = tokens * h * item
    batches = math.ceil(run.samples / bsz)
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    out = {
        # the layer, its share of the batches in and out (x4: inputs, outputs, residual, MLP),
        # one batch's attention scores
        "forward": (BASE_RSS_BYTES + lay.fp32_bytes // 4 * item + 4 * math.ceil(batches / nodes) * bsz * seqlen * h * item
                    + bsz * heads * seqlen * seqlen * item),
        "linear": 0, "expert": 0,
    }
    if lay.linears:
        c, r = max(c for _, c in lay.linears), max(r for r, _ in lay.linears)
        # the float32 Hessian and one working copy (GPTQ factors it in place), the weight, codes and error
        out["linear"] = BASE_RSS_BYTES + 2 * c * c * 4 + 3 * r * c * 4
    if lay.experts:
        n_e = math.ceil(tokens * top_k / lay.experts)
        cols = max((c for _, c in lay.expert_shapes), default=h)
        # the captured inputs (deserialised from the object store), routes, this expert's rows, its
        # weights and their dequantized copies, its statistics
        out["expert"] = (BASE_RSS_BYTES + stream + tokens * top_k * 8 + n_e * cols * 4
                         + 2 * sum(r * c * 4 for r, c in lay.expert_shapes) + 2 * cols * cols * 4)
    return out


def estimate_calibrated(plan: Plan, spec: ClusterSpec, run: CalibRun, fs_gbps: float = 1.0,
                        net_gbps: float = DEFAULT_NET_GBPS, costs: dict | None = None) -> dict:
    """Wall time, per-phase time, memory and traffic of a calibrated ``--executor ray`` run (see the module
    docstring). Returns a JSON-able dict; with ``spec.gpus`` also ``gpu_hypothetical`` (assumed GPU rates,
    not a dsq feature). Raises InputError when a task does not fit a node's memory, or when the plan
    quantizes no decoder-layer linear."""
    cfg = plan.checkpoint.config
    rates = dict(COSTS if costs is None else costs)
    rates["search_elements_per_s"] = 1.0 / rates.pop("search_s_per_element")  # a rate, like the others
    expert_factor = rates.pop("expert_task_factor", 1.0)
    n_layers = int(cfg.get("num_hidden_layers", 0))
    layers = _layers(plan, n_layers)
    if not layers:
        raise InputError("--method: the plan quantizes no decoder-layer linear; nothing to calibrate")
    top_k = int(cfg.get("num_experts_per_tok") or 1)
    dtype, drift = resolve_dtype(layers, run)
    not_bf16 = next((lay.not_bf16 for lay in layers.values() if lay.not_bf16), "") if (
        dtype == "float32" and not drift and run.compute_dtype == "auto") else ""
    item = 2 if dtype == "bfloat16" else 4
    stream = run.tokens * cfg["hidden_size"] * item
    usable = spec.mem_bytes - MEM_RESERVE_BYTES
    full = run.method == "gptq"
    eff = DRIVER_THREAD_EFFICIENCY
    # n threads do the work of 1 + (n - 1) * eff threads
    task_scale = 1 + (run.task_cpus - 1) * eff
    driver_scale = 1 + (spec.cpus - 1) * eff
    mem = {"forward": 0, "expert": 0, "linear": 0}
    for lay in layers.values():
        for k, v in _memory(lay, cfg, run, spec.nodes, item).items():
            mem[k] = max(mem[k], v)
    cpu_slots = spec.cpus // run.task_cpus
    # a node also holds the object-store copy of what its tasks read: the layer, the captured inputs
    biggest = max(lay.fp32_bytes for lay in layers.values()) // 4 * item
    slots = {"forward": min(cpu_slots, int((usable - biggest) // mem["forward"])),
             "expert": min(cpu_slots, int((usable - stream) // max(mem["expert"], 1))),
             "linear": min(cpu_slots, int(usable // max(mem["linear"], 1)))}
    for kind, n in slots.items():
        if n < 1:
            need = mem[kind] + (biggest if kind == "forward" else stream if kind == "expert" else 0)
            raise InputError(f"--cluster: a calibration {kind} task needs about {need / 1e9:.0f} GB with its "
                             f"object-store copy and a node has {spec.mem_bytes / 1e9:.0f} GB; give the nodes more memory")
    cpu = _Setup({k: v * driver_scale for k, v in rates.items()}, {k: v * task_scale for k, v in rates.items()},
                 slots, spec.nodes, fs_gbps * 1e9, net_gbps * 1e9, expert_factor, driver_scale, item == 2, drift)
    head = [e for e in plan.entries if e.format and e.tensor.ref is not None and e.tensor.ref.layer is None
            and e.tensor.ref.role.value == "lm_head"]
    rest = [e for e in plan.entries if e not in head and (
        e.tensor.ref is None or e.tensor.ref.layer is None or e.tensor.ref.layer >= n_layers)]
    total_out = sum(e.out_bytes for e in plan.entries)
    # the per-layer files (resume.LayerStore): every calibrated tensor, ~out bytes
    calibrated = sum(lay.out_bytes for lay in layers.values()) + sum(e.out_bytes for e in head)
    # the write: the driver reads the layer files back, rounds what calibration did not cover (MTP layer,
    # embeddings) and writes every byte
    write_s = (sum(tensor_seconds(e) for e in rest)
               + (sum(_src_bytes(e) for e in rest) + calibrated + total_out) / cpu.fs)

    def run_on(st: _Setup) -> dict:
        per_kind: dict[str, dict] = {}
        totals = dict.fromkeys(PHASES, 0.0)
        net = 0
        for lay in layers.values():
            ph, sent = _phases(lay, cfg, run, st, top_k)
            net += sent
            k = per_kind.setdefault("moe" if lay.moe else "dense", {"layers": 0})
            k["layers"] += 1
            k.update(ph)  # layers of a kind cost the same
            for p, v in ph.items():
                totals[p] += v
        # lm_head's statistics accumulate from float32 products (pipeline._lm_head)
        head_s = sum(stats_flops(run.tokens, e.shape[1]) / st.driver["stats_flops_per_s"] * full
                     + (gptq_flops(*e.shape) / st.task["gptq_flops_per_s"] if full
                        else e.tensor.numel / st.task["search_elements_per_s"]) for e in head)
        return {"seconds": sum(totals.values()) + head_s + write_s, "phases": totals, "per_layer": per_kind,
                "lm_head_s": head_s, "write_s": write_s, "network_bytes": net}

    result_cpu = run_on(cpu)
    big = max(layers.values(), key=lambda lay: lay.fp32_bytes)
    # one layer in the compute dtype and its object-store copy; the streams (input, float output and
    # quantized output, and the reference stream in and out when the drift is tracked); the layer's
    # float32 X^T X (one per distinct input) and the float32 copy of the linear being quantized; one layer's
    # calibrated tensors until they go to its file. Nothing grows with the number of layers.
    driver = (BASE_RSS_BYTES + 2 * big.fp32_bytes // 4 * item + (3 + 2 * drift) * stream
              + sum(c * c * 4 for c in big.inputs.values()) * full
              + max((r * c * 4 for r, c in big.linears), default=0) + big.out_bytes)
    result = {
        "cluster": {"nodes": spec.nodes, "cpus": spec.cpus, "mem_bytes": spec.mem_bytes, "gpus": spec.gpus},
        "method": run.method,
        "calibration": {"samples": run.samples, "seqlen": run.seqlen, "tokens": run.tokens,
                        "batches": math.ceil(run.samples / run.batch_size), "task_cpus": run.task_cpus,
                        "compute_dtype": dtype, "track_drift": drift},
        "layers": len(layers),
        **result_cpu,
        "slots_per_node": slots,
        "memory": {"forward_task": mem["forward"], "expert_task": mem["expert"], "linear_task": mem["linear"],
                   "driver": driver, "driver_fits": driver <= usable},
        # resume.LayerStore's files: in --work-dir (with the streams after the last layer), else under $TMPDIR
        "disk": {"layer_files_bytes": calibrated + run.work_dir * (1 + drift) * stream,
                 "where": "--work-dir" if run.work_dir else "$TMPDIR"},
        "total": {"seconds": result_cpu["seconds"], "bytes_read": sum(_src_bytes(e) for e in plan.entries),
                  "bytes_written": total_out, "network_bytes": result_cpu["network_bytes"]},
        "assumptions": [
            f"per-thread rates ({COSTS_RUN}): {dtype} forward {rates[cpu.fwd(False)] / 1e9:.1f} "
            f"(dense) / {rates[cpu.fwd(True)] / 1e9:.1f} (MoE), GPTQ {rates['gptq_flops_per_s'] / 1e9:.1f}, "
            f"X^T X {rates['stats_bf16_flops_per_s' if item == 2 else 'stats_flops_per_s'] / 1e9:.1f} (driver, "
            f"{dtype} products) / {rates['stats_flops_per_s'] / 1e9:.1f} (expert tasks and lm_head, float32) GFLOP/s; "
            f"expert tasks x{expert_factor:.2f} (measured over predicted)",
            f"compute dtype {dtype} and drift {'tracked (a reference forward)' if drift else 'not tracked'}, as "
            "calib.methods.CalibOptions.resolve decides for this model and token count" + (
                f" (float32 forwards although the run is large: {not_bf16} is not bfloat16)" if not_bf16 else ""),
            f"the driver's serial phases run on its node's {spec.cpus} threads, each beyond the first at {eff:.0%}",
            "uniform expert routing (the mean tokens per expert); a skewed router makes the busiest expert the tail",
            f"{fs_gbps} GB/s shared filesystem and {net_gbps} GB/s network per node; each node pulls a layer "
            "from the driver's node (no broadcast tree)",
            f"imatrix/AWQ clip search {rates['search_elements_per_s'] / 1e6:.2f} M weights/s per thread",
        ],
    }
    if not result["memory"]["driver_fits"]:
        result["assumptions"].append(
            "the driver's layer, streams and statistics do not fit one node: the run fails; the time is what it "
            "would take if they fit")
    if spec.gpus:
        gpu_rates = {k: GPU_ASSUMED[k] for k in rates}
        gpu = _Setup(dict(gpu_rates), dict(gpu_rates), dict.fromkeys(slots, spec.gpus), spec.nodes, cpu.fs, cpu.net,
                     load_threads=cpu.load_threads, bf16=cpu.bf16, drift=drift)
        g = run_on(gpu)
        result["gpu_hypothetical"] = {"seconds": g["seconds"], "phases": g["phases"], "per_layer": g["per_layer"],
                                      "assumption": f"dsq calibrates on CPUs; hypothetically on the GPUs: "
                                                    f"{GPU_ASSUMED['label']}, one task per GPU"}
    return result


def render_calibrated(est: dict) -> str:
    """A plain-text summary of ``estimate_calibrated``'s result."""
    c, m, sl = est["cluster"], est["memory"], est["slots_per_node"]
    cal = est["calibration"]
    hb = human_bytes
    lines = [
        f"{c['nodes']} nodes x {c['cpus']} CPUs, {hb(c['mem_bytes'])}" + (f", {c['gpus']} GPUs" if c["gpus"] else "")
        + f": {est['method']} on {cal['tokens']} tokens ({cal['batches']} batches), {est['layers']} layers in sequence",
        f"per node: up to {sl['expert']} expert tasks ({hb(m['expert_task'])} each) or {sl['forward']} forward tasks "
        f"({hb(m['forward_task'])} each: the {cal['compute_dtype']} layer), {cal['task_cpus']} CPU each; linear tasks "
        f"{hb(m['linear_task'])}",
        f"driver: {hb(m['driver'])} (one {cal['compute_dtype']} layer and its object-store copy, the streams, "
        "the layer's X^T X, one layer's calibrated tensors)" + ("" if m["driver_fits"] else ": does NOT fit a node"),
        f"disk: {hb(est['disk']['layer_files_bytes'])} of per-layer files in {est['disk']['where']} until the write",
        f"{'per layer':<10} " + " ".join(f"{p.replace('_forward', ' fwd'):>12}" for p in PHASES) + f" {'x layers':>9}",
    ]
    for kind, k in est["per_layer"].items():
        lines.append(f"{kind:<10} " + " ".join(f"{_clock(k[p]):>12}" for p in PHASES) + f" {k['layers']:>9}")
    t = est["total"]
    lines.append(f"lm_head {_clock(est['lm_head_s'])}, write {_clock(est['write_s'])}")
    lines.append(f"total: {_clock(t['seconds'])} wall, {hb(t['bytes_read'])} read, {hb(t['bytes_written'])} written, "
                 f"{hb(t['network_bytes'])} over the network")
    if "gpu_hypothetical" in est:
        g = est["gpu_hypothetical"]
        lines.append(f"if on GPUs (hypothetical): {_clock(g['seconds'])} wall; {g['assumption']}")
        for kind, k in g["per_layer"].items():
            lines.append(f"{kind + ' GPU':<10} " + " ".join(f"{_clock(k[p]):>12}" for p in PHASES) + f" {k['layers']:>9}")
    lines += [f"assumes: {a}" for a in est["assumptions"]]
    return "\n".join(lines)
