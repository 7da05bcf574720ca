"""``dsq inspect`` on GGUF files: a real export, every truncation of it, and hand-made hostile headers.

A hostile header must fail fast with CorruptFileError (a DsqError: one line, exit 2), never hang,
allocate what the file cannot hold, or raise anything else.
"""

from __future__ import annotations

import struct
import time

import pytest

from dsq.dsquant.errors import CorruptFileError
from dsq.dsquant.inspect import describe
from dsq.export.gguf_writer import export_gguf

U32, U64, STRING, ARRAY = 4, 10, 8, 9


def s(text: str | bytes, length: int | None = None) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b) if length is None else length) + b


def header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv_u32(key: str, v: int) -> bytes:
    return s(key) + struct.pack("<II", U32, v)


def tensor_info(name: str, dims: list[int], ttype: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    out = s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
    out += b"".join(struct.pack("<Q", d) for d in dims)
    return out + struct.pack("<IQ", ttype, offset)


def one_f32_tensor(dims=(8,), offset=0, extra_kv=b"", n_kv=1) -> bytes:
    body = header(1, n_kv) + s("general.architecture") + struct.pack("<I", STRING) + s("llama") + extra_kv
    body += tensor_info("t", list(dims), 0, offset)
    body += b"\0" * (-len(body) % 32)
    return body + b"\0" * 4 * 8


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory, quantized_dir):
    out = tmp_path_factory.mktemp("inspect") / "m.gguf"
    export_gguf(quantized_dir("qwen2", "int4"), out)
    return out


def test_real_export_is_described(real_gguf):
    d = describe(real_gguf)
    assert d.kind == "gguf" and d.architecture == "qwen2"
    assert d.dtype_counts["Q4_0"] == 14
    assert d.facts["qwen2.block_count"] == 2


def test_every_truncation_fails_cleanly_and_fast(real_gguf, tmp_path):
    data = real_gguf.read_bytes()
    # the header (metadata + tensor table) ends where the first tensor's data starts
    desc_end = len(data) - describe(real_gguf).facts["bytes"]
    cuts = list(range(0, min(desc_end, 600))) + list(range(600, desc_end, 41)) + [desc_end + 1, len(data) - 1]
    p = tmp_path / "cut.gguf"
    t0 = time.perf_counter()
    for n in cuts:
        p.write_bytes(data[:n])
        with pytest.raises(CorruptFileError):
            describe(p)
    assert time.perf_counter() - t0 < 30


HOSTILE = {
    "bad magic": header(0, 0, magic=b"GGUX"),
    "unsupported version": header(0, 0, version=99),
    "huge tensor count": header(2**62, 0),
    "huge kv count": header(0, 2**60),
    "huge string length": header(0, 1) + s("k", length=2**62),
    "huge array count": header(0, 1) + s("k") + struct.pack("<IIQ", ARRAY, U32, 2**61),
    "huge string array": header(0, 1) + s("k") + struct.pack("<IIQ", ARRAY, STRING, 2**40),
    "unknown value type": header(0, 1) + s("k") + struct.pack("<I", 77),
    "unknown array item type": header(0, 1) + s("k") + struct.pack("<IIQ", ARRAY, 77, 1),
    "deeply nested arrays": header(0, 1) + s("k") + struct.pack("<IIQ", ARRAY, ARRAY, 1)
    + struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U32, 1) + b"\0" * 64,
    "too many dims": header(1, 0) + tensor_info("t", [1] * 3, n_dims=10**6),
    "unknown tensor type": header(1, 0) + tensor_info("t", [32], ttype=999),
    "row not whole blocks": header(1, 0) + tensor_info("t", [33], ttype=2),
    "offset past the end": one_f32_tensor(offset=2**40),
    "dims overflow the file": one_f32_tensor(dims=(2**32, 2**32)),
    "string past the end": header(0, 1) + s("k", length=1000),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_fail_fast(case, tmp_path):
    p = tmp_path / "h.gguf"
    p.write_bytes(HOSTILE[case])
    t0 = time.perf_counter()
    with pytest.raises(CorruptFileError):
        describe(p)
    assert time.perf_counter() - t0 < 2


def test_hand_made_valid_file_is_accepted(tmp_path):
    """The builders above make files the reader accepts, so each hostile case fails for its one flaw."""
    p = tmp_path / "ok.gguf"
    p.write_bytes(one_f32_tensor())
    d = describe(p)
    assert d.tensors == [("t", "F32", [8], 32)]


def test_zero_alignment_is_rejected(tmp_path):
    p = tmp_path / "a.gguf"
    p.write_bytes(one_f32_tensor(extra_kv=kv_u32("general.alignment", 0), n_kv=2))
    with pytest.raises(CorruptFileError):
        describe(p)


def _two_f32_tensors(names: tuple[str, str], second_offset: int) -> bytes:
    body = header(2, 1) + s("general.architecture") + struct.pack("<I", STRING) + s("llama")
    body += tensor_info(names[0], [8], 0, 0) + tensor_info(names[1], [8], 0, second_offset)
    body += b"\0" * (-len(body) % 32)
    return body + b"\0" * 4 * 8 * 3


@pytest.mark.parametrize("names,offset,why", [(("a", "b"), 32, None), (("a", "a"), 32, "listed twice"),
                                              (("a", "b"), 36, "not a multiple of the file's alignment")])
def test_duplicate_names_and_unaligned_offsets_are_refused(tmp_path, names, offset, why):
    """gguf.cpp refuses both; dsq inspect must not describe such a file as valid."""
    p = tmp_path / "d.gguf"
    p.write_bytes(_two_f32_tensors(names, offset))
    if why is None:
        assert [t[0] for t in describe(p).tensors] == ["a", "b"]
        return
    with pytest.raises(CorruptFileError, match=why):
        describe(p)


def test_empty_onnx_file_is_not_a_model(tmp_path):
    pytest.importorskip("onnx")
    p = tmp_path / "model.onnx"
    p.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="not an ONNX model"):
        describe(p)
    with pytest.raises(CorruptFileError, match="not an ONNX model"):
        describe(tmp_path)  # the folder form, as `dsq export --to onnx` writes it
