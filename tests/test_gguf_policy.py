"""llama.cpp's per-tensor type policy (export/gguf_policy.py) and the Q5_0/Q5_1 packers (export/q5quants.py).

The reference is llama.cpp itself: ``llama_model_quantize`` (through llama-cpp-python) on an F16 GGUF written
by dsq from the same fixture, every tensor's type read back with gguf-py's GGUFReader. Fixtures cover the
rules' inputs: llama/qwen2 (2 layers, rows of 256: output Q6_K, use_more_bits on layer 1), a 16-layer llama
with 4 query heads per KV head (use_more_bits, first-layer bumps, GQA rules), a 4-layer qwen2 with tied
embeddings and rows of 320 (not whole 256-blocks: the Q8_0 output rule and every fallback), and DeepSeek-V3
(MLA, 8 routed experts, rows of 128 and 64). Measured: every tensor of every fixture under all 14 mixes
equals llama.cpp's (also on 80-layer llama and qwen2 models, llama.cpp's "70B" attn_v rule, checked once
outside the suite: too big for it); file sizes are equal to the byte; Q2_K/Q3_K/Q4_0/Q5_0/Q5_1/Q8_0 tensors
quantized from floats are byte-identical to llama.cpp's, Q6_K too (ggml's reference quantizers, which
llama.cpp uses without an imatrix); Q4_K/Q5_K blocks >= 99.5% identical (near-ties of the scale search); dsq's
Q4_1 from floats is its own rounding (integer zero points: same types and sizes, other bytes).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from dsq.dsquant.errors import BadWeightsError, UnsupportedError
from dsq.dsquant.source import Source
from dsq.export.gguf_policy import MIXES, ModelFacts, get_mix, plan_types, use_more_bits
from dsq.export.gguf_quants import GGUF_TYPES, encode
from dsq.export.gguf_tensors import plan_tensors
from dsq.export.gguf_writer import export_gguf
from dsq.export.q2quants import quantize_q2_k
from dsq.export.q3quants import quantize_q3_k
from dsq.export.q5quants import Q5_K_BYTES, quantize_q5_0, quantize_q5_1, quantize_q5_k
from dsq.export.q6ref import quantize_q6_k_ref

# name -> (fixtures.SPECS architecture, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "llama-16l-gqa4": ("llama", dict(intermediate_size=256, num_hidden_layers=16, num_key_value_heads=1)),
    "qwen2-320-tied": ("qwen2", dict(hidden_size=320, intermediate_size=320, num_hidden_layers=4,
                                     num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=True)),
}
K_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_m")  # the ones with per-layer rules


@pytest.fixture(scope="module")
def variant(tmp_path_factory, model_dir):
    """variant(name) -> (checkpoint dir, dsq's F16 GGUF of it), built once per module."""
    import transformers

    from fixtures import _COMMON, SPECS, save_model

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            arch, over = VARIANTS[name]
            if not over:
                src = model_dir(arch)
            else:
                cls, kwargs = SPECS[arch]
                config = getattr(transformers, cls)(**{**_COMMON, **kwargs, **over})
                torch.manual_seed(0)
                model = transformers.AutoModelForCausalLM.from_config(config).eval()
                src = save_model(model, tmp_path_factory.mktemp(name) / "model")
            f16 = src.parent / f"{name}-f16.gguf"
            export_gguf(src, f16, type="f16", overwrite=True)
            cache[name] = (src, f16)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _llama_quantize(llama_cpp, f16, out, mix: str, imatrix: bool = False) -> dict[str, str]:
    """llama.cpp's own quantizer on ``f16`` with file type ``mix``; returns its tensor types."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    params.nthread = 2
    keep = []
    if imatrix:  # all-ones importance for every quantizable tensor: only its presence changes the policy
        entries = []
        for t in GGUFReader(f16).tensors:
            if len(t.shape) >= 2 and t.name.endswith("weight") and "norm" not in t.name:
                n = int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) > 2 else 1)
                data = (ctypes.c_float * n)(*([1.0] * n))
                keep.append(data)
                entries.append(llama_cpp.llama_model_imatrix_data(t.name.encode(), data, n))
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))(*entries)
        keep.append(arr)
        params.imatrix = arr
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) == 0
    return _types(out)


def _dsq_plan(src, mix: str, imatrix: bool = False) -> dict[str, str]:
    """dsq's policy on its own tensor plan for ``src``: {GGUF name: type}; unquantized tensors are F32."""
    s = Source(src)
    outs, _ = plan_tensors(s)
    plan = plan_types(MIXES[mix], [(t.name, tuple(t.shape)) for t in outs],
                      ModelFacts.from_config(s.arch.gguf_arch, s.config), imatrix=imatrix)
    return {t.name: plan[t.name].type.name if t.name in plan else "F32" for t in outs}


# -- the policy, tensor by tensor, against llama.cpp --------------------------------------------------------
@pytest.mark.parametrize(("name", "mixes"), [
    ("llama", tuple(MIXES)),
    ("qwen2", ("q4_0", "q3_k_m", "q4_k_m", "q6_k")),  # llama's layout plus 1-D biases
    ("deepseek_v3", tuple(MIXES)),
    ("llama-16l-gqa4", K_MIXES),
    ("qwen2-320-tied", tuple(MIXES)),
])
def test_policy_equals_llama_cpp(name, mixes, variant, llama_cpp, tmp_path):
    src, f16 = variant(name)
    seen = set()
    for mix in mixes:
        theirs = _llama_quantize(llama_cpp, f16, tmp_path / f"{mix}.gguf", mix)
        mine = _dsq_plan(src, mix)
        assert mine == theirs, (mix, {n: (mine.get(n), t) for n, t in theirs.items() if mine.get(n) != t})
        seen |= set(theirs.values())
        (tmp_path / f"{mix}.gguf").unlink()
    # the fixtures exercise what they are there for
    expect = {"llama": {"Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"}, "qwen2": {"Q6_K", "Q5_K"},
              "deepseek_v3": {"Q5_0", "Q5_1", "Q4_0", "Q8_0"}, "llama-16l-gqa4": {"Q6_K", "Q5_K", "Q4_K"},
              "qwen2-320-tied": {"Q5_0", "Q5_1", "Q4_0", "Q8_0"}}[name]
    assert expect <= seen, seen


def test_policy_with_importance_matrix_equals_llama_cpp(variant, llama_cpp, tmp_path):
    """With an imatrix, llama.cpp's Q4_0/Q5_0 put the first eighth of ffn_down in Q4_1/Q5_1."""
    src, f16 = variant("llama-16l-gqa4")
    for mix, bumped in (("q4_0", "Q4_1"), ("q5_0", "Q5_1")):
        theirs = _llama_quantize(llama_cpp, f16, tmp_path / f"{mix}.gguf", mix, imatrix=True)
        assert _dsq_plan(src, mix, imatrix=True) == theirs
        assert [n for n, t in theirs.items() if t == bumped] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]


# -- files written by dsq, against llama.cpp's files ------------------------------------------------------
@pytest.mark.parametrize(("name", "mixes"), [
    ("llama", ("q4_0", "q2_k")),  # Q2_K mix: Q2_K, Q3_K and Q6_K tensors
    ("deepseek_v3", ("q4_k", "q4_k_s", "q5_k_m", "q4_1")),
    ("qwen2-320-tied", ("q4_k_m", "q3_k_l")),
])
def test_export_types_size_and_bytes_equal_llama_cpp(name, mixes, variant, llama_cpp, tmp_path):
    """dsq export HF --to gguf --type X: llama.cpp's type for every tensor, the same file size, and for the
    types whose reference rounding dsq follows exactly (Q2_K, Q3_K, Q6_K, Q4_0, Q5_0, Q5_1, Q8_0) the same bytes."""
    src, f16 = variant(name)
    for mix in mixes:
        theirs_path, ours_path = tmp_path / f"{mix}-llama.gguf", tmp_path / f"{mix}-dsq.gguf"
        _llama_quantize(llama_cpp, f16, theirs_path, get_mix(mix).name)
        report = export_gguf(src, ours_path, type=mix)
        theirs = {t.name: t for t in GGUFReader(theirs_path).tensors}
        ours = {t.name: t for t in GGUFReader(ours_path).tensors}
        assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}, mix
        assert abs(ours_path.stat().st_size - theirs_path.stat().st_size) <= 4096, mix
        same = 0
        for n, t in theirs.items():
            if t.tensor_type in (GT.Q2_K, GT.Q3_K, GT.Q6_K, GT.Q4_0, GT.Q5_0, GT.Q5_1, GT.Q8_0):
                assert np.array_equal(np.asarray(t.data), np.asarray(ours[n].data)), (mix, n)
                same += 1
        assert same
        assert report["policy"] == f"llama.cpp {get_mix(mix).name}"
        assert int(GGUFReader(ours_path).fields["general.file_type"].contents()) == int(get_mix(mix).file_type)


def test_int4_checkpoint_to_q4_0_carries_codes_and_applies_policy(quantized_dir, variant, llama_cpp, tmp_path):
    """dsq's int4_sym_g32 is Q4_0's twin: under --type q4_0 its linear weights are carried byte for byte, the
    16-bit embedding and output get llama.cpp's Q4_0 policy (Q4_0 / Q6_K), and the file is llama.cpp's size."""
    _, f16 = variant("llama")
    theirs_path = tmp_path / "theirs.gguf"
    _llama_quantize(llama_cpp, f16, theirs_path, "q4_0")
    out = tmp_path / "ours.gguf"
    report = export_gguf(quantized_dir("llama", "int4"), out, type="q4_0")
    status = {r["name"]: r["status"] for r in report["tensors"]}
    assert all(s == "exact" for n, s in status.items() if n.startswith("blk.") and "norm" not in n)
    assert status["token_embd.weight"] == status["output.weight"] == "quantized"
    assert _types(out) == _types(theirs_path)
    assert abs(out.stat().st_size - theirs_path.stat().st_size) <= 4096
    theirs = {t.name: np.asarray(t.data) for t in GGUFReader(theirs_path).tensors}
    for t in GGUFReader(out).tensors:  # dsq's int4 codes are ggml's reference Q4_0 of the same floats
        if t.tensor_type in (GT.Q4_0, GT.Q6_K):
            assert np.array_equal(np.asarray(t.data), theirs[t.name]), t.name


def test_int4_checkpoint_to_another_type_is_requantized_and_reported(quantized_dir, tmp_path):
    """Under --type q5_0 the int4 weights have no twin: re-quantized from dsq's dequantized values (exactly
    what the Q5_0 packer makes of them) and reported as such."""
    from dsq.dsquant.quantized import QuantizedCheckpoint

    src = quantized_dir("llama", "int4")
    out = tmp_path / "q5.gguf"
    report = export_gguf(src, out, type="q5_0")
    rows = {r["name"]: r for r in report["tensors"]}
    row = rows["blk.0.ffn_up.weight"]
    # Q5_0 holds a block exactly when its int4 extreme is code -8 (d = s/2, codes 2q): error is small, maybe 0
    assert row["status"] == "requantized" and row["rel_error"] < 0.05
    assert report["requantized"] >= 14 and any("Q5_0 gives them" in n for n in report["notes"])
    ck = QuantizedCheckpoint(src)
    w = ck.dequantized_state_dict()["model.layers.0.mlp.up_proj.weight"].float()
    got = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.ffn_up.weight")
    assert np.array_equal(np.asarray(got.data).reshape(-1), quantize_q5_0(w)[0])


# -- the policy's pieces, without llama.cpp ----------------------------------------------------------------
def test_use_more_bits_and_aliases():
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(2) if use_more_bits(i, 2)] == [1]
    assert get_mix("q4_k") is MIXES["q4_k_m"] and get_mix("Q5_K") is MIXES["q5_k_m"] and get_mix("f16") is None


def test_pure_and_tied_output_rules():
    facts = ModelFacts("llama", 2, 4, 2)
    tensors = [("token_embd.weight", (320, 256)), ("blk.0.attn_v.weight", (128, 256)),
               ("blk.0.attn_norm.weight", (256,)), ("blk.0.ffn_down.weight", (256, 96))]
    plan = plan_types(MIXES["q4_k_m"], tensors, facts)
    assert plan["token_embd.weight"].type == GT.Q6_K  # tied: it is the output matrix
    assert "blk.0.attn_norm.weight" not in plan  # 1-D: llama.cpp keeps it as it is
    assert plan["blk.0.ffn_down.weight"].type == GT.Q5_0 and "96" in plan["blk.0.ffn_down.weight"].why
    pure = plan_types(MIXES["q4_k_m"], tensors, facts, pure=True)
    assert pure["token_embd.weight"].type == GT.Q4_K and pure["blk.0.ffn_down.weight"].type == GT.Q5_0
    odd = plan_types(MIXES["q4_0"], [("output.weight", (320, 48))], facts)
    assert odd["output.weight"].type == GT.F16  # not whole blocks of 32: llama.cpp has no type for it


def test_every_mix_is_writable_and_a_type_dsq_cannot_pack_is_refused(model_dir):
    """All 14 mixes use only types dsq packs; a policy that needs another (an IQ mix) fails before writing."""
    from gguf import LlamaFileType

    from dsq.export.gguf_policy import FALLBACK, OUTPUT_RULES, POST_RULES, Mix
    from dsq.export.gguf_writer import _BY_GGML, TYPE_NAMES, policy_types

    used = {m.default for m in MIXES.values()} | {t for m in MIXES.values() for rules in m.rules.values()
                                                  for _, t in rules if t is not None}
    used |= {t for _, t in OUTPUT_RULES} | {r[-1] for r in POST_RULES}
    used |= {FALLBACK[t] for t in used if t in FALLBACK}
    assert used <= set(_BY_GGML), used - set(_BY_GGML)
    assert set(MIXES) <= set(TYPE_NAMES)
    src = Source(model_dir("llama"))
    outs, _ = plan_tensors(src)
    with pytest.raises(UnsupportedError, match=r"--type iq4_xs: .*IQ4_XS.*which dsq cannot write yet"):
        policy_types(outs, Mix("IQ4_XS", LlamaFileType.MOSTLY_IQ4_XS, GT.IQ4_XS), src)


# -- Q5_0 / Q5_1 packers -----------------------------------------------------------------------------------
def _edge_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g) * torch.rand(16, 1, generator=g) * 0.05
    w[0, :32] = 0.0  # all-zero block: d = 0
    w[1, :32] = 0.75  # constant block
    w[2, :32] = torch.linspace(-1, 1, 32)  # equal |min| and |max|: the first wins
    w[3, 7] = -4.0  # a negative extreme
    w[4, :32] = torch.arange(32) / 31.0  # codes land on .5 boundaries
    return w


@pytest.mark.parametrize(("packer", "gt"), [(quantize_q5_0, GT.Q5_0), (quantize_q5_1, GT.Q5_1)])
def test_q5_packers_are_gguf_py_reference_and_read_back_exactly(packer, gt):
    w = _edge_rows()
    data, values = packer(w)
    assert np.array_equal(data, quantize(w.numpy(), gt).reshape(-1))
    back = np.asarray(dequantize(data.reshape(w.shape[0], -1), gt), dtype=np.float32)
    assert np.array_equal(back, values.numpy())
    rel = float((values - w).pow(2).sum() / w.pow(2).sum()) ** 0.5
    assert 0.005 < rel < 0.05, rel  # 5-bit blocks of 32


def test_q5_packers_refuse_what_they_cannot_hold():
    with pytest.raises(BadWeightsError, match="beyond fp16"):
        quantize_q5_0(torch.full((1, 32), 2.0e6))
    with pytest.raises(BadWeightsError, match="beyond fp16"):
        quantize_q5_1(torch.cat([torch.full((1, 16), -1.0e5), torch.full((1, 16), 1.0e5)], dim=1))
    with pytest.raises(UnsupportedError, match="not a multiple of 32"):
        encode(torch.zeros(4, 48), GGUF_TYPES["q5_1"], "blk.0.attn_k_b.weight")


# -- against ggml's own reference quantizers, called directly -----------------------------------------------
def _ggml_quantize(llama_cpp, x: torch.Tensor, gt: GT) -> np.ndarray:
    """ggml_quantize_chunk from llama-cpp-python's libggml-base (no imatrix: the *_ref quantizers)."""
    from pathlib import Path

    from gguf import GGML_QUANT_SIZES

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    src = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    block, size = GGML_QUANT_SIZES[gt]
    dst = np.zeros(src.size // block * size, dtype=np.uint8)
    n = lib.ggml_quantize_chunk(int(gt), src.ctypes.data, dst.ctypes.data, 0, src.shape[0], src.shape[1], None)
    assert n == dst.size
    return dst


@pytest.mark.parametrize(("packer", "gt"), [(quantize_q5_0, GT.Q5_0), (quantize_q5_1, GT.Q5_1)])
def test_q5_packers_equal_ggml(packer, gt, llama_cpp):
    w = _edge_rows()
    assert np.array_equal(packer(w)[0], _ggml_quantize(llama_cpp, w, gt))


def test_q5_k_is_ggml_reference_and_read_back_exactly(llama_cpp):
    """quantize_row_q5_K_ref: >= 98% of 176-byte blocks identical (measured 5246 of 5248 on the llama
    fixture's weights, the rest near-ties of the scale search as for Q4_K), squared error within 0.5%, and
    gguf-py reads dsq's bytes back to exactly dsq's values."""
    w = _edge_rows()
    data, values = quantize_q5_k(w)
    back = np.asarray(dequantize(data.reshape(w.shape[0], -1), GT.Q5_K), dtype=np.float32)
    assert np.array_equal(back, values.numpy())
    theirs = _ggml_quantize(llama_cpp, w, GT.Q5_K)
    same = (theirs.reshape(-1, Q5_K_BYTES) == data.reshape(-1, Q5_K_BYTES)).all(1)
    assert same.mean() >= 0.98, same.mean()
    ref = torch.from_numpy(np.asarray(dequantize(theirs.reshape(w.shape[0], -1), GT.Q5_K), dtype=np.float32))
    assert float((values - w).pow(2).sum()) <= 1.005 * float((ref - w).pow(2).sum())
    with pytest.raises(UnsupportedError, match="whole blocks of 256"):
        quantize_q5_k(torch.zeros(2, 320))


def test_cli_pure_needs_a_quantized_type(model_dir, tmp_path):
    from typer.testing import CliRunner

    from dsq.cli import app

    res = CliRunner().invoke(app, ["export", str(model_dir("llama")), "--to", "gguf", "-o", str(tmp_path / "m.gguf"),
                                   "--type", "f16", "--pure"])
    assert res.exit_code == 2 and "--pure applies to a quantized --type" in res.output, res.output
    res = CliRunner().invoke(app, ["export", str(model_dir("llama")), "--to", "onnx", "-o", str(tmp_path / "o"),
                                   "--pure"])
    assert res.exit_code == 2 and "--pure is not an option of --to onnx" in res.output, res.output


@pytest.mark.parametrize(("packer", "gt", "bits", "rel_range"), [
    (quantize_q3_k, GT.Q3_K, 3.4375, (0.05, 0.3)),
    (quantize_q2_k, GT.Q2_K, 2.625, (0.1, 0.6)),
    (quantize_q6_k_ref, GT.Q6_K, 6.5625, (0.003, 0.03)),
])
def test_k_quants_are_ggml_reference_byte_for_byte_and_read_back_exactly(packer, gt, bits, rel_range, llama_cpp):
    """quantize_row_q3_K_ref (with its coordinate descent), quantize_row_q2_K_ref (with its absolute-error scale
    search) and quantize_row_q6_K_ref (with its 19 trial scales): every block identical (measured on gaussian
    rows and the llama fixture's weights too), and gguf-py reads the bytes back to exactly dsq's values."""
    g = torch.Generator().manual_seed(1)
    w = torch.cat([_edge_rows(), torch.randn(16, 256, generator=g) * 0.02])
    w[5, :16] = 0.0  # an all-zero sub-block
    w[6, :16] = 1.0e-3  # a constant one
    w[7, :16] = -2.0e-3  # a constant negative one: all in the min
    data, values = packer(w)
    assert np.array_equal(data, _ggml_quantize(llama_cpp, w, gt))
    back = np.asarray(dequantize(data.reshape(w.shape[0], -1), gt), dtype=np.float32)
    assert np.array_equal(back, values.numpy())
    assert data.size * 8 == w.numel() * bits
    rel = float((values - w).pow(2).sum() / w.pow(2).sum()) ** 0.5
    assert rel_range[0] < rel < rel_range[1], rel
    with pytest.raises(UnsupportedError, match="whole blocks of 256"):
        packer(torch.zeros(2, 320))
