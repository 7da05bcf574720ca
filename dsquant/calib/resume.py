"""Resumable calibration: a work directory checkpointed after every finished layer.

Layout of ``work_dir``::

    fingerprint.json     model + recipe + method/options + calibration data (a mismatch refuses to resume)
    layer-00012.pt       that layer's results: quantized tensors (codes/scale/zero), rescaled floats, report
    hidden.pt            hidden states after the last finished layer: quantized stream (+ float reference)
    state.json           {"next_layer": 13}; written last, by rename, so a kill leaves a consistent state

Files are written to a temporary name and renamed, so a run killed mid-write resumes from the last
layer whose ``state.json`` update landed. Tensors are saved as plain dicts of tensors and loaded
with ``weights_only=True`` (no pickled code runs).

The layer files are also where a run's results live until the writer takes them (:class:`LayerStore`,
in a temporary directory when there is no ``work_dir``): calibration never holds more than one layer's
quantized tensors (~1 byte per weight, ~7 GB for a 7B model), and the writer reads each tensor back
memory-mapped, one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import torch

from ... import __version__
from ..checkpoint import Checkpoint
from ..errors import InputError
from ..formats import QuantizedTensor
from ..kformats import KQuantTensor


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(ckpt: Checkpoint, formats: dict[str, str], method: str, options: object, batch) -> dict:
    """What a resumed run must share with the interrupted one."""
    model = {
        "config": ckpt.config,
        "tensors": [(t.name, list(t.shape), t.source_dtype) for t in ckpt.tensors],
        "files": [(f.name, f.stat().st_size) for f in ckpt.files],
    }
    opts = asdict(options) if is_dataclass(options) else repr(options)  # type: ignore[arg-type]
    return {
        "dsq": __version__,
        "model": _sha(model),
        "recipe": _sha(sorted(formats.items())),
        "method": method,
        "options": _sha(opts),
        "data": batch.fingerprint,
    }


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# the QuantizedTensor classes a layer file holds, by the name stored with each (every dataclass field is kept:
# a GGUF K-quant tensor's dmin and sub-block scales/mins as well as codes, scale and zero)
_CLASSES: dict[str, type[QuantizedTensor]] = {"quantized": QuantizedTensor, "kquant": KQuantTensor}


def _pack(tensors: dict) -> dict:
    out = {}
    for name, v in tensors.items():
        if isinstance(v, QuantizedTensor):
            kind = next(k for k, cls in _CLASSES.items() if type(v) is cls)
            out[name] = {f.name: getattr(v, f.name) for f in fields(v)} | {"shape": list(v.shape), "class": kind}
        else:
            out[name] = {"tensor": v}
    return out


def _unpack_one(d: dict) -> QuantizedTensor | torch.Tensor:
    if "tensor" in d:
        return d["tensor"]
    cls = _CLASSES[d.get("class", "quantized")]
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d} | {"shape": tuple(d["shape"])})


class LayerStore(Mapping):
    """Calibrated tensors by HF name, kept on disk one file per layer and read back on access.

    :meth:`put` writes one layer's tensors (``layer-NNNNN.pt``, atomically) and keeps only their names;
    ``store[name]`` memory-maps that file and returns the tensor (QuantizedTensor or float tensor), so a
    reader that takes the tensors one at a time (``quantize_checkpoint``'s writer) holds one at a time.
    ``directory`` None: a new temporary directory, removed when the store is garbage-collected (or at
    exit). Raises InputError when a file it indexed is gone."""

    def __init__(self, directory: str | Path | None = None) -> None:
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="dsq-calib-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        else:
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, Path] = {}

    def put(self, stem: str, tensors: dict, extra: dict | None = None) -> Path:
        """Write ``tensors`` (HF name -> QuantizedTensor | tensor) as ``{stem}.pt`` with ``extra`` entries."""
        path = self.dir / f"{stem}.pt"
        _atomic_save({"tensors": _pack(tensors), **(extra or {})}, path)
        self.index(path, tensors)
        return path

    def index(self, path: Path, names) -> None:
        for name in names:
            self._where[name] = path

    def __getitem__(self, name: str) -> QuantizedTensor | torch.Tensor:
        path = self._where[name]
        try:
            packed = torch.load(path, weights_only=True, mmap=True)["tensors"]
        except FileNotFoundError:
            raise InputError(f"{path}: calibrated tensors of `{name}` are gone (deleted during the run?)") from None
        return _unpack_one(packed[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class ResumeState:
    def __init__(self, work_dir: str | Path, fp: dict) -> None:
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = LayerStore(self.dir)
        fp_path = self.dir / "fingerprint.json"
        if fp_path.is_file():
            try:
                old = json.loads(fp_path.read_text())
            except json.JSONDecodeError:
                old = {}
            diff = [k for k in fp if old.get(k) != fp[k]]
            if diff:
                raise InputError(
                    f"{self.dir}: holds a calibration run with a different {', '.join(diff)}; refusing to resume "
                    "from it. Delete the directory or give another --work-dir"
                )
        else:
            _atomic_text(json.dumps(fp, indent=2), fp_path)
        state = self.dir / "state.json"
        self.next_layer = int(json.loads(state.read_text())["next_layer"]) if state.is_file() else 0

    def save(
        self, layer: int, tensors: dict, report: object, hidden: list[torch.Tensor], ref: list[torch.Tensor] | None
    ) -> None:
        rep = asdict(report) if is_dataclass(report) else dict(report)  # type: ignore[arg-type]
        self.store.put(f"layer-{layer:05d}", tensors, {"report": json.dumps(rep)})
        _atomic_save({"hidden": list(hidden), "reference": None if ref is None else list(ref)}, self.dir / "hidden.pt")
        _atomic_text(json.dumps({"next_layer": layer + 1}), self.dir / "state.json")
        self.next_layer = layer + 1

    def load(self) -> tuple[LayerStore, list[dict], list[torch.Tensor], list[torch.Tensor] | None]:
        """(the finished layers' tensors, indexed in ``self.store``, not read; their reports; the hidden
        states after the last one: quantized stream, float reference or None)."""
        reports: list[dict] = []
        for i in range(self.next_layer):
            path = self.dir / f"layer-{i:05d}.pt"
            if not path.is_file():
                raise InputError(f"{self.dir}: {path.name} is missing; delete the directory to start over")
            d = torch.load(path, weights_only=True, mmap=True)  # names and report only: no tensor is read
            self.store.index(path, d["tensors"])
            reports.append(json.loads(d["report"]))
        saved = torch.load(self.dir / "hidden.pt", weights_only=True)
        return self.store, reports, saved["hidden"], saved["reference"]
