"""Weights for the ONNX export: dsq's QuantizedTensors re-packed for ``com.microsoft::MatMulNBits``,
float tensors as float32 initializers, all streamed into one external-data file.

MatMulNBits (onnxruntime/docs/ContribOperators.md, ``MatMulNBits``) computes ``A @ W^T`` with
``W[n, k] = (q[n, k] - zp[n, k // block]) * scale[n, k // block]``:

* ``B``: uint8 ``[N, K / block, block * bits / 8]``; 4-bit values pack two per byte, element ``2j`` in
  the low nibble and ``2j + 1`` in the high nibble.
* ``scales``: ``[N * K / block]`` in A's float type (dsq's fp16 scales widen to float32 exactly).
* ``zero_points``: optional; when omitted the op uses ``2^(bits-1)`` (8 for 4-bit, 128 for 8-bit).
  4-bit zero points pack like B, per row padded to a whole byte.

So dsq's symmetric codes (int8 in [-8, 7] or [-127, 127]) become ``code + 2^(bits-1)`` with the
default zero point, and int4 asym codes/zeros go in as they are: no value is re-rounded. Verified
numerically in tests/test_onnx_weights.py against ``QuantizedTensor.dequantize()``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from ..dsquant.errors import UnsupportedError
from ..dsquant.formats import FORMATS, QuantizedTensor, StreamPool

DATA_NAME = "model.onnx.data"
# Initializers at or above this size go to the external-data file while streaming.
_EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class Packing:
    """How one dsq format family reaches ONNX."""

    op: str  # "MatMulNBits" or "float": dequantized to a float32 MatMul weight at export
    bits: int = 0
    note: str = ""


# A format's packing kind (formats.QuantFormat.packing) -> how it reaches ONNX. Integer codes with a scale (and
# zero point) per block of a row are MatMulNBits' own layout, at the format's bits. fp8 has no CPU kernel in
# onnxruntime (MatMulNBits is integer-only and float8 DequantizeLinear needs opset 19 + an EP with float8
# support), so it is dequantized at export.
PACKINGS: dict[str, Packing] = {
    "int": Packing("MatMulNBits"),
    "fp8": Packing("float", note="fp8 blocks dequantized to float32 at export (no fp8 MatMul on ORT CPU)"),
}


def packing_for(fmt_name: str) -> Packing:
    fmt = FORMATS.get(fmt_name)
    p = PACKINGS.get(fmt.packing) if fmt is not None else None
    if p is None:
        raise UnsupportedError(f"format {fmt_name}: no ONNX packing; known packings: {', '.join(PACKINGS)}")
    return replace(p, bits=fmt.bits) if p.op == "MatMulNBits" else p


def nbits_block_ok(qt: QuantizedTensor) -> bool:
    block = qt.fmt.block_cols or qt.shape[1]
    return block >= 16 and block & (block - 1) == 0 and qt.shape[1] % block == 0


@dataclass(frozen=True)
class PackedNBits:
    """MatMulNBits inputs for one weight (``B``/``scales`` None once written: ``WeightTable.ingest``)."""

    B: np.ndarray | None
    scales: np.ndarray | None
    zero_points: np.ndarray | None
    K: int
    N: int
    bits: int
    block_size: int


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    """[..., 2m] uint8 values in [0, 15] -> [..., m] bytes, even index in the low nibble."""
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


# Rows per slice when packing / quantizing at export: ~4M weights, so the int16/float32 temporaries of a slice stay
# a few MB whatever the matrix (the 7B head, 152064x3584, was packed whole: 3.8 GB of int16 temporaries).
_SLICE_WEIGHTS = 1 << 22


def _row_slices(n: int, k: int, rows: int | None = None):
    step = rows or max(1, _SLICE_WEIGHTS // max(k, 1))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def pack_matmulnbits(qt: QuantizedTensor, rows: int | None = None) -> PackedNBits:
    """dsq codes/scales/zeros -> MatMulNBits B/scales/zero_points, unchanged in value.

    Packed in slices of ``rows`` rows (default: ~4M weights) straight into the output arrays, so memory beyond
    ``qt`` itself is the packed result plus one slice."""
    fmt = qt.fmt
    p = packing_for(qt.format)
    if p.op != "MatMulNBits":
        raise UnsupportedError(f"{qt.format}: not a MatMulNBits format")
    n, k = qt.shape
    block = fmt.block_cols or k
    if k % block:
        raise UnsupportedError(f"{qt.format}: K={k} is not a multiple of the block {block}")
    nb = k // block
    offset = 0 if qt.zero is not None else 1 << (p.bits - 1)
    B = np.empty((n, nb, block * p.bits // 8), np.uint8)
    for r0, r1 in _row_slices(n, k, rows):
        # int8 + offset wraps in uint8 exactly as (int16 + offset) -> uint8 did: codes lie in [-2^(b-1), 2^(b-1))
        q = qt.codes[r0:r1].numpy().view(np.uint8).reshape(r1 - r0, nb, block) + np.uint8(offset)
        B[r0:r1] = _pack_nibbles(q) if p.bits == 4 else q
    scales = qt.scale.to(torch.float32).numpy().reshape(-1)
    zp = None
    if qt.zero is not None:
        z = qt.zero.numpy().astype(np.uint8).reshape(n, nb)
        if p.bits == 4:
            if nb % 2:
                z = np.pad(z, ((0, 0), (0, 1)))
            z = _pack_nibbles(z)
        zp = np.ascontiguousarray(z).reshape(-1)
    return PackedNBits(B, np.ascontiguousarray(scales), zp, k, n, p.bits, block)


@dataclass(frozen=True)
class PackedWeight:
    """A float matrix quantized to ``format`` at export and already MatMulNBits-packed (the embedding / lm_head):
    its dsq codes never exist whole. :func:`quantize_packed` makes one; ``WeightTable.ingest`` takes it."""

    format: str
    shape: tuple[int, int]
    packed: PackedNBits


def quantize_packed(fmt_name: str, w: torch.Tensor, name: str = "<tensor>", rows: int | None = None) -> PackedWeight:
    """``pack_matmulnbits(FORMATS[fmt_name].quantize(w))``, the same bytes, computed in slices of ``rows`` rows
    (default ~4M weights): memory beyond ``w`` is the packed result plus one slice's float32 copy and codes
    (the whole 7B head at once peaked at 4.1 GB; dsq's formats quantize each row on its own, so slicing by rows
    changes no value). Raises what the format's ``quantize`` raises (shape, NaN/Inf, naming ``name``)."""
    fmt = FORMATS[fmt_name]
    if fmt.block_rows != 1:
        raise UnsupportedError(f"{name}: {fmt_name} has blocks of {fmt.block_rows} rows; no row-sliced packing")
    n, k = w.shape
    bits, block = packing_for(fmt_name).bits, fmt.block_cols or k
    nb = k // block
    B = np.empty((n, nb, block * bits // 8), np.uint8)
    scales = np.empty(n * nb, np.float32)

    def one(span: tuple[int, int]) -> np.ndarray | None:
        r0, r1 = span
        pt = pack_matmulnbits(fmt.quantize(w[r0:r1], name))
        B[r0:r1] = pt.B  # disjoint rows per slice: the workers never write the same bytes
        scales[r0 * nb:r1 * nb] = pt.scales
        return pt.zero_points

    # dsq's stream pool: slices on its worker threads with torch's own intra-op threads at 1 (its OpenMP threads
    # spin between the many small ops and multiplied the CPU seconds on a loaded machine)
    with StreamPool() as pool:
        zps = list(pool.workers.map(one, list(_row_slices(n, k, rows))))
    zp = None if zps[0] is None else np.concatenate(zps)
    return PackedWeight(fmt_name, (n, k), PackedNBits(B, scales, zp, k, n, bits, block))


def unpack_matmulnbits(p: PackedNBits) -> torch.Tensor:
    """The float32 weight [N, K] that MatMulNBits computes with (the inverse, for tests and proofs)."""
    nb = p.K // p.block_size
    if p.bits == 4:
        q = np.stack([p.B & 0x0F, p.B >> 4], axis=-1).reshape(p.N, nb, p.block_size)
    else:
        q = p.B.reshape(p.N, nb, p.block_size)
    if p.zero_points is None:
        z = np.full((p.N, nb), 1 << (p.bits - 1), np.float32)
    elif p.bits == 4:
        zr = p.zero_points.reshape(p.N, -1)
        z = np.stack([zr & 0x0F, zr >> 4], axis=-1).reshape(p.N, -1)[:, :nb].astype(np.float32)
    else:
        z = p.zero_points.reshape(p.N, nb).astype(np.float32)
    w = (q.astype(np.float32) - z[..., None]) * p.scales.reshape(p.N, nb)[..., None]
    return torch.from_numpy(w.reshape(p.N, p.K))


@dataclass
class InitializerSink:
    """Collects initializers; large ones are appended to ``DATA_NAME`` in ``out_dir`` as they arrive,
    so only one weight is in memory at a time. ``finish`` returns the TensorProtos for the graph."""

    out_dir: Path
    protos: list[TensorProto] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    offset: int = 0
    _fh: object = None

    def add(self, name: str, array: np.ndarray) -> str:
        if name in self.names:
            return name
        array = np.ascontiguousarray(array)
        if array.nbytes < _EXTERNAL_MIN_BYTES:
            self.protos.append(numpy_helper.from_array(array, name))
        else:
            if self._fh is None:
                self._fh = open(self.out_dir / DATA_NAME, "wb")  # noqa: SIM115 (closed in finish)
            pad = (-self.offset) % 64  # 64-byte alignment lets onnxruntime mmap the data
            self._fh.write(b"\0" * pad)
            self.offset += pad
            self._fh.write(memoryview(array.reshape(-1)).cast("B"))  # the array's own bytes: no tobytes() copy
            proto = onnx.TensorProto()
            proto.name = name
            proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            proto.dims.extend(array.shape)
            proto.data_location = TensorProto.EXTERNAL
            for key, value in (("location", DATA_NAME), ("offset", str(self.offset)), ("length", str(array.nbytes))):
                entry = proto.external_data.add()
                entry.key, entry.value = key, value
            self.protos.append(proto)
            self.offset += array.nbytes
        self.names.add(name)
        return name

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    @property
    def external_bytes(self) -> int:
        return self.offset


@dataclass
class Linear:
    """One linear weight as the graph uses it: MatMulNBits inputs, or a float32 W^T for MatMul."""

    name: str
    format: str  # dsq format, or the source dtype for float weights
    packed: PackedNBits | None = None
    B: str = ""
    scales: str = ""
    zero_points: str = ""
    WT: str = ""
    W: str = ""  # a float [N, K] initializer shared with another use (tied embeddings): Gemm with transB


# Roles whose weights the graph reads as ``x @ W^T``; embeddings are gathered, the rest used as they are.
_MATMUL_KINDS = ("linear", "router")


@dataclass
class WeightTable:
    """Every weight of the model, ingested one at a time into ``sink``; the graph asks by HF name."""

    sink: InitializerSink
    accuracy_level: int = 0
    linears: dict[str, Linear] = field(default_factory=dict)
    floats: dict[str, tuple[int, ...]] = field(default_factory=dict)
    notes: set[str] = field(default_factory=set)
    # initializers stored as float32: name -> (why, bytes), for the export summary
    float_bytes: dict[str, tuple[str, int]] = field(default_factory=dict)

    def ingest(self, name: str, t: QuantizedTensor | PackedWeight | torch.Tensor, kind: str) -> None:
        if isinstance(t, PackedWeight):
            self._add_packed(name, t.format, t.packed)
            return
        if isinstance(t, QuantizedTensor):
            p = packing_for(t.format)
            if p.note:
                self.notes.add(p.note)
            if p.op == "MatMulNBits" and not nbits_block_ok(t):
                # MatMulNBits needs a power-of-two block >= 16 (e.g. int8_channel on K=896 is not).
                self.notes.add(f"{t.format} with K={t.shape[1]}: no MatMulNBits block; dequantized to float32")
                why = f"{t.format}: no MatMulNBits block"
            elif p.op == "MatMulNBits":
                self._add_packed(name, t.format, pack_matmulnbits(t))
                return
            else:
                why = f"{t.format}: {p.note or 'no MatMulNBits packing'}"
            self._add_float_linear(name, t.dequantize(), t.format, why)
            return
        if kind in _MATMUL_KINDS and t.ndim == 2:
            self._add_float_linear(name, t, str(t.dtype).removeprefix("torch."), f"{kind} kept unquantized")
        else:
            arr = t.to(torch.float32).numpy()
            self.sink.add(name, arr)
            self.floats[name] = tuple(t.shape)
            self.float_bytes[name] = (kind, arr.nbytes)

    def _add_packed(self, name: str, fmt: str, packed: PackedNBits) -> None:
        # the graph keeps the shapes and the (small) zero points; codes and scales are on disk once the
        # sink has them, so holding them here would keep the whole model in memory (8.6 GB peak at 7B)
        lin = Linear(name, fmt, dataclasses.replace(packed, B=None, scales=None))
        lin.B = self.sink.add(name + ".B", packed.B)
        lin.scales = self.sink.add(name + ".scales", packed.scales)
        if packed.zero_points is not None:
            lin.zero_points = self.sink.add(name + ".zero_points", packed.zero_points)
        self.linears[name] = lin

    def _add_float_linear(self, name: str, w: torch.Tensor, fmt: str, why: str) -> None:
        wt = w.to(torch.float32).t().contiguous().numpy()
        self.linears[name] = Linear(name, fmt, WT=self.sink.add(name + ".T", wt))
        self.float_bytes[name] = (why, wt.nbytes)

    def tie(self, name: str, embedding: str) -> None:
        """``name`` computes with the embedding matrix itself (tie_word_embeddings): no second copy.

        A quantized embedding is already MatMulNBits-packed: the head's MatMulNBits reads the very same
        B/scales/zero_points initializers the lookup's GatherBlockQuantized reads (through a Reshape, which
        onnxruntime folds at load), so the file holds the matrix once. A float one is read by Gemm(transB)."""
        emb = self.linears.get(embedding)
        if emb is not None and emb.packed is not None:
            self.linears[name] = dataclasses.replace(emb, name=name)
            self.notes.add(f"{name}: tied to {embedding} ({emb.format}: one packed matrix for "
                           "GatherBlockQuantized and MatMulNBits)")
            return
        shape = self.floats[embedding]
        self.linears[name] = Linear(name, f"tied to {embedding}", W=embedding)
        self.notes.add(f"{name}: tied to {embedding} ({shape[0]}x{shape[1]} float32, Gemm transB)")

    def dq_zero_points(self, name: str) -> str:
        """The zero points of packed linear ``name`` as an explicit [N, K / block] uint4/uint8 initializer for
        ``DequantizeLinear`` (which, unlike MatMulNBits, has no 2^(bits-1) default and no per-row byte padding)."""
        p = self.linear(name).packed
        nb = p.K // p.block_size
        if p.zero_points is None:
            z = np.full((p.N, nb), 1 << (p.bits - 1), np.uint8)
        elif p.bits == 4:
            zr = p.zero_points.reshape(p.N, -1)
            z = np.stack([zr & 0x0F, zr >> 4], axis=-1).reshape(p.N, -1)[:, :nb]
        else:
            z = p.zero_points.reshape(p.N, nb)
        zname = f"{name}.dq_zero_points"
        if zname not in self.sink.names:
            if p.bits == 4:
                proto = onnx.helper.make_tensor(zname, TensorProto.UINT4, [p.N, nb], z.reshape(-1).astype(np.int32))
            else:
                proto = numpy_helper.from_array(np.ascontiguousarray(z, np.uint8), zname)
            self.sink.protos.append(proto)
            self.sink.names.add(zname)
        return zname

    def alias(self, src: str, dtype: int, dims: list[int], name: str) -> str:
        """A second initializer over the bytes of ``src`` (same external-data range, or a copy of small inline
        bytes) typed ``dtype`` with ``dims``."""
        if name in self.sink.names:
            return name
        proto = next(t for t in self.sink.protos if t.name == src)
        new = onnx.TensorProto()
        new.CopyFrom(proto)
        new.name, new.data_type = name, dtype
        del new.dims[:]
        new.dims.extend(dims)
        self.sink.protos.append(new)
        self.sink.names.add(name)
        return name

    def linear(self, name: str) -> Linear:
        try:
            return self.linears[name]
        except KeyError:
            raise UnsupportedError(f"{name}: the checkpoint has no such linear weight, which this graph needs") from None

    def float(self, name: str) -> str:
        if name not in self.floats:
            raise UnsupportedError(f"{name}: the checkpoint has no such tensor, which this graph needs")
        return name

    def has(self, name: str) -> bool:
        return name in self.linears or name in self.floats
