"""A small ONNX graph builder and the blocks every decoder shares: RMSNorm, linear layers (MatMulNBits
or float MatMul), RoPE, the causal/padding mask, SwiGLU MLP and softmax attention over a KV cache.

Everything is built from standard ONNX ops (opset 21) plus ``com.microsoft::MatMulNBits`` (and
``GatherBlockQuantized`` for a quantized embedding); onnxruntime's
optimizer fuses the plain RMSNorm into ``SimplifiedLayerNormalization`` at ORT_ENABLE_ALL. Tensors are
float32 throughout; hidden states are ``[batch, seq, hidden]``, heads ``[batch, heads, seq, head_dim]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, helper

from .onnx_weights import WeightTable

OPSET = 21
MS_DOMAIN = "com.microsoft"
NEG_INF = float(np.finfo(np.float32).min)  # what transformers' masks use: finite, so no NaN rows


@dataclass
class GraphBuilder:
    weights: WeightTable
    nodes: list[NodeProto] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)
    _consts: dict[tuple, str] = field(default_factory=dict)

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> str | list[str]:
        n = next(self._ids)
        outs = outputs if isinstance(outputs, list) else [f"{op_type}_{n}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{n}", domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer (cached by value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weights.sink.add(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def rename(self, old: str, new: str) -> None:
        """Call value ``old`` ``new`` everywhere (a graph output named by its producer: no Identity copy between,
        which would also keep GroupQueryAttention from appending to a shared past/present buffer in place)."""
        for node in self.nodes:
            for seq in (node.input, node.output):
                for j, name in enumerate(seq):
                    if name == old:
                        seq[j] = new

    def live_nodes(self, outputs: list[str]) -> list[NodeProto]:
        """The nodes ``outputs`` depend on, in order: blocks built for one attention form but read only by the
        other (the additive mask, the RoPE tables beside GroupQueryAttention's own caches) are dropped."""
        need, keep = set(outputs), []
        for node in reversed(self.nodes):
            if any(o in need for o in node.output):
                keep.append(node)
                need.update(i for i in node.input if i)
        return keep[::-1]

    # -- shape helpers ------------------------------------------------------------------------------
    def dim(self, x: str, axis: int) -> str:
        """Dimension ``axis`` of ``x`` as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def reshape(self, x: str, shape: list[int] | str) -> str:
        return self.op("Reshape", x, shape if isinstance(shape, str) else self.const(shape))

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", x, self.const(axes))

    def slice(self, x: str, start: int, end: int, axis: int = -1, step: int = 1) -> str:
        return self.op("Slice", x, self.const([start]), self.const([end]), self.const([axis]), self.const([step]))


# -- layers -----------------------------------------------------------------------------------------
def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    """transformers' RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, over the last axis.

    Written as Pow(x, 2) -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the exact pattern onnxruntime's
    SimplifiedLayerNormFusion turns into one ``SimplifiedLayerNormalization`` kernel at load (Mul(x, x)
    is not matched, and left ~6 small ops per norm in the profile)."""
    var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
    denom = g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32)))
    return g.op("Mul", g.op("Div", x, denom), g.weights.float(weight))


def skip_rms_norm(g: GraphBuilder, x: str, skip: str, weight: str, eps: float) -> tuple[str, str]:
    """(rms_norm(x + skip), x + skip) as one ``com.microsoft::SkipSimplifiedLayerNormalization`` (the residual
    add and the next norm in one pass over the hidden state, as onnxruntime-genai's builder writes them)."""
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", x, skip, g.weights.float(weight),
                               outputs=[f"SkipSLN_{len(g.nodes)}_out{i}" for i in range(4)], domain=MS_DOMAIN,
                               epsilon=eps)
    return normed, total


def linear(g: GraphBuilder, x: str, weight: str, bias: str | None = None) -> str:
    """x @ W^T (+ b): MatMulNBits for dsq integer formats, MatMul with W^T for float weights."""
    lin = g.weights.linear(weight)
    if lin.packed is not None:
        p = lin.packed
        inputs = [x, lin.B, lin.scales] + ([lin.zero_points] if lin.zero_points else [])
        y = g.op(
            "MatMulNBits", *inputs, domain=MS_DOMAIN, K=p.K, N=p.N, bits=p.bits, block_size=p.block_size,
            accuracy_level=g.weights.accuracy_level,
        )
    elif lin.W:  # [N, K] shared with the embedding: Gemm(transB) on [rows, K], then back to x's leading dims
        k = g.weights.floats[lin.W][1]
        y = g.op("Gemm", g.reshape(x, [-1, k]), lin.W, transB=1)
        lead = g.op("Slice", g.op("Shape", x), g.const([0]), g.const([-1]))
        y = g.op("Reshape", y, g.op("Concat", lead, g.const([-1]), axis=0))
    else:
        y = g.op("MatMul", x, lin.WT)
    return g.op("Add", y, g.weights.float(bias)) if bias else y


def embedding_lookup(g: GraphBuilder, weight: str, ids: str) -> str:
    """Rows ``ids`` of the embedding ``weight``: ``Gather`` on a float matrix, or
    ``com.microsoft::GatherBlockQuantized`` on a MatMulNBits-packed one (dsq's codes, scales and zero points
    as they are; the op's default zero point for uint8 data is 2^(bits-1), as MatMulNBits').

    GatherBlockQuantized wants 2-D data [N, K * bits / 8] (gather_axis 0, blocks along quantize_axis 1) and
    scales [N, K / block]; MatMulNBits' B is [N, K / block, block * bits / 8] and its scales flat. Reshapes
    bridge the two, so a tied head and the lookup read one initializer (onnxruntime folds the Reshape)."""
    lin = g.weights.linears.get(weight)
    if lin is None or lin.packed is None:
        return g.op("Gather", g.weights.float(weight), ids, axis=0)
    p = lin.packed
    inputs = [g.reshape(lin.B, [p.N, p.K * p.bits // 8]), ids, g.reshape(lin.scales, [p.N, p.K // p.block_size])]
    if lin.zero_points:
        inputs.append(g.reshape(lin.zero_points, [p.N, -1]))
    return g.op("GatherBlockQuantized", *inputs, domain=MS_DOMAIN, bits=p.bits, block_size=p.block_size,
                gather_axis=0, quantize_axis=1)


def dense_weight(g: GraphBuilder, weight: str) -> str:
    """The float32 matrix [N, K] of linear ``weight``, for a graph that needs the matrix itself rather than
    x @ W^T (MLA's absorbed form contracts kv_b_proj along N, which MatMulNBits cannot).

    A packed weight goes through ``DequantizeLinear`` (opset 21, blocks along K): (q - zero) * scale, exactly
    the values MatMulNBits computes with. Its 4-bit codes are MatMulNBits' own bytes read as uint4 [N, K] (ONNX
    packs int4 the same way, element 0 in the low nibble): an alias over the same stored bytes, so the file holds
    them once when only this form reads them. A float weight is its stored W^T, transposed back."""
    lin = g.weights.linear(weight)
    if lin.packed is None:
        return g.op("Transpose", lin.WT, perm=[1, 0]) if lin.WT else lin.W
    p = lin.packed
    nb = p.K // p.block_size
    if p.bits == 4:
        codes = g.weights.alias(lin.B, TensorProto.UINT4, [p.N, p.K], f"{weight}.codes_u4")
    else:
        codes = g.reshape(lin.B, [p.N, p.K])
    scales = g.reshape(lin.scales, [p.N, nb])
    return g.op("DequantizeLinear", codes, scales, g.weights.dq_zero_points(weight), axis=1, block_size=p.block_size)


def packed_linears(g: GraphBuilder, x: str, weights: list[str], biases: list[str | None] | None = None
                   ) -> tuple[str, list[int]] | None:
    """Several linears of the same input as one MatMulNBits (as onnxruntime-genai's builder fuses q/k/v):
    B, scales and zero points are concatenated along N by Concat nodes on initializers, which onnxruntime folds
    into one constant at load. Returns (the concatenated output [.., sum N], the N of each), or None when the
    packings differ (then nothing is added to the graph)."""
    lins = [g.weights.linear(w) for w in weights]
    biases = biases or [None] * len(weights)
    first = lins[0].packed
    same = first is not None and all(
        lin.packed is not None and (lin.packed.K, lin.packed.bits, lin.packed.block_size) == (first.K, first.bits,
        first.block_size) and bool(lin.zero_points) == bool(lins[0].zero_points) for lin in lins
    )
    if not same or len(lins) < 2:
        return None
    inputs = [x, g.op("Concat", *[lin.B for lin in lins], axis=0), g.op("Concat", *[lin.scales for lin in lins], axis=0)]
    if lins[0].zero_points:
        inputs.append(g.op("Concat", *[lin.zero_points for lin in lins], axis=0))
    sizes = [lin.packed.N for lin in lins]
    y = g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=first.K, N=sum(sizes), bits=first.bits,
             block_size=first.block_size, accuracy_level=g.weights.accuracy_level)
    if any(biases):
        y = g.op("Add", y, g.op("Concat", *[g.weights.float(b) for b in biases], axis=0))
    return y, sizes


def fused_linears(g: GraphBuilder, x: str, weights: list[str], biases: list[str | None] | None = None) -> list[str]:
    """:func:`packed_linears` Split back into one output per weight; separate linears when the packings differ."""
    packed = packed_linears(g, x, weights, biases)
    if packed is None:
        return [linear(g, x, w, b) for w, b in zip(weights, biases or [None] * len(weights), strict=True)]
    y, sizes = packed
    return g.op("Split", y, g.const(sizes), axis=-1, outputs=len(sizes))


def swiglu_mlp(g: GraphBuilder, x: str, prefix: str) -> str:
    """down(silu(gate(x)) * up(x)) for ``{prefix}.gate_proj/up_proj/down_proj``."""
    gate, up = fused_linears(g, x, [f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"])
    act = g.op("Mul", gate, g.op("Sigmoid", gate))
    return linear(g, g.op("Mul", act, up), f"{prefix}.down_proj.weight")


@dataclass(frozen=True)
class Rope:
    """cos/sin of the per-pair angles, [batch, 1, seq, rot_dim / 2], and how pairs are laid out."""

    cos: str
    sin: str
    half: int
    interleaved: bool  # DeepSeek: pairs (x0, x1), (x2, x3)...; others: (x_i, x_{i + d/2})


def rope_tables(g: GraphBuilder, position_ids: str, inv_freq: np.ndarray, scaling: float, interleaved: bool) -> Rope:
    """transformers' rotary embedding: angle = position * inv_freq; cos/sin scaled by attention_scaling."""
    pos = g.op("Cast", position_ids, to=1)  # FLOAT
    freqs = g.op("Mul", g.unsqueeze(pos, [-1]), g.const(inv_freq, np.float32))  # [B, S, D/2]
    freqs = g.unsqueeze(freqs, [1])
    cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
    if scaling != 1.0:
        s = g.const(scaling, np.float32)
        cos, sin = g.op("Mul", cos, s), g.op("Mul", sin, s)
    return Rope(cos, sin, len(inv_freq), interleaved)


def apply_rope(g: GraphBuilder, x: str, rope: Rope) -> str:
    """Rotate x [B, H, S, 2*half] by the pair angles.

    Halves layout (``rotate_half``): x1 = x[..., :d/2], x2 = x[..., d/2:]. Interleaved (DeepSeek): x1 = x[..., 0::2],
    x2 = x[..., 1::2], output de-interleaved as transformers' ``apply_rotary_pos_emb_interleave``; DeepSeek-V2's
    complex form differs only by that same permutation on q and k, so q.k (and the logits) are equal.
    Either way the result is cat(x1*cos - x2*sin, x2*cos + x1*sin).
    """
    d = rope.half
    if rope.interleaved:
        x1, x2 = g.slice(x, 0, 2 * d, step=2), g.slice(x, 1, 2 * d, step=2)
    else:
        x1, x2 = g.slice(x, 0, d), g.slice(x, d, 2 * d)
    a = g.op("Sub", g.op("Mul", x1, rope.cos), g.op("Mul", x2, rope.sin))
    b = g.op("Add", g.op("Mul", x2, rope.cos), g.op("Mul", x1, rope.sin))
    return g.op("Concat", a, b, axis=-1)


def attention_bias(g: GraphBuilder, attention_mask: str, past_len: str, seq_len: str) -> str:
    """Additive mask [B, 1, S, T]: 0 where key j is visible to query i (j <= past + i and not padding)."""
    total = g.op("Add", past_len, seq_len)
    scalar = g.const([], np.int64)  # shape [] for Reshape to a scalar
    past_s, total_s = g.reshape(past_len, scalar), g.reshape(total, scalar)
    zero, one = g.const(0), g.const(1)
    q_pos = g.op("Range", past_s, total_s, one)  # [S]
    k_pos = g.op("Range", zero, total_s, one)  # [T]
    causal = g.op("LessOrEqual", g.unsqueeze(k_pos, [0]), g.unsqueeze(q_pos, [1]))  # [S, T]
    pad = g.unsqueeze(g.op("Cast", attention_mask, to=9), [1, 2])  # BOOL, [B, 1, 1, T]
    allowed = g.op("And", causal, pad)
    return g.op("Where", allowed, g.const(0.0, np.float32), g.const(NEG_INF, np.float32))


def grouped_attention(
    g: GraphBuilder, q: str, k: str, v: str, bias: str, heads: tuple[int, int], dims: tuple[int, int], scale: float
) -> str:
    """softmax(q k^T * scale + bias) v with q [B, H, S, Dk], k [B, Hkv, T, Dk], v [B, Hkv, T, Dv]
    (head h reads kv head h // (H / Hkv), as transformers' ``repeat_kv``); returns [B, S, H * Dv].
    ``heads`` is (H, Hkv), ``dims`` (Dk, Dv)."""
    (n_heads, n_kv), (dk, dv) = heads, dims
    rep = n_heads // n_kv
    if rep > 1:
        qg = g.reshape(q, [0, n_kv, rep, -1, dk])  # [B, Hkv, rep, S, Dk]
        kt = g.unsqueeze(g.op("Transpose", k, perm=[0, 1, 3, 2]), [2])  # [B, Hkv, 1, Dk, T]
        vv = g.unsqueeze(v, [2])
        b = g.unsqueeze(bias, [1])
    else:
        qg, kt, vv, b = q, g.op("Transpose", k, perm=[0, 1, 3, 2]), v, bias
    scores = g.op("Add", g.op("Mul", g.op("MatMul", qg, kt), g.const(scale, np.float32)), b)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), vv)
    if rep > 1:
        out = g.reshape(out, [0, n_heads, -1, dv])
    out = g.op("Transpose", out, perm=[0, 2, 1, 3])  # [B, S, H, Dv]
    return g.reshape(out, [0, 0, -1])
