"""Resumable calibration: a work directory checkpointed after every finished layer.

Layout of ``work_dir``::

    fingerprint.json     model + recipe + method/options + calibration data (a mismatch refuses to resume)
    layer-00012.pt       that layer's results: quantized tensors (codes/scale/zero), rescaled floats, report
    hidden.pt            hidden states after the last finished layer: quantized stream (+ float reference)
    state.json           {"next_layer": 13}; written last, by rename, so a kill leaves a consistent state

Files are written to a temporary name and renamed, so a run killed mid-write resumes from the last
layer whose ``state.json`` update landed. Tensors are saved as plain dicts of tensors and loaded
with ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from ... import __version__
from ..checkpoint import Checkpoint
from ..errors import InputError
from ..formats import QuantizedTensor


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


def _pack(tensors: dict) -> dict:
    out = {}
    for name, v in tensors.items():
        if isinstance(v, QuantizedTensor):
            out[name] = {"format": v.format, "shape": list(v.shape), "codes": v.codes, "scale": v.scale, "zero": v.zero}
        else:
            out[name] = {"tensor": v}
    return out


def _unpack(packed: dict) -> dict:
    out: dict = {}
    for name, d in packed.items():
        if "tensor" in d:
            out[name] = d["tensor"]
        else:
            out[name] = QuantizedTensor(d["format"], tuple(d["shape"]), d["codes"], d["scale"], d["zero"])
    return out


class ResumeState:
    def __init__(self, work_dir: str | Path, fp: dict) -> None:
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
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
        _atomic_save({"tensors": _pack(tensors), "report": json.dumps(rep)}, self.dir / f"layer-{layer:05d}.pt")
        _atomic_save({"hidden": list(hidden), "reference": None if ref is None else list(ref)}, self.dir / "hidden.pt")
        _atomic_text(json.dumps({"next_layer": layer + 1}), self.dir / "state.json")
        self.next_layer = layer + 1

    def load(self) -> tuple[dict, list[dict], list[torch.Tensor], list[torch.Tensor] | None]:
        tensors: dict = {}
        reports: list[dict] = []
        for i in range(self.next_layer):
            path = self.dir / f"layer-{i:05d}.pt"
            if not path.is_file():
                raise InputError(f"{self.dir}: {path.name} is missing; delete the directory to start over")
            d = torch.load(path, weights_only=True)
            tensors.update(_unpack(d["tensors"]))
            reports.append(json.loads(d["report"]))
        saved = torch.load(self.dir / "hidden.pt", weights_only=True)
        return tensors, reports, saved["hidden"], saved["reference"]
