"""``dsq plan --cluster 8x(cpus=32,mem=256GB[,gpus=1])``: what ``--executor ray`` would take per node.

From the plan alone (headers, no weights): the units of work (``ray_executor.unit_key``) are spread
over the nodes the way Ray's queue ends up spreading them -- longest first, each to the node that
frees up first -- and each node gets: units, input bytes read and output bytes written (over the
shared filesystem), workers (one per CPU, fewer when memory does not fit one worker's peak per CPU),
peak memory, and time = the larger of compute (per-tensor costs / workers) and I/O (bytes / the
node's filesystem bandwidth).

The per-tensor cost is ``PER_TENSOR_S + elements * NS_PER_ELEMENT[format]``, one worker thread,
measured by bench/unit_costs.py on a real-width DeepSeek-V3 routed expert (int4/int8/fp8 recipes)
and on the tiny V3-shaped checkpoint (the per-tensor overhead); see COSTS for the run. GPUs are
listed but unused: RTN and FP8 run on CPUs.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field

from .errors import InputError
from .formats import FORMATS
from .plan import BASE_RSS_BYTES, Plan, PlanEntry, human_bytes
from .ray_executor import unit_key

# bench/unit_costs.py, 2026-11-30, CPU seconds with torch.set_num_threads(1) on the 2-core x86-64 CI
# machine while it ran ~13 other processes (load average 13.4): int4 25.7, int8 17.6, fp8 10.3 ns per
# weight of a block-FP8 expert (read, dequantize, quantize, error statistics, write); 0.68 ms per
# tensor of overhead. Kept tensors (norms, router, embeddings) cost a copy: taken as fp8's rate.
NS_PER_ELEMENT = {"int4": 25.7, "int8": 17.6, "fp8": 10.3, "keep": 10.3}
PER_TENSOR_S = 0.68e-3
DEFAULT_FS_GBPS = 1.0  # per-node shared-filesystem bandwidth (read + write), GB/s: an assumption, --fs-gbps
MEM_RESERVE_BYTES = 4 * 1024**3  # per node: the OS, the raylet, the object store's own floor

_SPEC = re.compile(r"^\s*(\d+)\s*[x×*]\s*\(([^()]*)\)\s*$")
_SIZE = re.compile(r"^\s*([\d.]+)\s*([kmgt]i?b?)?\s*$", re.I)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    cpus: int
    mem_bytes: int
    gpus: int = 0


def _size(text: str, flag: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"{flag}: memory `{text}` is not a size like 256GB")
    unit = (m.group(2) or "").lower()
    base = 1024 ** "kmgt".index(unit[0]) * 1024 if "i" in unit else _UNITS[unit[:1]]
    return int(float(m.group(1)) * base)


def parse_cluster(text: str) -> ClusterSpec:
    """``N x (cpus=C, mem=M[, gpus=G])`` -> ClusterSpec; raises InputError naming the part that is wrong."""
    flag = f"--cluster {text}"
    m = _SPEC.match(text)
    if not m:
        raise InputError(f"{flag}: expected NODESx(cpus=N,mem=SIZE[,gpus=N]), e.g. 8x(cpus=32,mem=256GB)")
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in m.group(2).split(","))):
        key, _, value = part.partition("=")
        if key.strip() not in ("cpus", "mem", "gpus") or not value:
            raise InputError(f"{flag}: unknown or empty field `{part}`; fields are cpus, mem, gpus")
        fields[key.strip()] = value.strip()
    if "cpus" not in fields or "mem" not in fields:
        raise InputError(f"{flag}: needs cpus= and mem=")
    try:
        cpus, gpus = int(fields["cpus"]), int(fields.get("gpus", "0"))
    except ValueError:
        raise InputError(f"{flag}: cpus and gpus are whole numbers") from None
    nodes = int(m.group(1))
    if nodes < 1 or cpus < 1 or gpus < 0:
        raise InputError(f"{flag}: needs at least one node and one CPU per node")
    return ClusterSpec(nodes, cpus, _size(fields["mem"], flag), gpus)


def tensor_seconds(entry: PlanEntry) -> float:
    """Estimated worker CPU seconds for one tensor (see COSTS)."""
    fmt = FORMATS[entry.format] if entry.format else None
    # the measured row of its kind of codes and bits (int4, int8, fp8), from the format's facts
    family = ("fp8" if fmt.packing == "fp8" else f"int{fmt.bits}") if fmt else "keep"
    return PER_TENSOR_S + entry.tensor.numel * NS_PER_ELEMENT.get(family, NS_PER_ELEMENT["int4"]) * 1e-9


@dataclass
class NodeEstimate:
    units: int = 0
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    cpu_seconds: float = 0.0
    keys: list[str] = field(default_factory=list, repr=False)


def estimate(plan: Plan, spec: ClusterSpec, fs_gbps: float = DEFAULT_FS_GBPS) -> dict:
    """Per-node and total estimate for quantizing ``plan`` with ``--executor ray`` on ``spec`` (see the
    module docstring). Returns a JSON-able dict. Raises InputError when one worker does not fit a node."""
    units: dict[str, list[PlanEntry]] = {}
    for e in plan.entries:
        units.setdefault(unit_key(e), []).append(e)
    worker_peak = plan.peak_rss_estimate
    usable = spec.mem_bytes - MEM_RESERVE_BYTES
    workers = min(spec.cpus, usable // worker_peak) if usable > 0 else 0
    if workers < 1:
        raise InputError(
            f"--cluster: one worker needs about {human_bytes(worker_peak)} and a node has {human_bytes(spec.mem_bytes)} "
            f"({human_bytes(MEM_RESERVE_BYTES)} kept for the OS and Ray); give the nodes more memory"
        )

    def cost(es: list[PlanEntry]) -> float:
        return sum(tensor_seconds(e) for e in es)

    nodes = [NodeEstimate() for _ in range(spec.nodes)]
    heap = [(0.0, i) for i in range(spec.nodes)]  # (node's finishing time, node): longest unit first to the freest
    for key, es in sorted(units.items(), key=lambda kv: -cost(kv[1])):
        t, i = heapq.heappop(heap)
        n = nodes[i]
        n.units += 1
        n.tensors += len(es)
        n.bytes_read += sum(e.tensor.info.nbytes + (e.tensor.scale_info.nbytes if e.tensor.scale_info else 0) for e in es)
        n.bytes_written += sum(e.out_bytes for e in es)
        n.cpu_seconds += cost(es)
        n.keys.append(key)
        heapq.heappush(heap, (n.cpu_seconds / workers, i))
    rows = []
    for i, n in enumerate(nodes):
        compute = n.cpu_seconds / workers
        io = (n.bytes_read + n.bytes_written) / (fs_gbps * 1e9)
        rows.append({
            "node": i, "units": n.units, "tensors": n.tensors, "bytes_read": n.bytes_read,
            "bytes_written": n.bytes_written, "workers": workers, "peak_memory": workers * worker_peak,
            "compute_s": compute, "io_s": io, "seconds": max(compute, io),
        })
    return {
        "cluster": {"nodes": spec.nodes, "cpus": spec.cpus, "mem_bytes": spec.mem_bytes, "gpus": spec.gpus},
        "units": len(units),
        "worker_peak_bytes": worker_peak,
        "nodes": rows,
        "total": {
            "seconds": max(r["seconds"] for r in rows),
            "cpu_seconds": sum(n.cpu_seconds for n in nodes),
            "bytes_read": sum(n.bytes_read for n in nodes),
            "bytes_written": sum(n.bytes_written for n in nodes),
        },
        "assumptions": {
            "ns_per_element": NS_PER_ELEMENT, "per_tensor_s": PER_TENSOR_S, "fs_gbps_per_node": fs_gbps,
            "memory_reserve_bytes": MEM_RESERVE_BYTES, "base_worker_bytes": BASE_RSS_BYTES,
            "gpus": "unused: RTN and FP8 run on CPUs",
        },
    }


def render(est: dict) -> str:
    """A plain-text table of ``estimate``'s result."""
    c = est["cluster"]
    lines = [
        f"{c['nodes']} nodes x {c['cpus']} CPUs, {human_bytes(c['mem_bytes'])}: {est['units']} units of work, "
        f"{est['nodes'][0]['workers']} workers per node (one needs ~{human_bytes(est['worker_peak_bytes'])})",
        f"{'node':>4} {'units':>6} {'read':>10} {'written':>10} {'memory':>10} {'compute':>9} {'I/O':>9} {'time':>9}",
    ]
    for r in est["nodes"]:
        lines.append(
            f"{r['node']:>4} {r['units']:>6} {human_bytes(r['bytes_read']):>10} {human_bytes(r['bytes_written']):>10} "
            f"{human_bytes(r['peak_memory']):>10} {_clock(r['compute_s']):>9} {_clock(r['io_s']):>9} {_clock(r['seconds']):>9}"
        )
    t, a = est["total"], est["assumptions"]
    lines.append(
        f"total: {_clock(t['seconds'])} wall, {t['cpu_seconds'] / 3600:.1f} CPU-hours, {human_bytes(t['bytes_read'])} read, "
        f"{human_bytes(t['bytes_written'])} written"
    )
    lines.append(
        f"assumes: {a['fs_gbps_per_node']} GB/s shared-filesystem bandwidth per node (--fs-gbps); per tensor "
        f"{a['per_tensor_s'] * 1e3:.2f} ms + ns/weight {a['ns_per_element']} (bench/unit_costs.py); GPUs unused"
    )
    return "\n".join(lines)


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
