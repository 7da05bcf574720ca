"""The vectorised hot paths (issue 14) against their literal definitions: Q4_0 rounding, int32 packing,
chunked/threaded streaming. Each fast path must write the bytes the straightforward code wrote."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsq.dsquant import formats
from dsq.dsquant.errors import BadWeightsError
from dsq.dsquant.formats import FORMATS, StreamPool
from dsq.dsquant.layouts import LAYOUTS, pack_int32, unpack_int32


def _q4_0_literal(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's quantize_row_q4_0_ref written out per block as dsq did before vectorising: first signed
    max by argmax, d = max / -8, q = trunc(x * (1/d) + 8.5) clamped to [0, 15], minus 8."""
    w = w.to(torch.float32)
    b = w.reshape(w.shape[0], -1, g)
    imax = b.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(b, -1, imax) / -8.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15) - 8
    return q.to(torch.int8).reshape(w.shape), d[..., 0].to(torch.float16)


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    signed_zeros = torch.where(torch.rand(24, 256, generator=g) < 0.5, 0.0, -0.0)
    return {
        "bf16 gaussian": (torch.randn(96, 1024, generator=g) * 0.02).to(torch.bfloat16),
        # few distinct values: +m and -m tie for the largest magnitude in most blocks (first one wins)
        "ties": torch.randint(-3, 4, (64, 512), generator=g).float() * 0.01,
        "signed zeros": signed_zeros,  # d = -0.0 / -8 or 0.0 / -8 by the first element's sign
        "subnormal": torch.randn(16, 256, generator=g) * 1e-39,  # 1/d overflows: the literal formula
        "mixed rows": torch.cat([torch.randn(8, 256, generator=g) * 1e-39,
                                 torch.randint(-2, 3, (8, 256), generator=g).float(),
                                 torch.randn(8, 256, generator=g) * 3.0]),
    }


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("chunk", [1, 1 << 18])
def test_int4_sym_equals_the_literal_q4_0_rounding(group, chunk, monkeypatch):
    monkeypatch.setattr(formats, "CACHE_ELEMENTS", chunk)  # 1: one row per chunk
    for case, w in _cases().items():
        qt = FORMATS[f"int4_sym_g{group}"].quantize(w, "w")
        codes, scale = _q4_0_literal(w, group)
        assert torch.equal(qt.codes, codes), case
        assert torch.equal(qt.scale.view(torch.int16), scale.view(torch.int16)), case  # -0.0 kept apart


def _q8_0_literal(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's quantize_row_q8_0_ref as dsq wrote it before: d = amax / 127, sign(x) * floor(|x| + 0.5)."""
    w = w.to(torch.float32)
    b = w.reshape(w.shape[0], -1, g)
    d = b.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    x = b * inv
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)
    return q.to(torch.int8).reshape(w.shape), d[..., 0].to(torch.float16)


@pytest.mark.parametrize("name", ["int8_g32", "int8_g128", "int8_channel"])
@pytest.mark.parametrize("chunk", [1, 1 << 18])
def test_int8_equals_the_literal_q8_0_rounding(name, chunk, monkeypatch):
    monkeypatch.setattr(formats, "CACHE_ELEMENTS", chunk)
    cases = {**_cases(), "halves": torch.arange(-128, 128).float().repeat(4, 1) / 127 * 0.5}  # exact .5 ties
    for case, w in cases.items():
        qt = FORMATS[name].quantize(w, "w")
        codes, scale = _q8_0_literal(w, FORMATS[name].block(tuple(w.shape))[1])
        assert torch.equal(qt.codes, codes), case
        assert torch.equal(qt.scale.view(torch.int16), scale.view(torch.int16)), case


def test_non_finite_in_a_later_chunk_is_named_like_the_whole_tensor_check(monkeypatch):
    monkeypatch.setattr(formats, "CACHE_ELEMENTS", 1)
    w = torch.randn(40, 64)
    w[37, 45] = float("inf")
    w[38, 3] = float("nan")
    with pytest.raises(BadWeightsError, match=r"2 non-finite value\(s\) \(NaN/Inf\), first at index \[37, 45\], "
                                              r"block \(37, 1\) of 1x32"):
        FORMATS["int4_sym_g32"].quantize(w, "w")


def test_fp16_overflow_reports_the_whole_tensor_maximum(monkeypatch):
    monkeypatch.setattr(formats, "CACHE_ELEMENTS", 1)
    w = torch.randn(8, 32)
    w[2, 0] = 8e5  # d = 1e5 > fp16 max
    w[6, 0] = -1.6e6  # the largest |d| (2e5) is in a later chunk than the first overflow
    with pytest.raises(BadWeightsError, match=r"values up to 2e\+05"):
        FORMATS["int4_sym_g32"].quantize(w, "w")


def _pack_literal(u: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    rows, cols = u.shape
    n = math.ceil(cols / per)
    u = torch.nn.functional.pad(u.to(torch.int64), (0, n * per - cols)).reshape(rows, n, per)
    words = sum(u[..., j] << (j * bits) for j in range(per))
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the two's-complement int32 word


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [8, 13, 256, 3584])
def test_int32_packing_equals_shift_and_or(bits, cols):
    g = torch.Generator().manual_seed(cols)
    u = torch.randint(0, 1 << bits, (9, cols), generator=g)
    want = _pack_literal(u, bits)
    for src in (u.to(torch.uint8), u.to(torch.int16), u.to(torch.uint8).T.contiguous().T):  # dtypes, strides
        assert torch.equal(pack_int32(src, bits), want)
    back = unpack_int32(want, bits, cols)
    assert back.dtype == torch.uint8 and torch.equal(back.to(torch.int64), u)


@pytest.mark.parametrize("name", [f for f in sorted(FORMATS) if not f.startswith("fp8") and not hasattr(FORMATS[f], "stored")])
def test_compressed_tensors_round_trip_keeps_codes_and_dtypes(name):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(3))
    qt = FORMATS[name].quantize(w, "w")
    layout = LAYOUTS["compressed-tensors"]
    back = layout.decode(qt.fmt, layout.encode("m.weight", qt), "m")
    assert back.codes.dtype == qt.codes.dtype and torch.equal(back.codes, qt.codes)
    assert torch.equal(back.scale, qt.scale)
    assert (back.zero is None) == (qt.zero is None) and (qt.zero is None or torch.equal(back.zero, qt.zero))


@pytest.mark.parametrize("name", sorted(f for f in FORMATS if not hasattr(FORMATS[f], "stored")))  # GGUF grids: test_kquant_formats
def test_block_broadcast_dequantize_equals_repeat_interleave(name):
    w = torch.randn(130, 256, generator=torch.Generator().manual_seed(4))
    qt = FORMATS[name].quantize(w, "w")
    fmt = qt.fmt
    codes = qt.codes.to(torch.float32)
    if qt.zero is not None:
        codes = codes - fmt._expand(qt.zero.to(torch.float32), qt.shape)
    assert torch.equal(qt.dequantize(), codes * fmt._expand(qt.scale.to(torch.float32), qt.shape))


def test_stream_pool_runs_torch_single_threaded_and_restores_it():
    before = torch.get_num_threads()
    with StreamPool(2) as pool:
        assert torch.get_num_threads() == 1
        assert list(pool.workers.map(lambda _: torch.get_num_threads(), range(4))) == [1] * 4
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("recipe", ["int4", "asym"])
def test_chunks_and_threads_change_no_byte(recipe, model_dir, tmp_path, monkeypatch):
    """1-row cache chunks (8-row groups: zero points pack 8 rows per word) on 1 or 3 threads write the
    same files as the default chunking; the report's error sums move only by float32 summation order."""
    from dsq.dsquant import quantize as q

    if recipe == "asym":
        (tmp_path / "asym.toml").write_text('default = "int4_asym_g32"\n')
        recipe = str(tmp_path / "asym.toml")
    src = model_dir("llama")
    whole = q.quantize_checkpoint(src, tmp_path / "whole", recipe)
    monkeypatch.setattr(formats, "CACHE_ELEMENTS", 1)
    for threads in ("1", "3"):
        monkeypatch.setenv("DSQ_THREADS", threads)
        out = tmp_path / f"chunked-{threads}"
        chunked = q.quantize_checkpoint(src, out, recipe)
        for f in sorted((tmp_path / "whole").glob("*.safetensors")):
            assert f.read_bytes() == (out / f.name).read_bytes(), (threads, f.name)
        for a, b in zip(whole["tensors"], chunked["tensors"], strict=True):
            if a["rel_rmse"] is not None:
                # float32 dot products per chunk: only the summation order moves (~1e-5 relative)
                assert a["rel_rmse"] == pytest.approx(b["rel_rmse"], rel=1e-4, abs=1e-12)
                assert a["max_abs_err"] == b["max_abs_err"]


@pytest.mark.parametrize("tname", ["q4_0", "q8_0", "q4_1", "q4_k"])
def test_gguf_encode_chunks_and_pool_change_no_byte(tname, monkeypatch):
    from dsq.export.gguf_quants import GGUF_TYPES, encode

    w = (torch.randn(12, 512, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    t = GGUF_TYPES[tname]
    ref, (change, norm) = encode(w, t, "w")
    monkeypatch.setattr(formats, "CACHE_ELEMENTS", 1)
    with StreamPool(3) as pool:
        got, (change2, norm2) = encode(w, t, "w", pool)
    assert np.array_equal(ref, got)
    assert change2 == pytest.approx(change, rel=1e-5) and norm2 == pytest.approx(norm, rel=1e-5)
    if tname in ("q4_0", "q8_0"):  # a dsq twin packs exactly the same bytes, chunked or not
        qt = FORMATS[t.twin].quantize(w, "w")
        with StreamPool(2) as pool:
            assert np.array_equal(encode(qt, t, "w", pool)[0], ref)
