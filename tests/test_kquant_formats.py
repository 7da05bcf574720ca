"""dsq's GGUF-grid formats (dsquant/kformats.py: q2_k..q6_k, q5_0, q5_1) and GPTQ into them.

* Round to nearest is ggml's quantizer: the GGUF bytes of a quantized tensor equal those of the float tensor.
* gguf-py reads every carried tensor back to exactly ``QuantizedTensor.dequantize()`` (no tolerance).
* GPTQ on a trained-like layer (correlated inputs with column scales spread over e^±2) lowers the output error
  below RTN and below ggml's imatrix rounding, for every kind (measured ratios to RTN ~0.1-0.2; the gate is 0.6).
* ``dsq quantize --method gptq`` with a recipe of these formats, then ``dsq export --type q4_k_m``: the
  checkpoint holds the calibrated tensors, every tensor whose policy type is its format is written "exact"
  with the same values, and llama.cpp runs the file (its logits follow a torch model holding the GGUF's values).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader
from gguf.quants import dequantize

from dsq.dsquant.calib.gptq import GPTQOptions, gptq_quantize
from dsq.dsquant.errors import CorruptFileError, UnsupportedError
from dsq.dsquant.formats import FORMATS
from dsq.dsquant.kformats import K_FORMATS, KQuantTensor
from dsq.dsquant.layouts import LAYOUTS
from dsq.export.gguf_quants import GGUF_TYPES, encode

KINDS = sorted(K_FORMATS)


def _read(data: np.ndarray, kind: str, rows: int) -> torch.Tensor:
    return torch.from_numpy(np.array(dequantize(data.reshape(rows, -1), GT[kind.upper()]), dtype=np.float32))


def layer(seed: int = 0, n: int = 2048, k: int = 512, out: int = 48):
    """A trained-like linear: inputs correlated across columns with log-normal column scales (a few columns
    carry most of the activation energy, as in LLMs), Gaussian weights. -> (X [n, k], W [out, k], H = 2 X^T X / n)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(n, k, generator=g) @ mix) * torch.exp(torch.randn(k, generator=g))
    w = torch.randn(out, k, generator=g) * 0.02
    return x, w, 2 * x.T @ x / n


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_is_ggml_and_gguf_holds_it_exactly(kind):
    _, w, h = layer(k=512)
    fmt = FORMATS[kind]
    for imp in (None, torch.diagonal(h)):
        qt = fmt.quantize(w, "w", importance=imp)
        assert isinstance(qt, KQuantTensor) and qt.codes.max() <= fmt.spec.qmax
        data, change = encode(qt, GGUF_TYPES[kind], "w")
        assert change is None  # packed, not re-rounded
        from_float, _ = encode(w, GGUF_TYPES[kind], "w", importance=None if imp is None else imp.numpy())
        assert np.array_equal(data, from_float)  # the format's rounding is ggml's, importance path included
        assert torch.equal(_read(data, kind, w.shape[0]), qt.dequantize())
    assert fmt.nbytes(tuple(w.shape)) == data.size


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_beats_rtn_and_imatrix_and_is_carried_exactly(kind):
    x, w, h = layer(seed=1, n=1024, out=32)
    fmt = FORMATS[kind]

    def out_err(qt) -> float:
        return float(((x @ (qt.dequantize() - w).T) ** 2).mean())

    rtn, imp = fmt.quantize(w), fmt.quantize(w, importance=torch.diagonal(h))
    gq = gptq_quantize(fmt, w, h)
    assert out_err(gq) < 0.6 * out_err(rtn), (out_err(gq), out_err(rtn))
    assert out_err(gq) < out_err(imp), (out_err(gq), out_err(imp))
    data, change = encode(gq, GGUF_TYPES[kind], "w")
    assert change is None and torch.equal(_read(data, kind, w.shape[0]), gq.dequantize())
    act = gptq_quantize(fmt, w, h, GPTQOptions(act_order=True))  # static grids from the original weights
    assert out_err(act) < 0.6 * out_err(rtn)


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q5_1"])
def test_checkpoint_storage_round_trip(kind):
    _, w, h = layer(n=256, k=512, out=8)
    qt = FORMATS[kind].quantize(w, "w", importance=torch.diagonal(h))
    layout = LAYOUTS["compressed-tensors"]
    stored = layout.encode("m.weight", qt)
    planned = {p.name: (p.dtype, tuple(p.shape)) for p in layout.planned("m.weight", FORMATS[kind], qt.shape)}
    assert {n: (t.dtype, tuple(t.shape)) for n, t in stored.items()} == planned
    back = layout.decode(FORMATS[kind], stored, "m")
    assert torch.equal(back.dequantize(), qt.dequantize()) and torch.equal(back.codes, qt.codes)
    scheme = layout.quantization_config({"m.weight": kind}, [])["config_groups"]["group_0"]["weights"]
    assert layout.format_of({"config_groups": {"g": {"targets": ["m"], "weights": scheme}}}, "m") is FORMATS[kind]
    bad = dict(stored, **{"m.weight_scale": torch.full_like(stored["m.weight_scale"], float("nan"))})
    with pytest.raises(CorruptFileError, match="NaN"):
        layout.decode(FORMATS[kind], bad, "m")


def test_refusals():
    with pytest.raises(UnsupportedError, match="multiple of 256"):
        FORMATS["q4_k"].quantize(torch.zeros(4, 576), "blk.w")
    with pytest.raises(UnsupportedError, match="importance has 3 values"):
        FORMATS["q6_k"].quantize(torch.zeros(4, 256), "w", importance=torch.ones(3))


def test_gptq_recipe_quantize_then_export_q4_k_m_carries_exactly_and_runs(model_dir, tmp_path):
    from dsq.dsquant.calib.hook import CalibSpec
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.dsquant.quantized import QuantizedCheckpoint
    from dsq.export.gguf_tensors import permute_rows
    from dsq.export.gguf_writer import export_gguf

    src = model_dir("llama")
    cfg = json.loads((src / "config.json").read_text())
    recipe = tmp_path / "k.toml"
    recipe.write_text('default = "q4_k"\nfallback = "q5_0"\n\n[[override]]\npattern = "*.v_proj.weight"\nformat = "q6_k"\n')
    out = tmp_path / "gptq-k"
    report = quantize_checkpoint(src, out, str(recipe), calibration=CalibSpec("gptq", "mixed", 8, 32))
    assert report["calibration"]["method"] == "gptq"
    written = {n: t for n, t in QuantizedCheckpoint(out).iter_weights() if isinstance(t, KQuantTensor)}
    assert {t.format for t in written.values()} >= {"q4_k", "q6_k"}
    down = "model.layers.0.mlp.down_proj.weight"
    rtn = FORMATS[written[down].format].quantize(_float(src, down))
    assert not torch.equal(rtn.codes, written[down].codes)  # calibrated, not RTN

    gguf_path = tmp_path / "k.gguf"
    rep = export_gguf(out, gguf_path, type="q4_k_m")
    rows = {r["name"]: r for r in rep["tensors"]}
    reader = {t.name: t for t in GGUFReader(gguf_path).tensors}
    carried = 0
    for name, qt in written.items():
        if not name.startswith("model.layers."):  # lm_head: the policy's output type, not the recipe's
            continue
        layer_i = name.split(".")[2]
        leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.split(".")[-2]]
        t = reader[f"blk.{layer_i}.{leaf}.weight"]
        if t.tensor_type.name.lower() != qt.format:
            continue
        got = _read(np.asarray(t.data), qt.format, qt.shape[0])
        if leaf in ("attn_q", "attn_k"):  # GGUF row i is HF row perm[i] (llama.cpp's q/k permutation)
            heads = cfg["num_attention_heads"] if leaf == "attn_q" else cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
            hf = torch.empty_like(got)
            hf[permute_rows(got.shape[0], heads)] = got
            got = hf
        assert torch.equal(got, qt.dequantize()), name
        assert rows[t.name]["status"] == "exact"
        carried += 1
    assert carried >= 4

    # llama.cpp runs it: its logits vs a torch model holding the GGUF's own values (gguf-py's dequantization)
    pytest.importorskip("llama_cpp")
    from test_gguf_llamacpp import PROMPT, _check_logits, hf_ids, load, torch_holding_gguf

    model = torch_holding_gguf(gguf_path, cfg, tmp_path / "k-ref", unpermute_qk=True)
    _check_logits(model, load(gguf_path), hf_ids(src, PROMPT), 0.03)


def _float(src, name: str) -> torch.Tensor:
    from dsq.dsquant.checkpoint import Checkpoint

    ckpt = Checkpoint(src)
    return ckpt.load(next(t for t in ckpt.tensors if t.name == name)).to(torch.float32)
