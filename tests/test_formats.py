"""Every registered format: round trip, error bound, sizes, edge shapes, NaN/Inf; and bit-exactness
with ggml's Q4_0/Q8_0 reference quantizers (through gguf-py, which mirrors ggml's C reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsq.dsquant.errors import BadWeightsError, UnsupportedError
from dsq.dsquant.formats import FORMATS, find_format, get_format

# codes * scale formats; the GGUF-grid ones (kformats.py: q2_k..q6_k, q5_0, q5_1) are tests/test_kquant_formats.py's
ALL = sorted(f for f in FORMATS if not hasattr(FORMATS[f], "stored"))


def weight(rows=256, cols=512, seed=0, scale=0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    w[3, 7] = 0.5  # an outlier, as real weights have
    return w


# Worst-case relative RMSE per family on Gaussian weights (observed ~0.09-0.105 for int4,
# ~0.007 for int8 and ~0.027 for fp8; bounds leave a margin but fail on a broken rounding).
REL_RMSE_BOUND = {"int4": 0.13, "int8": 0.01, "fp8": 0.035}


@pytest.mark.parametrize("name", ALL)
def test_round_trip_shapes_and_error(name):
    fmt = FORMATS[name]
    w = weight()
    qt = fmt.quantize(w, "w")
    assert qt.format == name and qt.shape == tuple(w.shape)
    assert qt.codes.shape == w.shape
    assert tuple(qt.scale.shape) == fmt.scale_shape(qt.shape)
    assert qt.scale.dtype == fmt.scale_dtype
    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    rel = float((deq - w).norm() / w.norm())
    assert rel < REL_RMSE_BOUND[name.split("_")[0]], rel
    # quantizing the dequantized tensor again is stable (a fixed point up to scale rounding)
    again = fmt.quantize(deq, "w").dequantize()
    assert float((again - deq).norm() / deq.norm()) < rel / 2


@pytest.mark.parametrize("name", ALL)
def test_code_ranges(name):
    qt = FORMATS[name].quantize(weight(), "w")
    if name.startswith("int4_sym"):
        assert qt.codes.dtype == torch.int8 and qt.codes.min() >= -8 and qt.codes.max() <= 7
    elif name.startswith("int4_asym"):
        assert qt.codes.dtype == torch.uint8 and qt.codes.max() <= 15
        assert qt.zero is not None and qt.zero.max() <= 15
    elif name.startswith("int8"):
        assert qt.codes.dtype == torch.int8 and qt.codes.abs().max() <= 127
    else:
        assert qt.codes.dtype == torch.float8_e4m3fn
        assert qt.codes.to(torch.float32).abs().max() <= 448


@pytest.mark.parametrize("name", ALL)
def test_declared_facts_are_what_quantize_produces(name):
    """qmin/qmax/code_dtype/symmetric/packing, which writers and calibration read instead of the name, hold
    for the codes the format's own quantizer writes (the extremes reached on a weight with both signs);
    find_format maps the facts back to the format."""
    fmt = FORMATS[name]
    if not fmt.packing:
        pytest.skip(f"{name} has a layout of its own (packing ''): no shared code facts to check")
    qt = fmt.quantize(weight(), "w")
    codes = qt.codes.to(torch.float32)
    assert qt.codes.dtype == fmt.code_dtype and fmt.float_codes == (fmt.packing == "fp8")
    assert float(codes.min()) >= fmt.qmin and float(codes.max()) <= fmt.qmax
    assert fmt.qmax in (float(codes.max()), -float(codes.min())) or not fmt.symmetric
    assert (qt.zero is None) == fmt.symmetric
    assert qt.scale.dtype == fmt.scale_dtype
    assert find_format(packing=fmt.packing, bits=fmt.bits, symmetric=fmt.symmetric, block_rows=fmt.block_rows,
                       block_cols=fmt.block_cols) is fmt
    if fmt.block_rows == 1 and fmt.block_cols:
        assert fmt.regrouped(fmt.block_cols) is fmt
        with pytest.raises(UnsupportedError, match=f"{name}: no format like it with blocks of 48"):
            fmt.regrouped(48)


@pytest.mark.parametrize("name", ALL)
def test_error_bounded_by_half_step(name):
    """int8: within half a step of its block (plus fp16 scale rounding). int4: within one step, because
    Q4_0's rule maps the signed extreme to -8 so +8 clamps to +7, and an integer zero point shifts the grid
    by up to half a step."""
    fmt = FORMATS[name]
    w = weight(seed=1)
    qt = fmt.quantize(w, "w")
    step = fmt._expand(qt.scale.to(torch.float32), qt.shape).abs()  # Q4_0 scales carry the sign
    err = (qt.dequantize() - w).abs()
    if name.startswith("fp8"):
        # e4m3 has 3 mantissa bits: relative error <= 2^-4 of the value, or half the smallest subnormal step
        assert bool((err <= w.abs() * 2**-4 + step * 2**-10).all())
    else:
        # codes are chosen with the float32 scale (as ggml does) and dequantized with its fp16 rounding,
        # which moves code q by at most |q| * 2^-11 steps.
        half_steps = 1.0 if name.startswith("int8") else 2.0
        bound = (0.5 * half_steps + qt.codes.to(torch.float32).abs() * 2**-11) * step
        assert bool((err <= bound * (1 + 2**-20) + 1e-12).all()), float((err / step).max())


@pytest.mark.parametrize("name", ALL)
def test_nbytes_matches_declared_bits(name):
    fmt = FORMATS[name]
    shape = (256, 512)
    n_scales = math.prod(fmt.scale_shape(shape))
    expected_bits = fmt.bits + n_scales * 8 * fmt.scale_dtype.itemsize / (256 * 512)
    if not fmt.symmetric:
        expected_bits += n_scales * fmt.bits / (256 * 512)
    assert math.isclose(fmt.bits_per_weight(shape), expected_bits, rel_tol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_nan_and_inf_name_tensor_and_block(name):
    fmt = FORMATS[name]
    for bad in (float("nan"), float("inf")):
        w = weight()
        w[130, 300] = bad
        with pytest.raises(BadWeightsError) as e:
            fmt.quantize(w, "model.layers.3.mlp.up_proj.weight")
        msg = str(e.value)
        assert "model.layers.3.mlp.up_proj.weight" in msg and "[130, 300]" in msg
        br, bc = fmt.block((256, 512))
        assert f"block ({130 // br}, {300 // bc})" in msg


@pytest.mark.parametrize("name", ALL)
def test_zero_blocks_dequantize_to_zero(name):
    w = weight()
    w[:, :128] = 0
    deq = FORMATS[name].quantize(w, "w").dequantize()
    assert torch.isfinite(deq).all() and bool((deq[:, :128] == 0).all())


@pytest.mark.parametrize("name", ALL)
def test_shapes_not_divisible_by_block(name):
    """Group formats refuse an in_features that is not a multiple of the group; FP8 blocks and per-channel
    int8 accept any shape (DeepSeek's FP8 rule: partial edge blocks, scale grid ceil(out/128) x ceil(in/128))."""
    fmt = FORMATS[name]
    w = weight(rows=200, cols=200)
    if fmt.partial_blocks or fmt.block_cols == 0:
        qt = fmt.quantize(w, "w")
        assert qt.dequantize().shape == (200, 200)
        if fmt.partial_blocks:
            assert tuple(qt.scale.shape) == (2, 2)
    else:
        assert fmt.check_shape((200, 200)) is not None
        with pytest.raises(UnsupportedError, match="multiple of"):
            fmt.quantize(w, "w")


def test_fp16_scale_overflow_is_a_clear_error():
    w = weight()
    w[0, 0] = 1e7
    with pytest.raises(BadWeightsError, match="overflow the fp16 scale"):
        FORMATS["int8_g32"].quantize(w, "x")


def test_unknown_format():
    with pytest.raises(UnsupportedError, match="known formats"):
        get_format("int3_g7")


@pytest.mark.parametrize(("name", "qtype"), [("int4_sym_g32", "Q4_0"), ("int8_g32", "Q8_0")])
def test_bit_exact_with_ggml_reference(name, qtype):
    """dsq's codes and fp16 scales reproduce ggml's Q4_0 / Q8_0 blocks byte for byte."""
    from gguf import GGMLQuantizationType, quants

    t = GGMLQuantizationType[qtype]
    w = weight(rows=64, cols=256, seed=2)
    ref = quants.quantize(w.numpy(), t)  # [rows, bytes]: per block fp16 d, then codes
    qt = FORMATS[name].quantize(w, "w")
    blocks = ref.reshape(64, 256 // 32, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    np.testing.assert_array_equal(d, qt.scale.numpy())
    if qtype == "Q8_0":
        np.testing.assert_array_equal(blocks[..., 2:].view(np.int8).reshape(64, 256), qt.codes.numpy())
    else:
        packed = blocks[..., 2:]  # 16 bytes: low nibbles = elements 0..15, high nibbles = 16..31
        nib = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int16) - 8
        np.testing.assert_array_equal(nib.reshape(64, 256), qt.codes.numpy())
    np.testing.assert_array_equal(quants.dequantize(ref, t), qt.dequantize().numpy())
