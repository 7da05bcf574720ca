"""Safetensors, read and written one tensor at a time, with the header checked before any read.

Why not ``safe_open``: it memory-maps whole files, so every page a run touches counts towards RSS
until the file is closed (a 4 GB shard shows up as 4 GB of RSS). Here each tensor (or row slice) of 1 MiB
or more is mapped on its own, privately (copy-on-write), and unmapped when its tensor is dropped, so peak
RSS stays at about the largest tensor; smaller ones are read with ``os.pread``. Mapping instead of reading
saves two passes over memory per byte (the kernel zero-filling a fresh buffer, then copying the page
cache into it): measured 0.65 -> 0.02 s of system time per GB on a cached file. The format is the
documented one (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .direct_io import DirectWriter
from .errors import CorruptFileError, OutputError
from .schema import check_safetensors_header, parse_json

# safetensors dtype string <-> torch dtype: one table for reading and writing.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U32": torch.uint32,  # MLX packs its quantized weights in uint32 words
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is refused before it is read: real ones are a few MB at most
# (safetensors' own reader uses the same 100 MB bound).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: every check a hostile file could fail."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a named pipe would block open() forever
            raise CorruptFileError(f"{path}: not a regular file (a named pipe, device or directory)")
        size = st.st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptFileError(f"{path}: only {size} bytes, not a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptFileError(
                    f"{path}: header claims {n} bytes but the file has {size}; the file is truncated or not safetensors"
                )
            header_bytes = f.read(n)
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read ({e.strerror})") from None
    # Types first (schema): a list where `dtype` or `__metadata__` should be is one clear error.
    header, metadata = check_safetensors_header(parse_json(header_bytes, f"{path}: header", max_depth=None), path)
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPES:
            raise CorruptFileError(f"{path}: tensor `{name}` has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape):
            raise CorruptFileError(f"{path}: tensor `{name}` has a negative dimension {list(shape)}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise CorruptFileError(
                f"{path}: tensor `{name}` {dtype}{list(shape)} needs {expected} bytes but its offsets "
                f"[{begin}, {end}] give {end - begin}; the header lies about sizes"
            )
        if data_start + end > size:
            raise CorruptFileError(
                f"{path}: tensor `{name}` ends at byte {data_start + end} but the file has {size}; the file is truncated"
            )
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, a), (b2, _, b) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            raise CorruptFileError(f"{path}: tensors `{a}` and `{b}` overlap; the header is hostile or damaged")
    return infos, metadata


MAP_BYTES = 1 << 20  # reads at least this large are memory-mapped


def _pread(info: TensorInfo, offset: int, n: int) -> torch.Tensor:
    """n bytes at ``offset`` as a uint8 tensor: a private mapping of the file's pages for ``MAP_BYTES`` or more
    (no copy; writes to it stay in this process; the kernel is asked to read it ahead), else a fresh buffer
    read with large preads. Raises CorruptFileError when the file is shorter than the header says."""
    if n >= MAP_BYTES:
        with open(info.file, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size < offset + n:
                raise CorruptFileError(f"{info.file}: unexpected end of file in tensor `{info.name}`")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(f.fileno(), offset + n - start, access=mmap.ACCESS_COPY, offset=start)
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_WILLNEED)  # asynchronous read-ahead of the whole range
        # the array holds the mapping; it is unmapped when the last tensor viewing it is freed
        return torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=n, offset=offset - start))
    buf = torch.empty(n, dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        view = memoryview(buf.numpy())
        pos, fd = 0, f.fileno()
        while pos < n:
            got = os.preadv(fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise CorruptFileError(f"{info.file}: unexpected end of file in tensor `{info.name}`")
            pos += got
    return buf


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor with pread into a fresh buffer (no mmap, so RSS holds only this tensor)."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    flat = _pread(info, info.begin, info.nbytes)
    return flat.view(info.torch_dtype).reshape(info.shape)


def read_rows(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of dim 0, read alone: how a large tensor is processed a slice at a time."""
    rows = info.shape[0] if info.shape else 1
    if not info.shape or (start, stop) == (0, rows):
        return read_tensor(info)
    row_bytes = info.nbytes // rows
    n = (stop - start) * row_bytes
    if n == 0:
        return torch.empty((0, *info.shape[1:]), dtype=info.torch_dtype)
    flat = _pread(info, info.begin + start * row_bytes, n)
    return flat.view(info.torch_dtype).reshape(stop - start, *info.shape[1:])


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor whose name, dtype and shape are known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsWriter:
    """Writes one safetensors file whose header is written first, from the plan; data follows in order.

    Because dsq decides every output tensor's shape and dtype before quantizing anything, the header
    can be complete up front and each tensor streamed into place as soon as it is computed.
    """

    def __init__(self, path: Path, tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.order = list(tensors)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for t in self.order:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section, as safetensors does
        self._next = 0
        self._written = 0  # bytes of order[_next] written so far (tensors may arrive in row slices)
        try:
            # a 1 MiB buffer: quantized tensors arrive in cache-sized chunks of tens of KB each
            # O_DIRECT through an aligned staging buffer (direct_io.py): no page-cache copy of the output
            self._f = DirectWriter(self.path)
            self._f.write(struct.pack("<Q", len(blob)))
            self._f.write(blob)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole planned tensor."""
        self.write_part(name, tensor)
        if self._written:
            raise AssertionError(f"{self.path}: `{name}` got {self._written} of its bytes in one write")

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Write the next rows (dim 0) of the current planned tensor; it is done when all its bytes are in."""
        if self._next >= len(self.order):
            raise AssertionError(f"{self.path}: `{name}` written but every planned tensor is already complete")
        expected = self.order[self._next]
        if name != expected.name or part.dtype != expected.dtype or tuple(part.shape[1:]) != expected.shape[1:]:
            raise AssertionError(
                f"writer got {name} {part.dtype}{list(part.shape)}, planned "
                f"{expected.name} {expected.dtype}{list(expected.shape)}"
            )
        # reshape(-1): a 'contiguous' tensor with a size-1 dim can keep a non-unit stride there
        data = part.contiguous().reshape(-1).view(torch.uint8).numpy() if part.numel() else b""
        if self._written + len(data) > expected.nbytes:
            raise AssertionError(f"{self.path}: `{name}` got more bytes than planned ({expected.nbytes})")
        try:
            self._f.write(data)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror}); is the disk full?") from None
        self._written += len(data)
        if self._written == expected.nbytes:
            self._next += 1
            self._written = 0

    def close(self) -> None:
        if self._next != len(self.order):
            missing = self.order[self._next].name
            self._f.close()
            raise AssertionError(f"{self.path}: closed before `{missing}` was written")
        try:
            self._f.close()  # the tail, the length, one fsync
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror}); is the disk full?") from None
