"""llama.cpp importance-matrix files, both ways: write dsq's calibration statistics, read llama.cpp's.

Two on-disk formats, as ggml-org/llama.cpp ``tools/imatrix/imatrix.cpp`` writes them:

* **GGUF** (``save_imatrix``; what current ``llama-imatrix`` writes and ``llama-quantize --imatrix``
  reads): KV ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32; llama-quantize refuses a GGUF imatrix
  without all three). Per weight tensor ``<name>`` (a GGUF tensor name such as ``blk.0.attn_q.weight``),
  two F32 tensors: ``<name>.in_sum2`` with ggml ne = (n_cols, n_mat) — the *sum* over calibration
  tokens of x^2 per input column, one row per matrix (per expert of a stacked ``ffn_*_exps``) — and
  ``<name>.counts`` with ne = (1, n_mat): tokens seen per matrix. llama-quantize's importance for
  matrix j is ``in_sum2[j] / counts[j]``, or all ones where ``counts[j] == 0`` (an expert the data
  never reached). An optional ``<name>.in_sum`` (sum of x) is ignored by the quantizer; dsq neither
  writes nor needs it.
* **legacy .dat** (``save_imatrix_legacy``): int32 n_entries; per entry int32 name length, the name,
  int32 ncall, int32 nval, nval float32 values = ``(sum/count) * ncall`` (a zero count stores 1);
  then int32 last chunk and int32 length + the dataset name. The reader divides by ncall.

dsq's statistics are the same quantity llama.cpp collects (``InputStats``: sum of x^2 per input
column over calibration tokens, and the token count), so writing is a relabelling to GGUF tensor
names. The difference is coverage: dsq calibrates a rarely-routed expert on its routed tokens plus
the layer's tokens (moe_coverage.py), so every expert's count is nonzero, where llama-imatrix leaves
such experts at count 0 (llama-quantize then uses all-ones importance for them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import CorruptFileError, InputError, OutputError

GGUF_MAGIC = b"GGUF"
KV_TYPE, KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE = (
    "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
)
SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class ImatrixEntry:
    """One weight tensor's statistics. ``sums``: float32 [n_mat, n_cols], sum of x^2 per input column
    (one row per expert of a stacked tensor, one row for a plain linear); ``counts``: float32 [n_mat],
    tokens per row. A legacy .dat entry has n_mat = 1 and ``sums`` already scaled by ncall (its count)."""

    sums: np.ndarray
    counts: np.ndarray

    def importance(self, n_cols: int | None = None) -> np.ndarray:
        """Mean x^2 per input column, float32 [n_mat, n_cols], by llama-quantize's rule: sums / count,
        all ones for a zero count (GGUF) — or, for a legacy entry with ncall 0, the values as stored.
        ``n_cols`` splits a legacy entry of a stacked tensor (stored as one flat row) per expert."""
        sums = self.sums.astype(np.float32)
        if n_cols is not None and sums.shape[-1] != n_cols:
            if sums.size % n_cols:
                raise InputError(f"imatrix entry has {sums.size} values, not a multiple of {n_cols} columns")
            sums = sums.reshape(-1, n_cols)
        counts = np.broadcast_to(self.counts.astype(np.float32).reshape(-1, 1), (sums.shape[0], 1))
        safe = np.where(counts > 0, counts, np.float32(1))
        return np.where(counts > 0, sums / safe, np.float32(1)).astype(np.float32)


@dataclass
class Imatrix:
    """A whole imatrix file: entries by GGUF weight-tensor name, and its provenance keys."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file (sums are ncall-scaled means, counts = ncall)


# -- GGUF -----------------------------------------------------------------------------------------
def write_gguf(path: str | Path, im: Imatrix) -> Path:
    """Write ``im`` as llama.cpp's GGUF imatrix (layout as ``IMatrixCollector::save_imatrix``).
    Tensors are written in sorted name order, as llama-imatrix does."""
    from gguf import GGUFWriter

    path = Path(path)
    w = GGUFWriter(path, arch="")
    # llama-imatrix's file has no general.architecture (gguf_init_empty + its own keys only)
    w.kv_data[0].pop("general.architecture", None)
    w.add_string(KV_TYPE, "imatrix")
    w.add_array(KV_DATASETS, list(im.datasets))
    w.add_uint32(KV_CHUNK_COUNT, int(im.chunk_count))
    w.add_uint32(KV_CHUNK_SIZE, int(im.chunk_size))
    for name in sorted(im.entries):
        e = im.entries[name]
        sums = np.ascontiguousarray(e.sums, dtype=np.float32).reshape(len(e.counts), -1)
        # numpy order is ggml's ne reversed: [n_mat, n_cols] -> ne (n_cols, n_mat); counts -> ne (1, n_mat)
        w.add_tensor(name + SUM2, sums)
        w.add_tensor(name + COUNTS, np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        r = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on bad bytes
        raise CorruptFileError(f"{path}: not a readable GGUF imatrix ({e})") from None
    fields = r.fields

    def scalar(key: str) -> int:
        return int(fields[key].contents()) if key in fields else 0

    if KV_TYPE in fields and fields[KV_TYPE].contents() != "imatrix":
        raise InputError(f"{path}: a GGUF of general.type {fields[KV_TYPE].contents()!r}, not an imatrix file")
    im = Imatrix(
        datasets=list(fields[KV_DATASETS].contents()) if KV_DATASETS in fields else [],
        chunk_count=scalar(KV_CHUNK_COUNT),
        chunk_size=scalar(KV_CHUNK_SIZE),
    )
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.name.endswith(SUM2):
            sums[t.name[: -len(SUM2)]] = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        elif t.name.endswith(COUNTS):
            counts[t.name[: -len(COUNTS)]] = np.array(t.data, dtype=np.float32).reshape(-1)
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise CorruptFileError(f"{path}: `{name}` has {'no .counts' if name in sums else 'no .in_sum2'} tensor")
        if sums[name].shape[0] != counts[name].size:
            raise CorruptFileError(
                f"{path}: `{name}.in_sum2` has {sums[name].shape[0]} rows but .counts has {counts[name].size}"
            )
        im.entries[name] = ImatrixEntry(sums[name], counts[name])
    if not im.entries:
        raise InputError(f"{path}: a GGUF with no `<tensor>.in_sum2` / `.counts` pairs; not an imatrix file")
    return im


# -- legacy .dat ----------------------------------------------------------------------------------
def write_dat(path: str | Path, im: Imatrix) -> Path:
    """Write ``im`` in llama.cpp's legacy .dat layout (``save_imatrix_legacy``): entries in sorted order,
    each ncall = ceil(max count / chunk_size), values = (sum / count) * ncall in float32. Entries
    with no data at all are skipped, as llama-imatrix does."""
    path = Path(path)
    chunk = max(int(im.chunk_size), 1)
    out = bytearray()
    stored = 0
    body = bytearray()
    for name in sorted(im.entries):
        e = im.entries[name]
        counts = np.asarray(e.counts, dtype=np.float32).reshape(-1)
        if not (counts > 0).any():
            continue
        sums = np.asarray(e.sums, dtype=np.float32).reshape(len(counts), -1)
        if im.legacy:  # read from a .dat: the values are already ncall-scaled, counts = [ncall]
            ncall, vals = np.float32(counts[0]), sums.reshape(-1)
        else:
            ncall = np.float32((int(counts.max()) + chunk - 1) // chunk)  # ceiling: no accidental zeros
            cnt = counts.reshape(-1, 1)
            # a zero-count row (an expert never routed) stores 1, as llama.cpp does ("store 1 for partial data")
            vals = np.where(cnt > 0, sums / np.where(cnt > 0, cnt, np.float32(1)) * ncall, np.float32(1))
            vals = vals.astype(np.float32).reshape(-1)
        raw = name.encode()
        body += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", int(ncall), vals.size) + vals.tobytes()
        stored += 1
    out += struct.pack("<i", stored) + body
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    out += struct.pack("<i", int(im.chunk_count)) + struct.pack("<i", len(dataset)) + dataset
    path.write_bytes(bytes(out))
    return path


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise CorruptFileError(f"{path}: truncated legacy imatrix (.dat) at byte {pos}")
        pos += n
        return data[pos - n : pos]

    (n,) = struct.unpack("<i", take(4))
    if n < 1:
        raise CorruptFileError(f"{path}: legacy imatrix (.dat) with {n} entries")
    im = Imatrix(legacy=True)
    for _ in range(n):
        (ln,) = struct.unpack("<i", take(4))
        if not 0 < ln < 4096:
            raise CorruptFileError(f"{path}: bad entry name length {ln} at byte {pos - 4}; not an imatrix file")
        name = take(ln).decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 0:
            raise CorruptFileError(f"{path}: `{name}` has {nval} values")
        vals = np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float32)
        im.entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([ncall], dtype=np.float32))
    if pos + 4 <= len(data):  # optional trailer: last chunk, dataset name
        (im.chunk_count,) = struct.unpack("<i", take(4))
        if pos + 4 <= len(data):
            (ln,) = struct.unpack("<i", take(4))
            im.datasets = [take(ln).decode("utf-8", errors="replace")] if ln > 0 else []
    return im


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a llama.cpp imatrix file, GGUF or legacy .dat (told apart by the GGUF magic, as
    llama.cpp's loader falls back to the legacy reader when the GGUF one fails).

    Raises InputError (missing file, a GGUF that is not an imatrix) or CorruptFileError (bad bytes)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--imatrix {path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_dat(path)


def write_imatrix(path: str | Path, im: Imatrix) -> Path:
    """Write GGUF unless ``path`` ends in ``.dat`` (llama-imatrix's ``--output-format`` by suffix).
    Raises OutputError when the path cannot be written."""
    try:
        return write_dat(path, im) if str(path).endswith(".dat") else write_gguf(path, im)
    except OSError as e:
        raise OutputError(f"--imatrix-out {path}: cannot write ({e.strerror or e})") from None


# -- dsq <-> GGUF tensor names --------------------------------------------------------------------
def gguf_targets(ckpt) -> dict[str, tuple[str, int | None]]:
    """HF weight name -> (GGUF tensor name, expert index or None), for the checkpoint's 2-D weights whose
    input columns are the GGUF tensor's input columns (names from export/gguf_tensors.py; llama's q/k
    row permutation keeps columns). MLA's ``kv_b_proj`` is absent: llama.cpp splits it into
    ``attn_k_b`` (transposed, other inputs) and a per-head 3-D ``attn_v_b``, which dsq's statistics
    do not describe."""
    from dsq.export.gguf_tensors import EXPERT_ROLES, ROLE_TENSORS, gguf_name

    n_layers = int(ckpt.config.get("num_hidden_layers", 0))
    out: dict[str, tuple[str, int | None]] = {}
    for t in ckpt.tensors:
        ref = t.ref
        if ref is None or ref.role not in ROLE_TENSORS or len(t.shape) != 2:
            continue
        if ref.layer is not None and ref.layer >= n_layers:  # MTP block: not in llama.cpp's GGUF
            continue
        kind, suffix = ROLE_TENSORS[ref.role]
        if suffix != "weight":
            continue
        out[t.name] = (gguf_name(kind, suffix, ref.layer), ref.expert if ref.role in EXPERT_ROLES else None)
    return out


def from_stats(
    ckpt, stats: dict[str, tuple[object, int]], datasets: list[str], chunk_count: int, chunk_size: int
) -> Imatrix:
    """dsq's collected statistics (HF weight name -> (sum of x^2 per column, tokens)) as an Imatrix keyed
    by GGUF names. A stacked expert tensor gets one row per expert (``n_routed_experts``); an expert
    with no statistics keeps a zero row and count 0, which llama-quantize reads as all-ones importance."""
    targets = gguf_targets(ckpt)
    n_expert = ModelConfig.from_dict(ckpt.config).n_experts
    dense: dict[str, ImatrixEntry] = {}
    stacked: dict[str, dict[int, tuple[np.ndarray, int]]] = {}
    for hf, (sums, count) in stats.items():
        if hf not in targets:
            continue
        name, expert = targets[hf]
        arr = np.asarray(sums, dtype=np.float64).astype(np.float32)
        if expert is None:
            dense[name] = ImatrixEntry(arr.reshape(1, -1), np.array([count], dtype=np.float32))
        else:
            stacked.setdefault(name, {})[expert] = (arr, count)
    for name, rows in stacked.items():
        n = max(n_expert, max(rows) + 1)
        cols = next(iter(rows.values()))[0].size
        sums = np.zeros((n, cols), dtype=np.float32)
        counts = np.zeros(n, dtype=np.float32)
        for e, (arr, count) in rows.items():
            sums[e], counts[e] = arr, count
        dense[name] = ImatrixEntry(sums, counts)
    return Imatrix(dense, list(datasets), int(chunk_count), int(chunk_size))


def to_importance(im: Imatrix, ckpt, source: str = "--imatrix") -> dict[str, np.ndarray]:
    """HF weight name -> float32 [in_features] importance (mean x^2, llama-quantize's reading) for every
    checkpoint linear the file has an entry for. Raises InputError when an entry's width or expert
    count does not fit the checkpoint (a file made for another model)."""
    out: dict[str, np.ndarray] = {}
    shapes = {t.name: t.shape for t in ckpt.tensors}
    for hf, (name, expert) in gguf_targets(ckpt).items():
        entry = im.entries.get(name)
        if entry is None:
            continue
        cols = int(shapes[hf][1])
        try:
            imp = entry.importance(cols)
        except InputError:
            imp = None
        row = 0 if expert is None else expert
        if imp is None or imp.shape[1] != cols or row >= imp.shape[0]:
            raise InputError(
                f"{source}: entry `{name}` has {entry.sums.size} values over {entry.counts.size} matrices, which "
                f"does not fit `{hf}` ({cols} input columns); is the imatrix for another model?"
            )
        out[hf] = imp[row]
    return out
