"""K-quants and the 32-blocks, with and without an importance matrix, byte-equal to ggml (export/kq_types.py).

The reference is ggml itself: ``ggml_quantize_chunk(type, rows, dst, 0, nrows, n_per_row, imatrix)`` from
llama-cpp-python's libggml-base (its ``*_ref`` quantizers without an imatrix, ``quantize_row_*_impl`` with
one), and ``llama_model_quantize`` with an imatrix for a whole file. Every block must be identical (no
tolerance): dsq's sums, divisions and square roots are ggml's float32 operations in ggml's order.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize

from dsq.dsquant.errors import InputError, UnsupportedError
from dsq.dsquant.kq_types import K_KINDS, quantize_k, quantize_legacy
from dsq.export.gguf_quants import GGUF_TYPES, encode


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def ggml(llama_cpp):
    """ggml_quantize_chunk(type, float rows, importance or None) -> bytes."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]

    def run(gt: GT, x: torch.Tensor, imp: torch.Tensor | None) -> np.ndarray:
        src = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        block, size = GGML_QUANT_SIZES[gt]
        dst = np.zeros(src.size // block * size, dtype=np.uint8)
        qw = None if imp is None else np.ascontiguousarray(imp.numpy(), dtype=np.float32)
        n = fn(int(gt), src.ctypes.data, dst.ctypes.data, 0, src.shape[0], src.shape[1],
               None if qw is None else qw.ctypes.data)
        assert n == dst.size
        return dst

    return run


def rows() -> torch.Tensor:
    """Gaussian rows of different scales, heavy-tailed rows (normal / uniform: slash-distributed), and the awkward
    blocks: all zero, constant, all positive (the min clamps to 0), a huge outlier, tiny values, a zero row,
    codes on .5 boundaries."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 768, generator=g) * torch.rand(48, 1, generator=g) * 0.05
    w[:16] = torch.randn(16, 768, generator=g) / torch.rand(16, 768, generator=g).clamp(min=0.02) * 0.002
    w[16, :256] = 0.0
    w[17, :32] = 0.5
    w[18, :256] = w[18, :256].abs() + 0.01
    w[19, 7] = 3.0
    w[20, :256] *= 1e-4
    w[21] = 0.0
    w[22, :32] = torch.arange(32) / 31.0
    w[23, :32] = torch.linspace(-1, 1, 32)
    return w


def importance(k: int = 768, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    imp = torch.exp(2.0 * torch.randn(k, generator=g))  # heavy-tailed mean x^2 per column
    imp[5] = 0.0  # a column no token ever used
    return imp


@pytest.mark.parametrize("kind", K_KINDS)
@pytest.mark.parametrize("with_importance", [False, True])
def test_k_quants_equal_ggml_block_for_block(kind, with_importance, ggml):
    w = rows()
    imp = importance() if with_importance else None
    gt = GT[kind.upper()]
    data, values = quantize_k(kind, w, imp)
    theirs = ggml(gt, w, imp)
    size = GGML_QUANT_SIZES[gt][1]
    same = (data.reshape(-1, size) == theirs.reshape(-1, size)).all(1)
    assert same.all(), f"{int((~same).sum())} of {same.size} blocks differ, first {int(np.argmin(same))}"
    back = np.asarray(dequantize(data.reshape(w.shape[0], -1), gt), dtype=np.float32)
    assert np.array_equal(back, values.numpy())  # gguf-py reads dsq's values back bit for bit


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_32_blocks_with_importance_equal_ggml(kind, ggml):
    w, imp = rows(), importance()
    gt = GT[kind.upper()]
    data, values = quantize_legacy(kind, w, imp)
    assert np.array_equal(data, ggml(gt, w, imp))
    back = np.asarray(dequantize(data.reshape(w.shape[0], -1), gt), dtype=np.float32)
    assert np.array_equal(back, values.numpy())
    for given in (None, imp):  # what the GGUF writer does with float rows: ggml's bytes with or without importance
        data, _ = encode(w, GGUF_TYPES[kind], "w", importance=None if given is None else given.numpy())
        assert np.array_equal(data, ggml(gt, w, given)), given is None


def test_importance_lowers_the_weighted_error():
    """What the imatrix path is for: the error weighted by the importance drops (Q4_K, heavy-tailed importance)."""
    w = rows()[24:]
    imp = importance()
    _, plain = quantize_k("q4_k", w)
    _, weighted = quantize_k("q4_k", w, imp)

    def werr(v: torch.Tensor) -> float:
        return float(((v - w).pow(2) * imp).sum())

    assert werr(weighted) < 0.85 * werr(plain), (werr(weighted), werr(plain))


def test_bad_shapes_are_refused():
    with pytest.raises(UnsupportedError, match="rows of 576"):
        quantize_k("q4_k", torch.zeros(2, 576))
    with pytest.raises(UnsupportedError, match=r"importance has shape \(256,\)"):
        quantize_k("q6_k", torch.zeros(2, 512), torch.ones(256))
    with pytest.raises(UnsupportedError, match="whole blocks of 32"):
        quantize_legacy("q5_0", torch.zeros(2, 48), torch.ones(48))


def _f32_model(model_dir, tmp_path) -> tuple[Path, Path]:
    """The llama fixture and its F32 GGUF (llama.cpp then quantizes the same float32 values dsq does)."""
    from dsq.export.gguf_writer import export_gguf

    src = model_dir("llama")
    f32 = tmp_path / "f32.gguf"
    export_gguf(src, f32, type="f32")
    return src, f32


def test_export_with_imatrix_equals_llama_quantize_with_it(llama_cpp, model_dir, tmp_path):
    """``dsq export --type q4_k_m --imatrix F`` and llama.cpp's quantizer given the same importance: every tensor's
    type and bytes identical (Q4_K, Q6_K and the 32-block fallbacks, all on ggml's imatrix paths)."""
    from dsq.dsquant.calib.imatrix_file import Imatrix, ImatrixEntry, write_imatrix
    from dsq.export.gguf_writer import export_gguf

    src, f32 = _f32_model(model_dir, tmp_path)
    g = torch.Generator().manual_seed(7)
    entries, keep, c_entries = {}, [], []
    for t in GGUFReader(f32).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2 and "norm" not in t.name:
            cols = int(t.shape[0])
            imp = torch.exp(1.5 * torch.randn(cols, generator=g)).numpy().astype(np.float32)
            entries[t.name] = ImatrixEntry(imp.reshape(1, -1), np.ones(1, np.float32))  # count 1: sums are means
            data = (ctypes.c_float * cols)(*imp.tolist())
            keep.append(data)
            c_entries.append(llama_cpp.llama_model_imatrix_data(t.name.encode(), data, cols))
    im_path = write_imatrix(tmp_path / "imatrix.gguf", Imatrix(entries, ["test"], 1, 1))
    mine = tmp_path / "mine.gguf"
    export_gguf(src, mine, type="q4_k_m", imatrix=im_path)

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    arr = (llama_cpp.llama_model_imatrix_data * (len(c_entries) + 1))(*c_entries)
    params.imatrix = arr
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0

    ours = {t.name: t for t in GGUFReader(mine).tensors}
    kinds = set()
    for t in GGUFReader(theirs).tensors:
        o = ours[t.name]
        assert o.tensor_type == t.tensor_type, t.name
        if t.name in entries:
            assert np.array_equal(np.asarray(o.data).reshape(-1).view(np.uint8),
                                  np.asarray(t.data).reshape(-1).view(np.uint8)), (t.name, t.tensor_type.name)
            kinds.add(t.tensor_type.name)
    assert {"Q4_K", "Q6_K"} <= kinds, kinds


def test_export_refuses_an_imatrix_for_another_model(model_dir, tmp_path):
    from dsq.dsquant.calib.imatrix_file import Imatrix, ImatrixEntry, write_imatrix
    from dsq.export.gguf_writer import export_gguf

    bad = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 100), np.float32), np.ones(1, np.float32))})
    path = write_imatrix(tmp_path / "bad.gguf", bad)
    with pytest.raises(InputError, match="blk.0.attn_q.weight.*another model"):
        export_gguf(model_dir("llama"), tmp_path / "x.gguf", type="q4_k_m", imatrix=path)


def test_cli_export_imatrix_flag(model_dir, tmp_path):
    """``dsq export --imatrix F`` writes what ``export_gguf(..., imatrix=F)`` writes (the flag reaches the packers:
    the file differs from the one without it), and other targets refuse the flag by name."""
    from typer.testing import CliRunner

    from dsq.cli import app
    from dsq.dsquant.calib.imatrix_file import Imatrix, ImatrixEntry, write_imatrix
    from dsq.export.gguf_writer import export_gguf

    src = model_dir("llama")
    g = torch.Generator().manual_seed(1)
    entry = ImatrixEntry(torch.exp(torch.randn(1, 256, generator=g)).numpy(), np.ones(1, np.float32))
    path = write_imatrix(tmp_path / "im.gguf", Imatrix({"blk.0.attn_q.weight": entry}))
    res = CliRunner().invoke(app, ["export", str(src), "--to", "gguf", "-o", str(tmp_path / "cli.gguf"), "--type",
                                   "q4_k_m", "--imatrix", str(path), "--no-check"])
    assert res.exit_code == 0, res.output
    export_gguf(src, tmp_path / "api.gguf", type="q4_k_m", imatrix=path)
    export_gguf(src, tmp_path / "plain.gguf", type="q4_k_m")

    def data(p: Path, name: str) -> bytes:
        return next(np.asarray(t.data).tobytes() for t in GGUFReader(p).tensors if t.name == name)

    assert data(tmp_path / "cli.gguf", "blk.0.attn_q.weight") == data(tmp_path / "api.gguf", "blk.0.attn_q.weight")
    assert data(tmp_path / "cli.gguf", "blk.0.attn_q.weight") != data(tmp_path / "plain.gguf", "blk.0.attn_q.weight")
    assert data(tmp_path / "cli.gguf", "blk.1.attn_q.weight") == data(tmp_path / "plain.gguf", "blk.1.attn_q.weight")
    res = CliRunner().invoke(app, ["export", str(src), "--to", "onnx", "-o", str(tmp_path / "o"), "--imatrix", str(path)])
    assert res.exit_code == 2 and "--imatrix is not an option of --to onnx" in res.output, res.output
