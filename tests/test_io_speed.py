"""The I/O-speed paths of the streaming quantizer (issue 14): mapped reads, the one-pass NaN/Inf screen, the
compiled Q4_0 rounding and the error sums without a dequantized copy. Each must give what the plain way gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dsq.dsquant import safetensors_io as sio
from dsq.dsquant.errors import BadWeightsError, CorruptFileError
from dsq.dsquant.finite import has_nonfinite
from dsq.dsquant.formats import FORMATS
from dsq.dsquant.quantize import ErrorStats


@pytest.fixture
def big_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"small": torch.randn(4, 8, generator=g),
               "big": torch.randn(1024, 600, generator=g).to(torch.bfloat16)}  # 1.2 MB: mapped
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    infos, _ = sio.read_header(path)
    return path, tensors, infos


def test_mapped_reads_equal_the_data_and_never_write_back(big_file):
    path, tensors, infos = big_file
    assert infos["big"].nbytes >= sio.MAP_BYTES > infos["small"].nbytes
    before = path.read_bytes()
    big = sio.read_tensor(infos["big"])
    assert torch.equal(big, tensors["big"])
    assert torch.equal(sio.read_rows(infos["big"], 100, 900), tensors["big"][100:900])
    assert torch.equal(sio.read_tensor(infos["small"]), tensors["small"])
    big.mul_(2)  # a private mapping: the change stays in this process
    del big
    assert path.read_bytes() == before
    assert torch.equal(sio.read_tensor(infos["big"]), tensors["big"])


def test_a_file_cut_after_its_header_was_read_is_refused(big_file):
    path, _, infos = big_file
    with open(path, "r+b") as f:
        f.truncate(infos["big"].end - 10)
    with pytest.raises(CorruptFileError, match="unexpected end of file in tensor `big`"):
        sio.read_tensor(infos["big"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_screen(dtype):
    x = torch.randn(33, 65).to(dtype)
    assert not has_nonfinite(x) and not has_nonfinite(x[:, ::3])
    assert not has_nonfinite(torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).tiny], dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 40] = bad
        assert has_nonfinite(y) and has_nonfinite(y.t())
    assert not has_nonfinite(torch.zeros(0, dtype=dtype)) and not has_nonfinite(torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("name", ["int4_sym_g32", "int4_sym_g128", "int4_asym_g32", "int8_g32", "int8_channel"])
def test_error_sums_without_the_dequantized_copy(name):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 256, generator=g) * torch.rand(40, 1, generator=g)
    w[3, :32] = 0.0
    qt = FORMATS[name].quantize(w, "w")
    fast = ErrorStats.measure_quantized(w, qt)
    slow = ErrorStats.measure(w, qt.dequantize())
    assert fast[2] == slow[2]  # the max is exact
    assert fast[0] == pytest.approx(slow[0], rel=1e-5) and fast[1] == pytest.approx(slow[1], rel=1e-5)


def test_q4_0_kernel_refuses_nan_by_block():
    w = torch.randn(8, 128)
    w[5, 70] = float("nan")
    with pytest.raises(BadWeightsError, match=r"first at index \[5, 70\], block \(5, 2\) of 1x32"):
        FORMATS["int4_sym_g32"].quantize(w, "w")
    w[5, 70] = float("inf")
    with pytest.raises(BadWeightsError, match=r"\[5, 70\]"):
        FORMATS["int4_sym_g32"].quantize(w, "w")


def _pieces(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sizes = [8, 3, 4096, 1, 8 << 20, 5000, (8 << 20) - 7, 12345, 0, 77]
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("mode", ["direct", "off", "refused"])
def test_direct_writer_writes_the_same_bytes(tmp_path, monkeypatch, mode):
    """Any split of the data gives the file those bytes, with O_DIRECT, without it (DSQ_DIRECT_IO=0), and when
    the filesystem refuses it at the first write (EINVAL: falls back to buffered writes)."""
    import errno
    import os

    from dsq.dsquant import direct_io

    if mode == "off":
        monkeypatch.setenv("DSQ_DIRECT_IO", "0")
    if mode == "refused":
        real_write = os.write
        state = {"refused": False}

        def write(fd, data):
            if os.get_blocking(fd) is not None and os.fstat(fd).st_size == 0 and not state["refused"]:
                state["refused"] = True
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data)

        monkeypatch.setattr(direct_io.os, "write", write)
    pieces = _pieces()
    w = direct_io.DirectWriter(tmp_path / "f.bin")
    for p in pieces:
        w.write(p)
    assert w.tell() == sum(map(len, pieces))
    w.close()
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)
    if mode == "refused":
        assert state["refused"]


@pytest.mark.parametrize("gtype", ["q4_0", "q4_k_m", "auto"])
def test_gguf_written_in_row_blocks_is_the_same_file(model_dir, tmp_path, monkeypatch, gtype):
    """Tensors encoded and written a row block at a time (as the 7B output matrix is) give the same file as
    whole tensors: float sources (--type), and a dsq int4 checkpoint's QuantizedTensors (auto)."""
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.export import gguf_writer

    src = model_dir("llama")
    if gtype == "auto":
        quantize_checkpoint(src, tmp_path / "q", "int4")
        src = tmp_path / "q"
    gguf_writer.export_gguf(src, tmp_path / "whole.gguf", type=gtype)
    monkeypatch.setattr(gguf_writer, "STREAM_ELEMENTS", 1000)  # every 2-D weight in several blocks of 128 rows
    calls = []
    real = gguf_writer._row_blocks
    monkeypatch.setattr(gguf_writer, "_row_blocks", lambda v, stream: calls.append(len(r := real(v, stream))) or r)
    gguf_writer.export_gguf(src, tmp_path / "blocks.gguf", type=gtype)
    assert max(calls) > 1
    assert (tmp_path / "blocks.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
