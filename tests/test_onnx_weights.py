"""MatMulNBits packing carries dsq's values unchanged, and onnxruntime computes with exactly those values."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dsq.dsquant.formats import FORMATS
from dsq.export.onnx_weights import (
    PackedNBits,
    pack_matmulnbits,
    packing_for,
    quantize_packed,
    unpack_matmulnbits,
)

INT_FORMATS = [f for f in FORMATS if not hasattr(FORMATS[f], "stored") and packing_for(f).op == "MatMulNBits"]  # not GGUF grids


def _weight(shape=(48, 256), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[3, 5] = 0.9  # an outlier, so blocks have different scales
    return w


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_packing_is_lossless(fmt):
    qt = FORMATS[fmt].quantize(_weight(), "w")
    p = pack_matmulnbits(qt)
    assert p.B.dtype == np.uint8 and p.B.shape == (48, 256 // p.block_size, p.block_size * p.bits // 8)
    assert (p.zero_points is not None) == (qt.zero is not None)  # symmetric: the op's default zero point
    assert torch.equal(unpack_matmulnbits(p), qt.dequantize())


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_row_sliced_packing_gives_the_same_bytes(fmt):
    """Packing (and, for the export's own embedding / lm_head, quantizing) in slices of rows, as the export does to
    bound its memory at 7B, gives byte for byte what packing the whole matrix does: slices of 5 rows (uneven:
    the last is short) against the whole 48, and the default slice size."""
    w = _weight()
    whole = pack_matmulnbits(FORMATS[fmt].quantize(w, "w"))
    for rows in (5, None):
        sliced = pack_matmulnbits(FORMATS[fmt].quantize(w, "w"), rows=rows)
        direct = quantize_packed(fmt, w, "w", rows=rows)
        assert direct.format == fmt and direct.shape == (48, 256)
        for p in (sliced, direct.packed):
            np.testing.assert_array_equal(p.B, whole.B)
            np.testing.assert_array_equal(p.scales, whole.scales)
            if whole.zero_points is None:
                assert p.zero_points is None
            else:
                np.testing.assert_array_equal(p.zero_points, whole.zero_points)
            assert (p.K, p.N, p.bits, p.block_size) == (whole.K, whole.N, whole.bits, whole.block_size)


def _matmulnbits_model(p: PackedNBits) -> bytes:
    inits = [numpy_helper.from_array(p.B, "B"), numpy_helper.from_array(p.scales, "S")]
    inputs = ["A", "B", "S"]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=p.K, N=p.N, bits=p.bits,
                            block_size=p.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", p.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", p.N])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("fmt", ["int4_sym_g32", "int4_asym_g64", "int4_sym_g128", "int8_g32", "int8_g128"])
def test_onnxruntime_matmulnbits_uses_dsq_values(fmt):
    qt = FORMATS[fmt].quantize(_weight(seed=1), "w")
    session = ort.InferenceSession(_matmulnbits_model(pack_matmulnbits(qt)), providers=["CPUExecutionProvider"])
    a = torch.randn(7, 256, generator=torch.Generator().manual_seed(2))
    y = session.run(None, {"A": a.numpy()})[0]
    ref = (a.double() @ qt.dequantize().double().t()).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("recipe,gguf_type", [("int4", "q4_0"), ("int8", "q8_0")])
def test_onnx_weights_equal_the_gguf_export_bit_for_bit(quantized_dir, tmp_path, recipe, gguf_type):
    """Each MatMulNBits weight stored in model.onnx dequantizes to exactly the floats llama.cpp reads from
    dsq's GGUF blocks of the same checkpoint (Q4_0 / Q8_0, the layouts that match dsq's g32 formats)."""
    from gguf.quants import dequantize

    from dsq.dsquant.quantized import QuantizedCheckpoint
    from dsq.export.gguf_quants import get_type, is_exact, pack_exact
    from dsq.export.onnx_export import export_onnx

    src = quantized_dir("qwen2", recipe)
    export_onnx(src, tmp_path / "onnx")
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bits = 4 if recipe == "int4" else 8
    t = get_type(gguf_type)
    checked = 0
    for name, qt in QuantizedCheckpoint(src).iter_weights():
        if not hasattr(qt, "fmt"):
            continue
        B = inits[name + ".B"]  # [N, K / block, block * bits / 8] (q/k/v and gate/up are concatenated in-graph)
        n, nb, blob = B.shape
        block = blob * 8 // bits
        packed = PackedNBits(B, inits[name + ".scales"], None, nb * block, n, bits, block)
        from_onnx = unpack_matmulnbits(packed).numpy()
        assert is_exact(qt, t)  # the GGUF writer packs these blocks with pack_exact, values unchanged
        from_gguf = dequantize(pack_exact(qt, t), t.gtype).reshape(qt.shape)
        assert from_onnx.tobytes() == from_gguf.astype(np.float32).tobytes(), name
        checked += 1
    assert checked == 14  # 2 layers x (q, k, v, o, gate, up, down)
