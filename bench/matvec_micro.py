"""One decode matvec, onnxruntime's MatMulNBits against llama.cpp's Q4_0 mul_mat, at the same shape.

Each side runs a graph of ``R`` independent [1, K] x [K, N] products, each with its own weight matrix (random
codes; speed does not depend on the values), so the weights stream from memory as in a real decode step
(R is chosen so they pass ``--bytes``, default 96 MB, beyond the L3) and per-call Python overhead is
spread over R products. Reported: µs per product and the weight GB/s it implies, per runtime, block size and
thread count.

* onnxruntime: ``com.microsoft::MatMulNBits`` bits 4, block 32/64/128 (symmetric: no zero points, as
  dsq's int4_sym), fp32 scales, accuracy_level 4 (int8 activations per block, dsq's CPU default) or 0.
* llama.cpp: ggml's ``ggml_mul_mat`` on a Q4_0 matrix (fp16 scales, blocks of 32) and an f32 vector, through the
  ggml shipped with llama-cpp-python (``ggml_graph_compute_with_ctx``); ggml quantizes the vector to Q8_0
  itself, as in decode.

    .venv/bin/python bench/matvec_micro.py [--shapes 576x1536,...] [--threads 1] [--blocks 32,64,128]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import time
from pathlib import Path

import numpy as np

SHAPES_135M = "960x576,576x576,1536x576,3072x576,576x1536,49152x576"  # NxK: qkv, o, gate, gate|up, down, head
SHAPES_7B = "4608x3584,3584x3584,37888x3584,3584x18944"


def _ort_graph(n: int, k: int, block: int, reps: int, accuracy: int, rng) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    nb = k // block
    for r in range(reps):
        b = rng.integers(0, 256, (n, nb, block // 2), dtype=np.uint8)
        s = (rng.random(n * nb, dtype=np.float32) * 0.01 + 0.001).astype(np.float32)
        inits += [numpy_helper.from_array(b, f"B{r}"), numpy_helper.from_array(s, f"S{r}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{r}", f"S{r}"], [f"y{r}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy))
        outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT, [1, n]))
    g = helper.make_graph(nodes, "mv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def ort_time(n: int, k: int, block: int, reps: int, threads: int, accuracy: int, iters: int) -> float:
    """Best-of-``iters`` seconds for one of the R products."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(_ort_graph(n, k, block, reps, accuracy, np.random.default_rng(0)), so,
                                providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    bind = sess.io_binding()
    bind.bind_cpu_input("x", x)
    for o in sess.get_outputs():
        bind.bind_output(o.name)
    sess.run_with_iobinding(bind)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        sess.run_with_iobinding(bind)
        best = min(best, time.perf_counter() - t)
    return best / reps


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml():
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(glob.glob(str(lib_dir / "libggml-base.so"))[0], mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(glob.glob(str(lib_dir / "libggml-cpu.so"))[0], mode=ctypes.RTLD_GLOBAL)
    base.ggml_init.restype = ctypes.c_void_p
    base.ggml_init.argtypes = [_InitParams]
    base.ggml_new_tensor_2d.restype = ctypes.c_void_p
    base.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype = ctypes.c_void_p
    base.ggml_mul_mat.argtypes = [ctypes.c_void_p] * 3
    base.ggml_new_graph.restype = ctypes.c_void_p
    base.ggml_new_graph.argtypes = [ctypes.c_void_p]
    base.ggml_build_forward_expand.argtypes = [ctypes.c_void_p] * 2
    base.ggml_get_data.restype = ctypes.c_void_p
    base.ggml_get_data.argtypes = [ctypes.c_void_p]
    base.ggml_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_cpu_init()
    cpu.ggml_graph_compute_with_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return base, cpu


def ggml_time(n: int, k: int, reps: int, threads: int, iters: int) -> float:
    """Best-of-``iters`` seconds for one Q4_0 x f32 product (ggml type 2 = Q4_0, 0 = F32)."""
    base, cpu = _ggml()
    blocks = n * k // 32
    work = 64 * 1024 * 1024 + 2 * k * (iters + 2)  # each compute call takes its (small) work buffer from the context
    ctx = base.ggml_init(_InitParams(reps * blocks * 18 + 4 * k + 4 * n * reps + 1024 * (reps + 8) + work, None, False))
    rng = np.random.default_rng(0)
    x = base.ggml_new_tensor_2d(ctx, 0, k, 1)
    np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(x), ctypes.POINTER(ctypes.c_float)), (k,))[:] = (
        rng.standard_normal(k).astype(np.float32))
    gf = base.ggml_new_graph(ctx)
    for _ in range(reps):
        w = base.ggml_new_tensor_2d(ctx, 2, k, n)
        raw = np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(w), ctypes.POINTER(ctypes.c_uint8)), (blocks * 18,))
        blk = raw.reshape(blocks, 18)
        blk[:, 2:] = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
        blk[:, :2] = np.full(blocks, 0.005, np.float16).view(np.uint8).reshape(blocks, 2)
        base.ggml_build_forward_expand(gf, base.ggml_mul_mat(ctx, w, x))
    cpu.ggml_graph_compute_with_ctx(ctx, gf, threads)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        cpu.ggml_graph_compute_with_ctx(ctx, gf, threads)
        best = min(best, time.perf_counter() - t)
    base.ggml_free(ctx)
    return best / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES_135M, help="comma-separated NxK (N outputs, K inputs); '7b' for 7B's")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--accuracy", type=int, default=4)
    ap.add_argument("--bytes", type=float, default=96e6, help="weight bytes per graph (beyond the L3)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    shapes = SHAPES_7B if args.shapes == "7b" else args.shapes
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; accuracy_level {args.accuracy}; best of {args.iters}")
    print(f"{'N x K':<14}{'thr':>4}{'runtime':>22}{'µs/matvec':>11}{'GB/s':>7}{'x llama':>9}")
    for thr in map(int, args.threads.split(",")):
        for shape in shapes.split(","):
            n, k = map(int, shape.split("x"))
            reps = max(1, min(512, -(-int(args.bytes) // int(n * k * 0.5625))))
            q4_0 = ggml_time(n, k, reps, thr, args.iters)
            rows = [("llama.cpp Q4_0", q4_0, n * k * 18 / 32)]
            for b in map(int, args.blocks.split(",")):
                if k % b:  # a padded last block: not a layout dsq writes
                    continue
                t = ort_time(n, k, b, reps, thr, args.accuracy, args.iters)
                rows.append((f"MatMulNBits g{b}", t, n * k / 2 + n * k / b * 4))
            for label, t, nbytes in rows:
                print(f"{shape:<14}{thr:>4}{label:>22}{t * 1e6:>11.1f}{nbytes / t / 1e9:>7.1f}{q4_0 / t:>9.2f}")


if __name__ == "__main__":
    main()
