"""The compiled K-quant search kernels (dsquant/kq_search.py) on the blocks that test their corners.

* The tiled kernel (blocks as SIMD lanes, rounding by adding 1.5 * 2**23) equals the line-for-line kernel
  (``_qkx_rows``, ggml's C with its ``nearest_int`` bit trick) on every block, including those it hands back
  (subnormal blocks, where a trial scale overflows): same scale, offset and codes bits.
* ``_nearest_int`` is C's, also beyond its exact range and for inf/NaN.
* Whole rows of awkward values (all zero, subnormal, 1e-30, 1e30, all negative, one outlier) give ggml's bytes
  for every K-quant and 32-block type, with and without an importance matrix.
* NaN/Inf rows are refused by name before any kernel runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT
from test_kquant_exact import ggml, llama_cpp  # noqa: F401 - fixtures: ggml_quantize_chunk via llama-cpp-python

from dsq.dsquant import kq_search as ks
from dsq.dsquant.errors import BadWeightsError
from dsq.dsquant.kq_types import K_KINDS, quantize_k, quantize_legacy
from dsq.export.gguf_quants import GGUF_TYPES, encode


def _blocks(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = 512
    return {
        "gauss": rng.standard_normal((m, n)) * 0.02,
        "all negative, tight": -1 + 1e-6 * rng.standard_normal((m, n)),
        "all negative": -np.abs(rng.standard_normal((m, n))) - 0.5,
        "subnormal": rng.standard_normal((m, n)) * 1e-40,
        "tiny": rng.standard_normal((m, n)) * 1e-30,
        "huge": rng.standard_normal((m, n)) * 1e30,
        "outliers": np.where(rng.random((m, n)) < 0.03, 1e6, rng.standard_normal((m, n))),
        "zeros": np.zeros((m, n)),
    }


@pytest.mark.parametrize("nmax, rmin, rdelta, nstep, mad", [(15, -1.0, 0.1, 20, False), (3, -0.5, 0.1, 15, True),
                                                              (31, -0.9, 0.05, 36, False)])
def test_tiled_qkx_equals_the_line_for_line_kernel(nmax, rmin, rdelta, nstep, mad):
    redone = 0
    for name, x in _blocks(32).items():
        x = x.astype(np.float32)
        w = (np.random.default_rng(1).random(x.shape) ** 4).astype(np.float32)
        scale, the_min, codes = ks.make_qkx(x, w, nmax, rmin, rdelta, nstep, mad)
        s2, m2, c2 = np.empty_like(scale), np.empty_like(the_min), np.empty_like(codes)
        ks._qkx_rows(x, w, nmax, np.float32(rmin), np.float32(rdelta), nstep, mad, s2, m2, c2)
        assert np.array_equal(scale.view(np.int32), s2.view(np.int32)), name
        assert np.array_equal(the_min.view(np.int32), m2.view(np.int32)), name
        assert np.array_equal(codes, c2), name
        redo = np.zeros(len(x), bool)
        ks._qkx_tiles(x, w, nmax, np.float32(rmin), np.float32(rdelta), nstep, mad, np.empty_like(scale),
                      np.empty_like(the_min), np.empty_like(codes), redo)
        redone += int(redo.sum())
    assert redone, "no block took the line-for-line path: the subnormal case should"


def _c_nearest_int(v: float) -> int:
    """ggml's nearest_int, bit for bit, in numpy."""
    val = np.float32(np.float32(v) + np.float32(12582912.0))
    i = int(np.array([val], np.float32).view(np.int32)[0])
    return (i & 0x007FFFFF) - 0x00400000


@pytest.mark.parametrize("v", [0.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, 4194303.0, -4194303.0, 4194304.5, 5e6, -5e6,
                               1.7e7, -3e9, 1e30, np.inf, -np.inf, np.nan])
def test_nearest_int_is_ggmls(v):
    assert ks._nearest_int(np.float32(v)) == _c_nearest_int(v)


def _rows(n_cols: int = 512) -> torch.Tensor:
    parts = [torch.from_numpy(b.astype(np.float32).reshape(-1, n_cols)[:4]) for b in _blocks(n_cols, seed=2).values()]
    return torch.cat(parts)


@pytest.mark.parametrize("kind", K_KINDS)
@pytest.mark.parametrize("with_importance", [False, True])
def test_awkward_rows_give_ggmls_bytes(kind, with_importance, ggml):  # noqa: F811 - the fixture
    w = _rows()
    imp = torch.exp(torch.randn(w.shape[1], generator=torch.Generator().manual_seed(4))) if with_importance else None
    gt = GT[kind.upper()]
    data, _ = quantize_k(kind, w, imp)
    theirs = ggml(gt, w, imp)
    size = GGML_QUANT_SIZES[gt][1]
    same = (data.reshape(-1, size) == theirs.reshape(-1, size)).all(1)
    assert same.all(), f"{int((~same).sum())} of {same.size} blocks differ, first {int(np.argmin(same))}"


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_awkward_rows_32_blocks_with_importance(kind, ggml):  # noqa: F811 - the fixture
    w = _rows(256)
    imp = torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(5)))
    data, _ = quantize_legacy(kind, w, imp)
    assert np.array_equal(data, ggml(GT[kind.upper()], w, imp))


@pytest.mark.parametrize("kind", ["q6_k", "q4_k", "q5_0"])
def test_nan_and_inf_rows_are_refused_by_name(kind):
    w = torch.randn(8, 512)
    w[3, 300] = float("nan")
    with pytest.raises(BadWeightsError, match=r"blk\.0\.w.*\[3, 300\]"):
        encode(w, GGUF_TYPES[kind], "blk.0.w")
    w[3, 300] = float("inf")
    with pytest.raises(BadWeightsError, match=r"blk\.0\.w"):
        encode(w, GGUF_TYPES[kind], "blk.0.w", importance=np.ones(512, np.float32))
