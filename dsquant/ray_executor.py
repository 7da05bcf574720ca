"""``dsq quantize --executor ray``: the plan's tensors, in units of work, quantized over a Ray cluster.

Why the result is the same bytes as ``--executor local``: the plan fixes every output tensor's name,
dtype and shape before any weight is read, so every output shard's header -- and therefore the byte
offset of every tensor in every shard -- is known up front. The driver writes each shard's header
and extends the file to its final size; workers quantize with the local path's own per-tensor
function (``quantize._process``) and ``pwrite`` the bytes at those offsets. The driver then writes
the index, config and report exactly as the local path does, last, and renames the directory into
place (``atomic``).

Units of work are tensor groups (``unit_key``): a layer's attention (MLA projections and norms),
its dense MLP or router, each routed expert, the shared expert, and every other tensor alone. A Ray
task runs a few consecutive units (about ``task_bytes`` of input), one after another, so a worker
holds at most one tensor's row slice at a time (the local path's memory bound); the driver never
reads a weight.

Calibrated runs (``--method gptq|awq|imatrix``): layers stay sequential, since layer i+1's inputs are
the quantized layer i's outputs. The driver runs one layer at a time (calib/pipeline.py) and hands the
layer's independent work to a :class:`RayCalibPool`: each quantized linear's and each routed expert's
quantization is one task (a MoE layer's captured inputs go to the object store once, shared by all
its experts' tasks), and the layer forward that makes the next layer's inputs (and the float
reference stream) is split over the calibration batches. The statistics forward (an ordered float64
sum) and AWQ's per-layer scale search stay in the driver. ``--work-dir`` resumes a calibrated run by
finished layer (calib/resume.py), whichever executor wrote it; the calibrated tensors are then written
by the driver.

Threads and memory: every task asks Ray for ``task_cpus`` CPUs (default 1) and runs torch with that
many threads, and asks for a ``memory`` amount estimated from what it holds (:func:`task_memory`,
capped at the largest node's), so Ray packs as many tasks on a node as its cores and memory allow.
RTN/FP8 bytes do not depend on the thread count. Calibrated bytes do (float32 matmuls split their
sums by thread), so a calibrated Ray run is the same bytes as a local run whose torch thread count
equals ``task_cpus`` *and* the driver's (``OMP_NUM_THREADS=1`` for the default); tests/test_ray_calib.py
checks exactly that.

Assumptions: the source checkpoint and the output's parent (and ``--work-dir``) are on a filesystem
every node sees at the same path (NFS, Lustre, a FUSE-mounted bucket), and dsq is installed on every
node. Faults: Ray retries a task whose worker died (``max_retries``); a retried unit writes the same
bytes at the same offsets, so it is idempotent. With ``work_dir``, the partial output and a log of
finished units live in ``work_dir/ray-<fingerprint>/`` (the fingerprint covers the model's tensors
and files, the plan, the output sharding and dsq's version), so a killed driver reruns only the
units not in the log; without it, a killed driver's partial output is left as a hidden sibling of
the output and a rerun starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from .checkpoint import Checkpoint
from .errors import DsqError, InputError, OutputError, UnsupportedError
from .plan import BASE_RSS_BYTES, PlanEntry, human_bytes
from .safetensors_io import DTYPE_NAMES, PlannedTensor, read_header

# A task runs consecutive units up to about this many input bytes: big enough that Ray's per-task
# overhead (a few ms) is noise, small enough that a cluster of a few hundred CPUs gets several tasks each.
DEFAULT_TASK_BYTES = 256 * 1024**2
DEFAULT_MAX_RETRIES = 3
DONE_LOG = "done.jsonl"
# What a task's process holds besides its data (Python, torch, Ray's worker): plan.BASE_RSS_BYTES.
# A calibrated task's data is its arguments (weights, statistics, captured inputs) plus working copies
# of about as much again (GPTQ's Hessian inverse and error block, a forward's intermediate activations).
CALIB_WORK_FACTOR = 3


def unit_key(entry: PlanEntry) -> str:
    """The unit of work a plan entry belongs to (entries with the same key run in one worker call)."""
    ref = entry.tensor.ref
    if ref is None or ref.layer is None:
        return entry.name  # embeddings, final norm, lm_head, unmapped tensors: each alone
    if ref.expert is not None:
        return f"layer {ref.layer} expert {ref.expert}"
    group = ref.info.group
    if group == "shared_experts":
        return f"layer {ref.layer} shared expert"
    if group in ("mlp", "router"):
        return f"layer {ref.layer} mlp"
    if group == "mtp":
        return entry.name  # the MTP layer's embedding and head are vocabulary-sized: alone
    return f"layer {ref.layer} attention"


@dataclass(frozen=True)
class Slot:
    """Where one output tensor's bytes go: ``file`` at absolute byte ``begin``."""

    file: str
    begin: int
    tensor: PlannedTensor


@dataclass
class Unit:
    key: str
    items: list[int]  # indices into the planned items (plan order)
    in_bytes: int


def shard_header(planned: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header ``SafetensorsWriter`` writes for these tensors (same bytes)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in planned:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section, as safetensors does
    return struct.pack("<Q", len(blob)) + blob


def _prepare_shard(path: Path, planned: list[PlannedTensor], metadata: dict[str, str]) -> dict[str, Slot]:
    """Create (or, resuming, keep) ``path`` at its final size with its header; returns every tensor's slot."""
    head = shard_header(planned, metadata)
    size = len(head) + sum(t.nbytes for t in planned)
    try:
        keep = False
        if path.is_file() and path.stat().st_size == size:  # resuming: keep what finished units wrote
            with open(path, "rb") as f:
                keep = f.read(len(head)) == head
        if not keep:
            with open(path, "wb") as f:
                f.write(head)
                f.truncate(size)  # the data region: a hole until workers fill it
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    infos, _ = read_header(path)  # offsets as any safetensors reader will see them
    return {t.name: Slot(str(path), infos[t.name].begin, t) for t in planned}


class PwriteWriter:
    """``SafetensorsWriter``'s write interface over pre-sized files: each planned tensor's rows land at
    its slot's offset with ``os.pwrite``, in any order across tensors (rows of one tensor in order)."""

    def __init__(self, slots: dict[str, Slot]):
        self.slots = slots
        self.written = dict.fromkeys(slots, 0)
        self._fds: dict[str, int] = {}

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            try:
                self._fds[file] = os.open(file, os.O_WRONLY)
            except OSError as e:
                raise OutputError(f"{file}: cannot open for writing ({e.strerror})") from None
        return self._fds[file]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole planned tensor."""
        self.write_part(name, tensor)
        if self.written[name] != self.slots[name].tensor.nbytes:
            raise AssertionError(f"`{name}` got {self.written[name]} of its bytes in one write")

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Write the next rows (dim 0) of planned tensor ``name``."""
        slot = self.slots.get(name)
        if slot is None or part.dtype != slot.tensor.dtype or tuple(part.shape[1:]) != slot.tensor.shape[1:]:
            planned = f"{slot.tensor.dtype}{list(slot.tensor.shape)}" if slot else "nothing"
            raise AssertionError(f"writer got {name} {part.dtype}{list(part.shape)}, planned {planned}")
        data = part.contiguous().reshape(-1).view(torch.uint8).numpy() if part.numel() else b""
        done = self.written[name]
        if done + len(data) > slot.tensor.nbytes:
            raise AssertionError(f"`{name}` got more bytes than planned ({slot.tensor.nbytes})")
        fd, view, pos = self._fd(slot.file), memoryview(data), 0
        try:
            while pos < len(view):
                pos += os.pwrite(fd, view[pos:], slot.begin + done + pos)
        except OSError as e:
            raise OutputError(f"{slot.file}: cannot write ({e.strerror}); is the disk full?") from None
        self.written[name] = done + len(data)

    def close(self) -> None:
        """Check every slot is complete, then fsync: a unit is logged as done only once its bytes are durable."""
        missing = [n for n, w in self.written.items() if w != self.slots[n].tensor.nbytes]
        try:
            for fd in self._fds.values():
                if not missing:
                    os.fsync(fd)
                os.close(fd)
        except OSError as e:
            raise OutputError(f"cannot write ({e.strerror}); is the disk full?") from None
        self._fds.clear()
        if missing:
            raise AssertionError(f"`{missing[0]}` was not completely written")


# One Checkpoint per worker process and source: opening one reads config.json and the index only.
_CHECKPOINTS: dict[str, Checkpoint] = {}


def run_units(source: str, layout, jobs: list[tuple[str, list[tuple[int, PlanEntry, list[PlannedTensor], dict]]]]) -> dict:
    """Worker side: quantize and write each job's tensors; returns their results by item index.

    ``jobs`` is ``[(unit key, [(item index, entry, outputs, {output name: Slot}), ...]), ...]``; returns
    ``{"units": [(key, [(item index, TensorResult as a dict)], seconds)], "node", "seconds", "cpu_s",
    "bytes", "max_rss"}`` (wall and CPU seconds, input bytes read, this worker process's peak RSS in bytes). The
    same per-tensor function as ``--executor local`` (``quantize._process``) produces the bytes.
    Raises what ``_process`` raises (DsqError subclasses for bad weights, OutputError for the disk).
    """
    from .quantize import _process  # here: quantize imports this module's caller, not the other way

    t0, c0 = time.perf_counter(), time.process_time()
    ckpt = _CHECKPOINTS.get(source)
    if ckpt is None:
        ckpt = _CHECKPOINTS[source] = Checkpoint(source)
    done: list[tuple[str, list[tuple[int, dict]], float]] = []
    in_bytes = 0
    # one writer for the task: files opened once, one fsync per file at the end (the driver logs these
    # units as done only after this function returns)
    writer = PwriteWriter({n: slot for _, tensors in jobs for *_, slots in tensors for n, slot in slots.items()})
    for key, tensors in jobs:
        results, t_unit = [], time.perf_counter()
        for idx, entry, outputs, _ in tensors:
            results.append((idx, asdict(_process(ckpt, entry, outputs, layout, writer))))
            in_bytes += entry.tensor.info.nbytes + (entry.tensor.scale_info.nbytes if entry.tensor.scale_info else 0)
        done.append((key, results, time.perf_counter() - t_unit))
    writer.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"units": done, "node": socket.gethostname(), "seconds": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "bytes": in_bytes, "max_rss": rss}


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(ckpt: Checkpoint, items, names: list[str], shards: list[list[int]], layout) -> dict:
    return {
        "dsq": __version__,
        "source": str(ckpt.path.resolve()),
        "model": _sha({
            "config": ckpt.config,
            "tensors": [(t.name, list(t.shape), t.source_dtype) for t in ckpt.tensors],
            "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.files],
        }),
        "plan": _sha([(e.name, e.format, [(p.name, str(p.dtype), list(p.shape)) for p in ps]) for e, ps in items]),
        "shards": _sha([names, shards]),
        "layout": layout.name if layout else None,
    }


class RayExecutor:
    """Runs ``quantize_checkpoint``'s planned items as Ray tasks (see the module docstring).

    ``address``: ``ray.init``'s (None: the running Ray session if there is one, else a new local
    cluster; ``auto``: the cluster ``ray start`` made on this machine). ``work_dir``: resumable state
    (None: not resumable). ``task_bytes``: input bytes per task (0: one unit per task). ``unit_fn``:
    the worker function (tests wrap ``run_units`` to kill a worker). ``task_cpus``: CPUs each task asks
    Ray for and torch threads it runs (raises InputError below 1). After ``run``: ``units_total``,
    ``units_skipped`` (finished by an earlier run), ``nodes`` (input bytes, worker seconds and the
    largest worker peak RSS per node), ``unit_seconds`` (worker seconds per unit run here).
    """

    def __init__(self, address: str | None = None, work_dir: str | Path | None = None, *,
                 task_bytes: int = DEFAULT_TASK_BYTES, max_retries: int = DEFAULT_MAX_RETRIES,
                 unit_fn: Callable = run_units, task_cpus: int = 1):
        if task_cpus < 1:
            raise InputError(f"--task-cpus {task_cpus}: a task needs at least one CPU")
        self.address = address
        self.work_dir = Path(work_dir) if work_dir else None
        self.task_bytes = task_bytes
        self.max_retries = max_retries
        self.unit_fn = unit_fn
        self.task_cpus = task_cpus
        self.task_memory = 0  # the largest memory request of a task so far, bytes
        self.state_dir: Path | None = None
        self.units_total = self.units_skipped = 0
        self.nodes: dict[str, dict[str, float]] = {}
        self.unit_seconds: dict[str, float] = {}
        self.calib: RayCalibPool | None = None
        self._started_ray = False

    def _ray(self):
        import ray  # optional extra: pip install 'dsq[ray]'

        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False)
            self._started_ray = True
        return ray

    def units(self, items: list[tuple[PlanEntry, list[PlannedTensor]]]) -> list[Unit]:
        """The plan's units of work, in order of their first tensor."""
        by_key: dict[str, Unit] = {}
        for i, (entry, _) in enumerate(items):
            u = by_key.setdefault(unit_key(entry), Unit(unit_key(entry), [], 0))
            u.items.append(i)
            u.in_bytes += entry.tensor.info.nbytes + (entry.tensor.scale_info.nbytes if entry.tensor.scale_info else 0)
        return list(by_key.values())

    def calib_pool(self) -> RayCalibPool:
        """The pool a calibrated run's layers use (starts or joins Ray as ``run`` does); kept as ``self.calib``."""
        self.calib = RayCalibPool(self._ray(), max_retries=self.max_retries, task_cpus=self.task_cpus)
        return self.calib

    def run(self, ckpt: Checkpoint, items: list[tuple[PlanEntry, list[PlannedTensor]]], shards: list[list[int]],
            names: list[str], layout, tmp: Path, progress, calibrated: dict | None = None) -> tuple[list, dict]:
        """Write every shard of ``names`` into ``tmp``; returns (TensorResults in plan order, weight_map)
        as the local loop builds them. Raises the workers' DsqErrors, and UnsupportedError when given
        calibrated tensors (those live in the driver: quantize_checkpoint writes them itself)."""
        if calibrated:
            raise UnsupportedError("calibrated tensors are written by the driver; RayExecutor.run takes RTN/FP8 plans")
        ray = self._ray()
        try:
            return self._run(ray, ckpt, items, shards, names, layout, tmp, progress)
        except BaseException:
            self.shutdown()
            raise

    def _run(self, ray, ckpt, items, shards, names, layout, tmp, progress) -> tuple[list, dict]:
        from .quantize import TensorResult

        metadata = {"format": "pt", "producer": f"dsq {__version__}"}  # as quantize_checkpoint's writer
        if self.work_dir:
            fp = _fingerprint(ckpt, items, names, shards, layout)
            self.state_dir = self.work_dir / f"ray-{_sha(fp)}"
            (self.state_dir / "partial").mkdir(parents=True, exist_ok=True)
            (self.state_dir / "fingerprint.json").write_text(json.dumps(fp, indent=2))
            out_dir = self.state_dir / "partial"
        else:
            out_dir = tmp
        slots: dict[str, Slot] = {}
        weight_map: dict[str, str] = {}
        for shard_name, idxs in zip(names, shards, strict=True):
            planned = [p for i in idxs for p in items[i][1]]
            slots.update(_prepare_shard(out_dir / shard_name, planned, metadata))
            weight_map.update({p.name: shard_name for p in planned})
        units = self.units(items)
        results: list[TensorResult | None] = [None] * len(items)
        finished = self._load_log(units) if self.state_dir else {}
        for res in finished.values():
            for idx, r in res:
                results[idx] = TensorResult(**r)
        self.units_total, self.units_skipped = len(units), len(finished)
        todo = [u for u in units if u.key not in finished]
        total_bytes = sum(u.in_bytes for u in units)
        done_bytes = sum(u.in_bytes for u in units if u.key in finished)
        tasks = self._batches(todo, ray)
        remote = ray.remote(max_retries=self.max_retries, retry_exceptions=False)(_unit_task)
        source = str(ckpt.path.resolve())
        layout_ref, fn_ref = ray.put(layout), ray.put(self.unit_fn)
        cap = _largest_node_memory(ray)
        pending = {}
        for batch in tasks:
            jobs = [(u.key, [(i, items[i][0], items[i][1], {p.name: slots[p.name] for p in items[i][1]}) for i in u.items])
                    for u in batch]
            # one tensor's row slice at a time (plan.PlanEntry.work_bytes), whichever is largest in the task
            mem = BASE_RSS_BYTES + max(items[i][0].work_bytes for u in batch for i in u.items)
            self.task_memory = max(self.task_memory, mem)
            opts = {"num_cpus": self.task_cpus, "memory": min(mem, cap) if cap else mem}
            pending[remote.options(**opts).remote(self.task_cpus, fn_ref, source, layout_ref, jobs)] = batch
        n_done_tensors = sum(1 for r in results if r is not None)
        log = open(self.state_dir / DONE_LOG, "a+") if self.state_dir else None  # noqa: SIM115 - closed below
        if log and log.tell():  # a killed run's torn last line must not swallow the next record
            log.seek(log.tell() - 1)
            if log.read(1) != "\n":
                log.write("\n")
        t0 = time.monotonic()
        try:
            while pending:
                # up to 64 finished tasks per wake-up: one wait per task over 15,000 refs would be quadratic
                ready, _ = ray.wait(list(pending), num_returns=min(len(pending), 64), timeout=1.0)
                for ref in ready:
                    batch = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        raise (cause if isinstance(cause, DsqError) else e) from None
                    for key, res, seconds in out["units"]:
                        self.unit_seconds[key] = seconds
                        for idx, r in res:
                            results[idx] = TensorResult(**r)
                        if log:
                            log.write(json.dumps({"unit": key, "results": res}) + "\n")
                    node = self.nodes.setdefault(out["node"], {"bytes": 0, "seconds": 0.0, "cpu_s": 0.0, "max_rss": 0})
                    node["bytes"] += out["bytes"]
                    node["seconds"] += out["seconds"]
                    node["cpu_s"] += out.get("cpu_s", 0.0)
                    node["max_rss"] = max(node["max_rss"], out["max_rss"])
                    done_bytes += sum(u.in_bytes for u in batch)
                    n_done_tensors += sum(len(u.items) for u in batch)
                if log and ready:  # the workers fsynced their bytes before returning: logged units are on disk
                    log.flush()
                    os.fsync(log.fileno())
                if progress and ready:
                    units_done = self.units_total - sum(len(b) for b in pending.values())
                    rate = done_bytes / max(time.monotonic() - t0, 1e-9)
                    per_node = ", ".join(f"{n} {human_bytes(v['bytes'] / max(v['seconds'], 1e-9))}/s"
                                         for n, v in sorted(self.nodes.items()))
                    progress(n_done_tensors, len(items),
                             f"{units_done}/{self.units_total} units, {human_bytes(done_bytes)}/{human_bytes(total_bytes)} "
                             f"read ({human_bytes(rate)}/s; per node: {per_node})")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if log:
                log.close()
        if self.state_dir:  # the finished shards join the output directory (a hard link: no copy on one filesystem)
            for shard_name in names:
                _link_or_copy(out_dir / shard_name, tmp / shard_name)
        return results, weight_map

    def _batches(self, todo: list[Unit], ray) -> list[list[Unit]]:
        """Consecutive units of about ``task_bytes``, and at least 4 tasks per cluster CPU while there are units."""
        if not todo:
            return []
        cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        cap = min(self.task_bytes, math.ceil(sum(u.in_bytes for u in todo) / (4 * cpus)))
        out: list[list[Unit]] = [[]]
        size = 0
        for u in todo:
            if out[-1] and size + u.in_bytes > cap:
                out.append([])
                size = 0
            out[-1].append(u)
            size += u.in_bytes
        return out

    def _load_log(self, units: list[Unit]) -> dict[str, list]:
        """Units an earlier run finished (a torn last line, from a kill mid-write, is ignored)."""
        path = self.state_dir / DONE_LOG
        known = {u.key: len(u.items) for u in units}
        finished: dict[str, list] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if known.get(rec.get("unit")) == len(rec.get("results", ())):
                    finished[rec["unit"]] = rec["results"]
        return finished

    def cleanup(self) -> None:
        """After the output is in place: drop the resumable state and stop a Ray this executor started."""
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the local Ray cluster ``run`` started (one it connected to, or found running, stays)."""
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


def _unit_task(threads: int, fn: Callable, *args):
    """Worker side of an RTN/FP8 task: ``fn(*args)`` (``run_units``) with torch on the task's ``threads``
    (a reused worker keeps whatever thread count its previous task set, and torch read
    ``OMP_NUM_THREADS`` only once, at import)."""
    torch.set_num_threads(threads)
    return fn(*args)


def _calib_task(threads: int, fn: Callable, *args) -> dict:
    """Worker side of :class:`RayCalibPool`: ``fn(*args)`` with torch on the task's ``threads`` (its
    ``num_cpus``) in inference mode, as a local run with that many threads computes it. Returns
    ``{"out": the result, "cpu_s": this task's CPU seconds, "node": host, "max_rss": the worker
    process's peak RSS in bytes}``."""
    torch.set_num_threads(threads)
    c0 = time.process_time()
    with torch.inference_mode():
        out = fn(*args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"out": out, "cpu_s": time.process_time() - c0, "node": socket.gethostname(), "max_rss": rss}


def tensor_bytes(obj, shared: Callable[[object], int | None] | None = None) -> int:
    """Bytes of the tensors in ``obj``, searched through lists, tuples, dicts, modules' state and plain
    objects' attributes (e.g. InputStats' sum); ``shared(o)``, when not None, is the size of ``o`` (an
    object-store reference: what :meth:`RayCalibPool.share` recorded for it)."""
    seen: set[int] = set()

    def size(o, depth: int) -> int:
        if depth > 4 or id(o) in seen:
            return 0
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            return o.numel() * o.element_size()
        if isinstance(o, torch.nn.Module):
            return sum(t.numel() * t.element_size() for t in o.state_dict().values())
        if isinstance(o, (list, tuple)):
            return sum(size(x, depth + 1) for x in o)
        if isinstance(o, dict):
            return sum(size(x, depth + 1) for x in o.values())
        known = shared(o) if shared else None
        if known is not None:
            return known
        if hasattr(o, "__dict__") and not isinstance(o, type):
            return sum(size(x, depth + 1) for x in vars(o).values())
        return 0

    return size(obj, 0)


def task_memory(args: tuple, shared: Callable[[object], int | None] | None = None) -> int:
    """Bytes a calibrated task is expected to hold: ``BASE_RSS_BYTES`` plus ``CALIB_WORK_FACTOR`` times
    its arguments' tensors (:func:`tensor_bytes`)."""
    return BASE_RSS_BYTES + CALIB_WORK_FACTOR * tensor_bytes(args, shared)


def _largest_node_memory(ray) -> int:
    """The largest ``memory`` resource of a live node (bytes; 0 if Ray reports none): a task asking for
    more could never be scheduled, so requests are capped at it."""
    try:
        return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0))
    except Exception:  # noqa: BLE001 - an older or remote Ray without node listings: ask for no memory cap
        return 0


def _forward_batches(runner: Callable, layer, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [runner(layer, x) for x in xs]


class RayCalibPool:
    """calib/pool.py's interface over Ray tasks: ``map`` submits one task per job and returns the
    results in job order; ``forward`` puts the layer in the object store once and runs the calibration
    batches in contiguous chunks, one task per ``task_cpus`` of the cluster at most. Each task asks for
    ``task_cpus`` CPUs (torch runs that many threads) and :func:`task_memory` of its arguments (a
    forward: the layer once, its batches several times), capped at the largest node's memory. A task's DsqError is re-raised as itself; a dead worker's task is
    retried (``max_retries``), which recomputes the same result."""

    def __init__(self, ray, max_retries: int = DEFAULT_MAX_RETRIES, task_cpus: int = 1):
        self.ray = ray
        self.task_cpus = task_cpus
        self.cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        self.memory_cap = _largest_node_memory(ray)
        self._task = ray.remote(max_retries=max_retries, retry_exceptions=False)(_calib_task)
        # object-store reference's hex id -> bytes of the object (for task_memory); ids, not references,
        # so that a finished layer's objects are not pinned in the object store
        self._shared: dict[str, int] = {}
        self.tasks = 0  # submitted so far (for reports and tests)
        self.max_task_memory = 0  # the largest memory request so far, bytes
        self.nodes: dict[str, dict[str, float]] = {}  # host -> tasks, CPU seconds in tasks, largest worker RSS

    def share(self, obj):
        """An object store reference to ``obj``: jobs that take it as an argument read it from there."""
        ref = self.ray.put(obj)
        self._shared[ref.hex()] = tensor_bytes(obj)
        return ref

    def _shared_size(self, o) -> int | None:
        return self._shared.get(o.hex()) if isinstance(o, self.ray.ObjectRef) else None

    def _submit(self, fn, *args, memory: int | None = None):
        mem = memory or task_memory(args, self._shared_size)
        self.max_task_memory = max(self.max_task_memory, mem)
        opts = {"num_cpus": self.task_cpus, "memory": min(mem, self.memory_cap) if self.memory_cap else mem}
        self.tasks += 1
        return self._task.options(**opts).remote(self.task_cpus, fn, *args)

    def _get(self, refs: list, on_done=None) -> list:
        pending, done = list(refs), 0
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1 if on_done else len(pending))
                done += len(ready)
                if on_done:
                    on_done(done)
            outs = []
            for r in self.ray.get(refs):
                node = self.nodes.setdefault(r["node"], {"tasks": 0, "cpu_s": 0.0, "max_rss": 0})
                node["tasks"] += 1
                node["cpu_s"] += r["cpu_s"]
                node["max_rss"] = max(node["max_rss"], r["max_rss"])
                outs.append(r["out"])
            return outs
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, DsqError) else e) from None
        except BaseException:
            for ref in pending:
                self.ray.cancel(ref, force=True)
            raise

    def map(self, fn: Callable, jobs, on_done=None) -> list:
        """``[fn(*args) for args in jobs]``, each as a Ray task; ``on_done(k)`` as the k-th finishes."""
        return self._get([self._submit(fn, *args) for args in jobs], on_done)

    def forward(self, runner: Callable, layer, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``runner(layer, x)`` for every batch ``x`` of ``xs``, in order, split over at most
        ``cpus // task_cpus`` tasks."""
        if not xs:
            return []
        layer_ref, runner_ref = self.share(layer), self.ray.put(runner)
        step = math.ceil(len(xs) / min(max(self.cpus // self.task_cpus, 1), len(xs)))
        # the layer once (a forward does not copy its weights), its batches and their activations several times
        chunks = [xs[k : k + step] for k in range(0, len(xs), step)]
        refs = [self._submit(_forward_batches, runner_ref, layer_ref, chunk,
                             memory=self._shared[layer_ref.hex()] + task_memory(tuple(chunk))) for chunk in chunks]
        return [y for chunk in self._get(refs) for y in chunk]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (or no hard links): copy
        try:
            shutil.copyfile(src, dst)
        except OSError as e:
            raise OutputError(f"{dst}: cannot write ({e.strerror})") from None
