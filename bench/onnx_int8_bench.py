"""int8 weights on onnxruntime CPU: ``com.microsoft::MatMulNBits`` (bits=8) vs blocked ``DequantizeLinear``
(opset 21, block_size along K) + MatMul, on one Qwen2-0.5B-sized MLP projection, from the same dsq int8_g32 codes.

Prints the time per call for a decode-shaped (M=1) and a prefill-shaped (M=128) input and checks that both
graphs compute the same product. This is the measurement behind the exporter's choice for int8 (onnx_weights.PACKINGS).

    .venv/bin/python bench/onnx_int8_bench.py [--k 896] [--n 4864] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from dsq.dsquant.formats import FORMATS
from dsq.export.onnx_weights import pack_matmulnbits


def _model(nodes, inits, k: int, n: int) -> bytes:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def build(k: int, n: int) -> dict[str, bytes]:
    qt = FORMATS["int8_g32"].quantize(torch.randn(n, k) * 0.02, "w")
    p = pack_matmulnbits(qt)
    nbits = {
        acc: _model(
            [helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=8,
                              block_size=32, accuracy_level=acc)],
            [numpy_helper.from_array(p.B, "B"), numpy_helper.from_array(p.scales, "S")], k, n)
        for acc in (0, 4)
    }
    # DequantizeLinear wants the block axis to be the quantized one: W^T [K, N] int8 with scales [K/32, N].
    codes_t = qt.codes.t().contiguous().numpy().astype(np.int8)
    scales_t = qt.scale.to(torch.float32).t().contiguous().numpy()
    dq = _model(
        [helper.make_node("DequantizeLinear", ["W", "S"], ["Wf"], axis=0, block_size=32),
         helper.make_node("MatMul", ["A", "Wf"], ["Y"])],
        [numpy_helper.from_array(codes_t, "W"), numpy_helper.from_array(scales_t, "S")], k, n)
    # Note: at ORT_ENABLE_ALL onnxruntime 1.31 rewrites the DequantizeLinear + MatMul pair into MatMulNBits bits=8
    # accuracy_level=4 (int8 activations), so that row measures the same kernel as the acc 4 row.
    return {"MatMulNBits bits=8 acc 0": nbits[0], "MatMulNBits bits=8 acc 4": nbits[4],
            "DequantizeLinear(block 32) + MatMul": dq}


def time_call(session, a: np.ndarray, reps: int) -> float:
    session.run(None, {"A": a})
    t = time.perf_counter()
    for _ in range(reps):
        session.run(None, {"A": a})
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=896)
    ap.add_argument("--n", type=int, default=4864)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    rng = np.random.default_rng(0)
    inputs = {m: rng.standard_normal((m, args.k)).astype(np.float32) for m in (1, 128)}
    outputs = {}
    print(f"K={args.k} N={args.n}, {args.threads} threads, ORT {ort.__version__}")
    models = build(args.k, args.n)
    for label, model in models.items():
        s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for m, reps in ((1, 200), (128, 20)):
            a = inputs[m]
            outputs[label, m] = s.run(None, {"A": a})[0]
            print(f"  {label:<40} M={m:<4} {time_call(s, a, reps) * 1e3:8.3f} ms")
    for m in (1, 128):
        exact = outputs["MatMulNBits bits=8 acc 0", m]
        for label in models:
            print(f"  M={m}: {label}: max |y - y(acc 0)| {np.abs(outputs[label, m] - exact).max():.2e}")


if __name__ == "__main__":
    main()
