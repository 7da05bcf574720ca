"""GPTQ and the importance-weighted scale search on synthetic weights: same layout as the format's RTN,
lower output error on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from dsq.dsquant.calib.gptq import GPTQOptions, gptq_quantize
from dsq.dsquant.calib.hook import rows_of
from dsq.dsquant.calib.imatrix import search_scales
from dsq.dsquant.calib.methods import InputStats
from dsq.dsquant.formats import FORMATS

COLS = 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, COLS, generator=g) * 0.02
    w[3, 7] = 0.3  # an outlier weight
    mix = torch.randn(COLS, COLS, generator=g) * torch.rand(COLS, generator=g).pow(3) * 4  # uneven channels
    x = torch.randn(2048, COLS, generator=g) @ mix
    st = InputStats(COLS, full=True, keep_rows=0)
    st.add(x)
    return w, x, st


def _out_err(x, w, qt) -> float:
    ref = x @ w.T
    return float((x @ qt.dequantize().T - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt_name", ["int4_sym_g32", "int4_asym_g128", "int8_g32", "int8_channel", "fp8_b128"])
def test_gptq_same_layout_as_rtn_and_lower_output_error(problem, fmt_name):
    w, x, st = problem
    fmt = FORMATS[fmt_name]
    rtn = fmt.quantize(w)
    for act_order in (False, True):
        qt = gptq_quantize(fmt, w, st.hessian, GPTQOptions(act_order=act_order))
        assert qt.format == rtn.format and qt.shape == rtn.shape
        assert qt.codes.dtype == rtn.codes.dtype and qt.codes.shape == rtn.codes.shape
        assert qt.scale.dtype == rtn.scale.dtype and qt.scale.shape == rtn.scale.shape
        assert (qt.zero is None) == (rtn.zero is None)
        if qt.codes.dtype != torch.float8_e4m3fn:
            lo, hi = (0, 15) if "asym" in fmt_name else ((-8, 7) if "int4" in fmt_name else (-127, 127))
            assert int(qt.codes.min()) >= lo and int(qt.codes.max()) <= hi
        assert _out_err(x, w, qt) < 0.85 * _out_err(x, w, rtn), (fmt_name, act_order)


@pytest.mark.parametrize("fmt_name", ["int4_sym_g32", "int4_asym_g128", "int8_g32", "fp8_b128"])
def test_imatrix_search_never_worse_than_rtn_on_its_objective(problem, fmt_name):
    w, x, st = problem
    fmt = FORMATS[fmt_name]
    imp = st.importance
    rtn = fmt.quantize(w)
    qt = search_scales(fmt, w, imp)
    assert qt.scale.dtype == rtn.scale.dtype and qt.codes.dtype == rtn.codes.dtype

    def weighted(q):
        return float(((w - q.dequantize()).square() * imp).sum())

    assert weighted(qt) <= weighted(rtn) * (1 + 1e-6)
    if fmt_name.startswith("int4"):
        assert weighted(qt) < 0.97 * weighted(rtn)
        assert _out_err(x, w, qt) < _out_err(x, w, rtn)


def test_hessian_and_importance_statistics():
    st = InputStats(4, full=True, keep_rows=3)
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    st.add(x[:3], quota=2)
    st.add(x[3:], quota=2)
    assert torch.allclose(st.hessian, 2 * x.T @ x / 6)
    assert torch.allclose(st.importance, x.square().mean(0))
    assert st.samples.shape == (3, 4)  # keep_rows caps the sample
    diag = InputStats(4, full=False, keep_rows=0)
    diag.add(x)
    assert torch.allclose(diag.importance, st.importance)
    with pytest.raises(ValueError):
        _ = diag.hessian


@pytest.mark.parametrize("fmt_name", ["int4_sym_g32", "int4_asym_g64", "fp8_b128"])
def test_rows_of_slices_match_the_whole(fmt_name):
    w = torch.randn(300, 256) * 0.05
    qt = FORMATS[fmt_name].quantize(w)
    parts = [rows_of(qt, a, b) for a, b in ((0, 128), (128, 256), (256, 300))]
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), qt.dequantize())
