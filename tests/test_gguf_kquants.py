"""Q4_K: dsq's own packer and quantizer (export/kquants.py), read back by gguf-py and run by llama.cpp.

Tolerances, measured and stated once:

* gguf-py's Q4_K dequantizer reads dsq's bytes back to exactly dsq's values (bit for bit).
* Gaussian weights: relative RMSE 0.06-0.095 (measured ~0.072; Q4_K at 4.5 bits per weight).
* llama.cpp's own ``llama_model_quantize`` (pure Q4_K, no imatrix, i.e. ``quantize_row_q4_K_ref``) on an
  F16 GGUF of the llama fixture: every 144-byte block is byte-identical. (Before kq_types.py 7 of 5440
  differed: torch's float32 ``sqrt`` is not correctly rounded, and ggml's ``sqrtf`` is.)
* ``--type q4_k`` export of the llama fixture run by llama.cpp vs a torch model holding the GGUF's own
  values: max |logit diff| <= 3% of max |logit| (the gate of test_gguf_llamacpp.py; the remainder is
  ggml's Q8_K activation rounding in its Q4_K dot products).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize

from dsq.dsquant.errors import UnsupportedError
from dsq.export.gguf_quants import GGUF_TYPES, encode
from dsq.export.kquants import Q4_K_BYTES, quantize_q4_k


def _gauss(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def _read_back(data: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return torch.from_numpy(np.array(dequantize(data.reshape(rows, -1), GT.Q4_K), dtype=np.float32))


def test_q4_k_bytes_read_back_exactly_by_gguf_py():
    w = _gauss()
    # awkward blocks: all zero, constant, all positive (the min clamps to 0), one huge outlier, tiny values
    w[0, :256] = 0.0
    w[1, :32] = 0.5
    w[2, :256] = w[2, :256].abs() + 0.01
    w[3, 7] = 3.0
    w[4, :256] *= 1e-4
    data, values = quantize_q4_k(w)
    assert data.dtype == np.uint8 and data.size == w.numel() // 256 * Q4_K_BYTES
    assert torch.equal(_read_back(data, w.shape), values)
    assert torch.equal(values[0, :256], torch.zeros(256))
    assert (values[2, :256] >= 0).all()


def test_q4_k_refuses_rows_that_are_not_whole_super_blocks():
    # 576 columns: the element count is whole super-blocks (576 * 4 = 9 * 256) but the rows are not
    with pytest.raises(UnsupportedError, match="rows of 576"):
        quantize_q4_k(torch.randn(4, 576))
    with pytest.raises(UnsupportedError, match="importance"):
        quantize_q4_k(torch.randn(4, 512), torch.ones(256))


def test_q4_k_error_on_gaussian_weights():
    w = _gauss(128, 1024, seed=1)
    _, values = quantize_q4_k(w)
    rel = float((values - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert 0.06 <= rel <= 0.095, rel


def test_importance_lowers_the_weighted_error():
    w = _gauss(96, 512, seed=2)
    g = torch.Generator().manual_seed(3)
    importance = torch.exp(2.0 * torch.randn(512, generator=g))  # mean x^2 per input column: heavy-tailed
    _, plain = quantize_q4_k(w)
    data, weighted = quantize_q4_k(w, importance)
    assert torch.equal(_read_back(data, w.shape), weighted)

    def werr(v: torch.Tensor) -> float:
        return float(((v - w).pow(2) * importance).sum())

    assert werr(weighted) < 0.9 * werr(plain), (werr(weighted), werr(plain))
    # uniform importance is only a rescaling of ggml's weights up to the sigma2 term: the error stays close
    _, flat = quantize_q4_k(w, torch.ones(512))
    assert werr(flat) < 1.05 * werr(plain)


def test_encode_q4_k_reports_the_real_change():
    w = _gauss(8, 256, seed=4)
    data, (change, norm) = encode(w, GGUF_TYPES["q4_k"], "t")
    back = _read_back(data, w.shape)
    assert change == pytest.approx(float((back - w).pow(2).sum()), rel=1e-5)
    assert norm == pytest.approx(float(w.pow(2).sum()), rel=1e-5)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def test_q4_k_bytes_match_llama_cpp_quantizer(llama_cpp, model_dir, tmp_path):
    from gguf import GGUFReader

    from dsq.export.gguf_writer import export_gguf

    f16 = tmp_path / "f16.gguf"
    export_gguf(model_dir("llama"), f16, type="f16")
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S
    params.pure = True  # every tensor Q4_K (no Q6_K output / Q5_K mixes): compares the quantizer alone
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), params) == 0
    floats = {t.name: np.asarray(t.data) for t in GGUFReader(f16).tensors}
    compared = equal_blocks = blocks = 0
    for t in GGUFReader(theirs).tensors:
        if t.tensor_type != GT.Q4_K:
            continue
        x = torch.from_numpy(floats[t.name].astype(np.float32))
        x = x.reshape(-1, x.shape[-1])
        mine, values = quantize_q4_k(x)
        a, b = np.asarray(t.data).reshape(-1, Q4_K_BYTES), mine.reshape(-1, Q4_K_BYTES)
        same = (a == b).all(axis=1)
        assert same.all(), (t.name, same.mean())
        equal_blocks += int(same.sum())
        blocks += same.size
        err_theirs = float(((_read_back(a, x.shape) - x) ** 2).sum())
        err_mine = float(((values - x) ** 2).sum())
        assert err_mine <= 1.005 * err_theirs, (t.name, err_mine, err_theirs)
        compared += 1
    assert compared >= 14
    assert equal_blocks == blocks, (equal_blocks, blocks)


def test_q4_k_export_runs_in_llama_cpp(llama_cpp, model_dir, tmp_path):
    """--type q4_k on the float llama fixture (hidden 256): llama.cpp's logits vs torch holding the GGUF's
    values (gguf-py's dequantization, q/k rows un-permuted back to HF order)."""
    from test_gguf_llamacpp import PROMPT, _check_logits, hf_ids, load, torch_holding_gguf

    from dsq.export.gguf_writer import export_gguf

    src = model_dir("llama")
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "q4k.gguf"
    report = export_gguf(src, out, type="q4_k", pure=True)  # Q4_K everywhere, not the Q4_K_M mix
    assert report["types"]["q4_k"] >= 14
    model = torch_holding_gguf(out, cfg, tmp_path / "q4k-ref", unpermute_qk=True)
    _check_logits(model, load(out), hf_ids(src, PROMPT), 0.03)
