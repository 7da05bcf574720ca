"""Other tools' int4 checkpoints (GPTQModel/AutoGPTQ, AutoAWQ GEMM) read and exported without re-rounding.

The checkpoints are built here from the llama fixture with packers written from the layouts' specifications
(independent of dsquant/foreign.py: they pack known integer codes), and every check compares against the
layout's own dequantization formula applied to those codes:

    GPTQ: W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]      AWQ: W[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from safetensors.torch import load_file, save_file
from test_gguf_export import expected_tensors, gguf_tensors

from dsq.dsquant.errors import DsqError
from dsq.dsquant.quantized import QuantizedCheckpoint
from dsq.export.gguf_writer import export_gguf

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_words(u: np.ndarray) -> np.ndarray:
    """[..., 8k] nibbles -> [..., k] int32, element j of each 8 at bits 4j."""
    u = u.astype(np.uint32).reshape(*u.shape[:-1], -1, 8)
    words = np.zeros(u.shape[:-1], dtype=np.uint32)
    for j in range(8):
        words |= u[..., j] << np.uint32(4 * j)
    return words.view(np.int32)


def pack_gptq(q, z, s, g_idx, v1: bool) -> dict[str, torch.Tensor]:
    """q [in, out] codes 0..15, z/s [groups, out] -> GPTQ tensors (qweight packed along in, qzeros along out)."""
    qweight = _pack_words(q.T).T  # pack along the input dim
    stored_z = z - 1 if v1 else z  # AutoGPTQ's v1 format stores zero - 1
    assert stored_z.min() >= 0  # the test never builds the v1 overflow case by accident
    return {"qweight": torch.from_numpy(np.ascontiguousarray(qweight)), "qzeros": torch.from_numpy(_pack_words(stored_z)),
            "scales": torch.from_numpy(s), "g_idx": torch.from_numpy(g_idx.astype(np.int32))}


def pack_awq(q, z, s) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: qweight [in, out/8] and qzeros [groups, out/8], nibble k holds output 8j + AWQ_ORDER[k]."""
    def interleave(u):
        u = u.reshape(u.shape[0], -1, 8)
        return _pack_words(u[..., AWQ_ORDER].reshape(u.shape[0], -1))
    return {"qweight": torch.from_numpy(interleave(q)), "qzeros": torch.from_numpy(interleave(z)),
            "scales": torch.from_numpy(s)}


def _codes(w: np.ndarray, group: int, sym: bool, g_idx: np.ndarray):
    """Round-to-nearest int4 codes of w [out, in] for the column groups g_idx -> q [in, out], z, s [groups, out]."""
    wt = w.T.astype(np.float32)  # [in, out]
    n_groups = int(g_idx.max()) + 1
    s = np.zeros((n_groups, wt.shape[1]), np.float16)
    z = np.zeros((n_groups, wt.shape[1]), np.int64)
    for g in range(n_groups):
        cols = wt[g_idx == g]
        if sym:
            s[g] = (np.abs(cols).max(0) / 7.0 + 1e-8).astype(np.float16)
            z[g] = 8
        else:
            lo, hi = np.minimum(cols.min(0), 0), np.maximum(cols.max(0), 0)
            s[g] = ((hi - lo) / 15.0 + 1e-8).astype(np.float16)
            z[g] = np.clip(np.round(-lo / s[g].astype(np.float32)), 0, 15)
    ss, zz = s[g_idx].astype(np.float32), z[g_idx]
    q = np.clip(np.round(wt / ss) + zz, 0, 15).astype(np.int64)
    return q, z, s


def expected(q, z, s, g_idx) -> torch.Tensor:
    """The layout's own dequantization, [out, in] float32."""
    return torch.from_numpy(((q - z[g_idx]).astype(np.float32) * s[g_idx].astype(np.float32)).T.copy())


def build(src, out, kind: str, group: int, sym: bool = True, v1: bool = True, act_order: bool = False):
    """A GPTQ/AWQ checkpoint from the float fixture at ``src``; returns (path, {weight name: expected values})."""
    shutil.copytree(src, out)
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    rng = np.random.default_rng(0)
    want, tensors = {}, {}
    for name, w in sd.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            tensors[name] = w
            continue
        cols = w.shape[1]
        g_idx = np.arange(cols) // (cols if group == -1 else group)
        if act_order:
            if "q_proj" in name:  # non-trivial, but every block of 32 columns stays inside one group: exact
                chunks = rng.permutation(cols // 32)
                g_idx = np.repeat(chunks // (group // 32), 32)
            else:  # GPTQ's desc_act: g_idx[perm[i]] = i // group for a column permutation perm
                g_idx = np.empty(cols, np.int64)
                g_idx[rng.permutation(cols)] = np.arange(cols) // group
        q, z, s = _codes(w.float().numpy(), group, sym, g_idx)
        mod = name.removesuffix(".weight")
        parts = pack_awq(q, z, s) if kind == "awq" else pack_gptq(q, z, s, g_idx, v1)
        tensors.update({f"{mod}.{k}": v for k, v in parts.items()})
        want[name] = expected(q, z, s, g_idx)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    if kind == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"}
    else:
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym,
                                      "desc_act": act_order, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out, want


CASES = {  # id -> (kind, group, sym, v1, dsq format, fixture)
    "gptq_sym_g32_v1": ("gptq", 32, True, True, "int4_sym_g32", "llama"),
    "gptq_sym_g128_v2": ("gptq", 128, True, False, "int4_sym_g128", "llama"),
    "gptq_sym_channel_v1": ("gptq", -1, True, True, "int4_sym_g32", "llama"),  # whole rows: g32, scale repeated
    "gptq_asym_g64_v1": ("gptq", 64, False, True, "int4_asym_g64", "llama"),
    "gptq_asym_g256_v2": ("gptq", 256, False, False, "int4_asym_g32", "llama"),
    "awq_g128": ("awq", 128, False, False, "int4_asym_g128", "qwen2"),  # q/k/v biases stay plain tensors
}


@pytest.fixture(scope="module")
def foreign(model_dir, tmp_path_factory):
    cache = {}

    def get(case: str):
        if case not in cache:
            kind, group, sym, v1, _, arch = CASES.get(case, ("gptq", 128, True, True, None, "llama"))
            out = tmp_path_factory.mktemp("foreign") / case
            cache[case] = build(model_dir(arch), out, kind, group, sym, v1, act_order=case == "act_order")
        return cache[case]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_reader_equals_the_layouts_dequantization(case, foreign):
    src, want = foreign(case)
    ck = QuantizedCheckpoint(src)
    every = dict(ck.iter_weights())
    got = {n: t for n, t in every.items() if n in want}
    assert set(got) == set(want)
    if CASES[case][5] == "qwen2":  # a GPTQ/AWQ module's bias is a plain tensor beside its packed weight
        assert isinstance(every["model.layers.0.self_attn.q_proj.bias"], torch.Tensor)
    for name, qt in got.items():
        assert qt.format == CASES[case][4], name
        assert torch.equal(qt.dequantize(), want[name]), name
    assert ck.rerounded == {}


@pytest.mark.parametrize("case", ["gptq_sym_g32_v1", "gptq_sym_g128_v2", "gptq_sym_channel_v1"])
def test_symmetric_gptq_to_q4_0_adds_no_error(case, foreign, tmp_path):
    """GGUF Q4_0 (gguf-py's dequantizer) equals GPTQ's own dequantization bit for bit; g128 blocks are split into
    four Q4_0 blocks that repeat the fp16 scale."""
    src, want = foreign(case)
    out = tmp_path / "m.gguf"
    report = export_gguf(src, out, type="q4_0", pure=True)
    ref = expected_tensors(want, QuantizedCheckpoint(src).config)
    got = gguf_tensors(out)
    rows = {r["name"]: r for r in report["tensors"]}
    for name, w in ref.items():
        gtype, values = got[name]
        assert gtype == GT.Q4_0 and rows[name]["status"] == "exact", name
        assert torch.equal(torch.from_numpy(values), w), name
    assert report["requantized"] == 0


@pytest.mark.parametrize("case", ["gptq_asym_g64_v1", "gptq_asym_g256_v2", "awq_g128"])
def test_asymmetric_to_q4_1_within_the_fp16_offset(case, foreign, tmp_path):
    """Q4_1 stores m = -z*s as fp16: exact codes and d, m within half an fp16 ulp (gguf_quants.q4_1_offset_bound)."""
    src, want = foreign(case)
    out = tmp_path / "m.gguf"
    report = export_gguf(src, out)  # auto: the int4 asym weights go to their twin, Q4_1
    ref = expected_tensors(want, QuantizedCheckpoint(src).config)
    got = gguf_tensors(out)
    rows = {r["name"]: r for r in report["tensors"]}
    for name, w in ref.items():
        gtype, values = got[name]
        assert gtype == GT.Q4_1 and rows[name]["status"] == "exact", name
        diff = (torch.from_numpy(values) - w).abs()
        bound = w.abs().amax() * 2.0**-11 * 16  # |m| <= 15 * s, half an ulp of it
        assert float(diff.max()) <= float(bound), name
    assert report["requantized"] == 0


def test_act_order_reports_what_it_re_rounds(foreign, tmp_path):
    src, want = foreign("act_order")
    ck = QuantizedCheckpoint(src)
    got = dict(ck.iter_weights())
    for name, w in want.items():
        qt = got[name]
        assert qt.format == "int4_sym_g32", name
        if "q_proj" in name:  # g_idx permutes whole blocks of 32: carried exactly
            assert torch.equal(qt.dequantize(), w), name
            assert name.removesuffix(".weight") not in ck.rerounded
        else:
            info = ck.rerounded[name.removesuffix(".weight")]
            rel = float((qt.dequantize() - w).norm() / w.norm())
            assert info["blocks"] > 0 and info["rel_error"] == pytest.approx(rel, rel=1e-4) and 0 < rel < 0.2
    out = tmp_path / "a.gguf"
    report = export_gguf(src, out, type="q4_0", pure=True)
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["blk.0.attn_q.weight"]["status"] == "exact"
    down = rows["blk.0.ffn_down.weight"]
    assert down["status"] == "requantized" and down["rel_error"] > 0
    assert any("act-order" in n for n in down["notes"])
    assert report["requantized"] == 12 and any("GPTQ act-order" in n for n in report["notes"])  # all but 2 q_proj


@pytest.mark.parametrize("case", ["gptq_sym_g128_v2", "awq_g128"])
def test_onnx_matmulnbits_carries_the_values(case, foreign, tmp_path):
    """`dsq export --to onnx`: each weight's MatMulNBits initializers (B, scales, zero_points) hold the layout's
    values exactly, at the checkpoint's own block of 128."""
    import onnx
    from onnx import numpy_helper

    from dsq.export.onnx_export import export_onnx
    from dsq.export.onnx_weights import PackedNBits, unpack_matmulnbits

    src, want = foreign(case)
    out = tmp_path / "onnx"
    export_onnx(src, out, accuracy_level=0)
    model = onnx.load(out / "model.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    blocks = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {128}
    for name, w in want.items():
        n, k = w.shape
        p = PackedNBits(inits[f"{name}.B"], inits[f"{name}.scales"], inits.get(f"{name}.zero_points"), k, n, 4, 128)
        assert (p.zero_points is None) == (CASES[case][2]), name  # symmetric: MatMulNBits' default zero point 8
        assert torch.equal(unpack_matmulnbits(p), w), name


def test_unsupported_foreign_configs_fail_cleanly(foreign, tmp_path):
    src, _ = foreign("gptq_sym_g32_v1")
    for bad in ({"checkpoint_format": "marlin"}, {"bits": 3}, {"group_size": 48}):
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"].update(bad)
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(DsqError):
            dict(QuantizedCheckpoint(d).iter_weights())


def _rewrite_qzeros(src, dst, words: int, cfg_update: dict | None = None):
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t["model.layers.0.mlp.up_proj.qzeros"] = torch.full_like(t["model.layers.0.mlp.up_proj.qzeros"], words)
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    if cfg_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(cfg_update)
        (dst / "config.json").write_text(json.dumps(cfg))


def test_damaged_zero_points_are_named(foreign, tmp_path):
    """v1's wrapped zero (stored -1: nibble 15 -> zero 16) and sym configs whose zeros are not 8 raise, naming the tensor."""
    from dsq.dsquant.errors import BadWeightsError

    src, _ = foreign("gptq_asym_g64_v1")
    _rewrite_qzeros(src, tmp_path / "wrap", -1)
    with pytest.raises(BadWeightsError, match=r"up_proj\.qzeros.*wrapped"):
        dict(QuantizedCheckpoint(tmp_path / "wrap").iter_weights())
    src, _ = foreign("gptq_sym_g32_v1")
    _rewrite_qzeros(src, tmp_path / "sym", 0x66666666)  # v1 stored 6 -> zero 7, not 8
    with pytest.raises(BadWeightsError, match=r"up_proj\.qzeros.*sym"):
        dict(QuantizedCheckpoint(tmp_path / "sym").iter_weights())
