"""A generator of hostile and broken model inputs, built in temporary directories (no committed binaries).

Each function takes a valid tiny checkpoint (tests/fixtures.py) or a path and writes one broken
variant: the kinds of issue 13 (reads outside the folder, absurd hyperparameters, hangs, wrong JSON/TOML
types, interruptions). The tests in this folder feed them to the ``dsq`` CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

SECRET = "TOP-SECRET-CONTENT-OUTSIDE-THE-MODEL-FOLDER"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def secret_file(tmp: Path) -> Path:
    """A file outside every model folder that no output may ever contain."""
    p = tmp / "outside" / "secret.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(SECRET)
    return p


def link_side_file(model: Path, name: str, target: Path) -> Path:
    """Replace the side file ``name`` of ``model`` by a symlink to ``target``."""
    p = model / name
    if p.exists() or p.is_symlink():
        p.unlink()
    p.symlink_to(target)
    return p


def edit_json(path: Path, **changes) -> Path:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def deep_json(depth: int) -> str:
    """``{"a": [[[...]]]}``: nesting a recursive parser cannot survive."""
    return '{"model_type": "llama", "a": ' + "[" * depth + "]" * depth + "}"


def deep_toml(depth: int) -> str:
    return 'default = "int4_sym_g32"\nx = ' + "[" * depth + "]" * depth + "\n"


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    """A safetensors file with an arbitrary (possibly ill-typed) JSON header."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def single_shard_model(model: Path, dst: Path, header: object, data: bytes = b"") -> Path:
    """``model``'s config and tokenizer with one hand-written safetensors file (no index)."""
    dst.mkdir(parents=True)
    for f in model.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    raw_safetensors(dst / "model.safetensors", header, data)
    return dst


def hub_cache_layout(model: Path, hub: Path, org: str = "org", name: str = "tiny") -> Path:
    """``model`` laid out as huggingface_hub's cache does it: every file of the snapshot a relative symlink
    to ``../../blobs/<name>`` (https://huggingface.co/docs/huggingface_hub/guides/manage-cache).
    Returns the snapshot folder (what snapshot_download returns)."""
    repo = hub / f"models--{org}--{name}"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for i, f in enumerate(sorted(model.iterdir())):
        blob = blobs / f"{i:064x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


def onnx_with_external_data(folder: Path, location: str) -> Path:
    """A one-initializer ONNX model whose tensor's bytes live in ``location`` (external data)."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[t],
    )
    onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"))
    return folder


def patch_gguf_u32(src: Path, dst: Path, key: str, value: int) -> Path:
    """Copy of the GGUF ``src`` with the UINT32 metadata ``key`` set to ``value`` (patched in place)."""
    data = bytearray(src.read_bytes())
    needle = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", 4)  # GGUF type 4: UINT32
    i = data.find(needle)
    assert i >= 0, f"{key} not a UINT32 key of {src}"
    struct.pack_into("<I", data, i + len(needle), value)
    dst.write_bytes(bytes(data))
    return dst


def unblock_fifo_after(fifo: Path, seconds: float) -> threading.Timer:
    """If dsq regressed and blocked opening ``fifo`` for reading, open its write end after ``seconds`` so
    the test fails on its time limit instead of hanging the suite."""

    def release():
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass  # no reader waiting: dsq never opened it

    t = threading.Timer(seconds, release)
    t.daemon = True
    t.start()
    return t


def dead_pid() -> int:
    """The PID of a process that has exited (a killed run's partial carries one)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def edit_tensor(model: Path, name: str, fn) -> Path:
    """Rewrite the shard holding ``name`` with ``fn(tensor)`` in its place (any dtype or shape)."""
    from safetensors.torch import load_file, save_file

    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def patch_bytes(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """Copy of ``src`` with the first ``old`` replaced by ``new`` of the same length (a string in a header)."""
    assert len(old) == len(new)
    data = src.read_bytes()
    assert old in data, f"{old!r} not in {src}"
    dst.write_bytes(data.replace(old, new, 1))
    return dst
