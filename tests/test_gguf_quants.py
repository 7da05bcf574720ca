"""dsq's GGUF packers against gguf-py's own (de)quantizers: bit-exact where the format is a twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize, quantize

from dsq.dsquant.formats import FORMATS, split_blocks
from dsq.export.gguf_quants import GGUF_TYPES, encode, nbytes, pack_exact, q4_1_offset_bound
from dsq.export.gguf_tensors import permute_rows, select_rows


def _weights(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[1, :32] = torch.linspace(-1.0, 0.5, 32)  # negative max: Q4_0's signed-max rule
    w[2, 32:64] = torch.linspace(0.0, 1.0, 32)  # all non-negative: asymmetric zero point 0
    w[3, 64:96] = torch.linspace(-1.0, -0.1, 32)  # all negative: zero point 15
    w[4] *= 1e-5  # tiny scales (fp16 subnormal territory for Q4_1's m)
    return w


def _gguf_values(data: np.ndarray, gtype: GT, shape: tuple[int, int]) -> torch.Tensor:
    rows = data.reshape(shape[0], -1)
    return torch.from_numpy(dequantize(rows, gtype).astype(np.float32)).reshape(shape)


@pytest.mark.parametrize(("fmt", "tname"), [("int4_sym_g32", "q4_0"), ("int8_g32", "q8_0")])
def test_exact_twins_dequantize_identically(fmt, tname):
    w = _weights()
    qt = FORMATS[fmt].quantize(w)
    t = GGUF_TYPES[tname]
    data = pack_exact(qt, t)
    assert data.nbytes == nbytes(t, qt.shape)
    assert torch.equal(_gguf_values(data, t.gtype, qt.shape), qt.dequantize())


@pytest.mark.parametrize(("fmt", "tname"), [("int4_sym_g32", "q4_0"), ("int8_g32", "q8_0")])
def test_float_quantization_matches_gguf_reference_bytes(fmt, tname):
    """Quantizing floats goes through dsq's twin format; the bytes equal gguf-py's ggml-reference quantizer."""
    w = _weights(seed=1)
    t = GGUF_TYPES[tname]
    ours, (change, norm) = encode(w, t, "w")
    ref = quantize(w.numpy(), t.gtype).reshape(-1)
    assert np.array_equal(ours, ref)
    # the writer quantizes floats with dsq's twin format: the same bytes as packing that format's codes
    assert np.array_equal(ours, pack_exact(FORMATS[fmt].quantize(w), t))
    got = _gguf_values(ours, t.gtype, tuple(w.shape))
    assert (change / norm) ** 0.5 == pytest.approx(float((got - w).norm() / w.norm()), rel=1e-4)


def test_non_finite_floats_get_dsq_error_naming_the_tensor():
    from dsq.dsquant.errors import BadWeightsError

    w = _weights(seed=6)
    w[5, 40] = float("nan")
    with pytest.raises(BadWeightsError, match=r"blk\.3\.ffn_up\.weight.*\[5, 40\]"):
        encode(w, GGUF_TYPES["q4_0"], "blk.3.ffn_up.weight")


def test_q4_1_offset_rounding_stays_within_stated_bound():
    w = _weights(seed=2)
    qt = FORMATS["int4_asym_g32"].quantize(w)
    data = pack_exact(qt, GGUF_TYPES["q4_1"])
    got = _gguf_values(data, GT.Q4_1, qt.shape)
    diff = (got - qt.dequantize()).abs()
    bound = q4_1_offset_bound(qt).repeat_interleave(32, dim=1)
    # the only change is m = fp16(-z*s): per block a constant shift of at most half an fp16 ulp
    assert bool((diff <= bound * 1.0001 + 1e-12).all())
    assert float(diff.max()) > 0  # the rounding is real on this data, so the bound is what is tested
    # scales carried bit for bit: every block's d equals dsq's fp16 scale
    blocks = data.reshape(-1, 20)
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).reshape(qt.scale.shape))
    assert torch.equal(d, qt.scale.to(torch.float16))


def test_larger_groups_split_into_exact_blocks():
    """int4_sym_g128 -> Q4_0 and int4_asym_g64 -> Q4_1: every block of 32 repeats its group's scale, codes kept."""
    w = _weights(seed=3)
    for fmt, tname in (("int4_sym_g128", "q4_0"), ("int4_sym_g64", "q4_0"), ("int4_asym_g64", "q4_1"),
                       ("int8_g128", "q8_0"), ("int8_channel", "q8_0")):
        qt = FORMATS[fmt].quantize(w)
        t = GGUF_TYPES[tname]
        data, change = encode(qt, t, "w")
        assert change is None, fmt
        got, deq = _gguf_values(data, t.gtype, qt.shape), qt.dequantize()
        if qt.zero is None:
            assert torch.equal(got, deq), fmt
        else:  # Q4_1's m = fp16(-z*s): its half-ulp rounding, as for int4_asym_g32
            bound = q4_1_offset_bound(split_blocks(qt, "int4_asym_g32")).repeat_interleave(32, 1)
            assert bool(((got - deq).abs() <= bound * 1.0001).all()), fmt


def test_non_twin_layouts_are_requantized_not_rejected():
    w = _weights(seed=3)
    qt = FORMATS["int4_asym_g128"].quantize(w)  # asymmetric codes have no Q4_0 twin
    t = GGUF_TYPES["q4_0"]
    data, (change, norm) = encode(qt, t, "w")
    got = _gguf_values(data, t.gtype, qt.shape)
    deq = qt.dequantize()
    rel = float((got - deq).norm() / deq.norm())
    assert 0 < rel < 0.2
    assert (change / norm) ** 0.5 == pytest.approx(rel, rel=1e-4)  # the reported error is the file's


def test_float_types_round_trip():
    w = _weights(seed=4)
    for name, gtype in (("f16", GT.F16), ("bf16", GT.BF16), ("f32", GT.F32)):
        t = GGUF_TYPES[name]
        data, requantized = encode(w, t, "w")
        assert requantized is None
        got = _gguf_values(data, gtype, tuple(w.shape))
        assert torch.equal(got, w.to(t.torch_dtype).float())


def test_rows_not_whole_blocks_is_a_clear_error():
    with pytest.raises(Exception, match="multiple of 32"):
        encode(torch.zeros(4, 48), GGUF_TYPES["q8_0"], "blk.0.attn_k_b.weight")


def test_llama_permutation_moves_whole_rows_of_codes_and_scales():
    """Permuting a quantized weight == permuting its dequantized floats (llama.cpp's LlamaModel.permute)."""
    w = _weights(rows=64, cols=128, seed=5)
    n_head = 4
    ref = w.reshape(n_head, 2, 64 // n_head // 2, 128).swapaxes(1, 2).reshape(64, 128)  # llama.cpp's formula
    idx = permute_rows(64, n_head)
    assert torch.equal(w[idx], ref)
    for fmt in ("int4_sym_g32", "int4_asym_g32", "int8_g32"):
        qt = FORMATS[fmt].quantize(w)
        moved = select_rows(qt, idx)
        assert moved.format == fmt  # still quantized: nothing re-rounded
        assert torch.equal(moved.dequantize(), qt.dequantize()[idx])


def test_q6_k_packer_is_bit_exact_with_gguf_dequantizer():
    w = _weights(rows=6, cols=512, seed=7)
    w[5, 256:] *= torch.logspace(-3, 1, 256)  # wide dynamic range inside one super-block
    t = GGUF_TYPES["q6_k"]
    data, (change, norm) = encode(w, t, "w")
    assert data.nbytes == nbytes(t, tuple(w.shape)) == 6 * 2 * 210
    _, held = t.kquant(w)  # the table's packer (q6ref.quantize_q6_k_ref: llama.cpp's own Q6_K rounding)
    got = _gguf_values(data, GT.Q6_K, tuple(w.shape))
    assert torch.equal(got, held)  # what dsq computed is exactly what the file holds
    assert torch.equal(got[0, :32], torch.zeros(32))
    rel = float((got - w).norm() / w.norm())
    assert rel < 0.03 and (change / norm) ** 0.5 == pytest.approx(rel, rel=1e-4)
    with pytest.raises(Exception, match="multiple of 256"):
        encode(torch.zeros(2, 128), t, "w")
