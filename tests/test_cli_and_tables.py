"""The CLI (help, plan, quantize, inspect) and the architecture/role tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dsq.cli import app
from dsq.dsquant.archs import ARCHITECTURES, ROLE_INFO, ROLE_NAMES, Role
from dsq.dsquant.checkpoint import Checkpoint
from dsq.dsquant.plan import make_plan
from dsq.dsquant.recipes import PRESETS

from fixtures import ARCHS

runner = CliRunner()


def dsq(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# -- tables -----------------------------------------------------------------------------------------
def test_every_role_has_one_row_in_each_table():
    assert set(ROLE_INFO) == set(Role) == set(ROLE_NAMES)
    templates = [t for names in ROLE_NAMES.values() for t in names]
    assert len(templates) == len(set(templates)), "a name template maps to two roles"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_fixture_tensor_has_a_role(arch, model_dir):
    ckpt = Checkpoint(model_dir(arch))
    unmapped = [t.name for t in ckpt.tensors if t.ref is None]
    assert not unmapped
    roles = {t.ref.role for t in ckpt.tensors}
    assert {Role.EMBED, Role.LM_HEAD, Role.ATTN_NORM, Role.ATTN_O} <= roles
    if arch.startswith("deepseek"):
        assert {Role.MLA_KV_A, Role.MLA_KV_B, Role.ROUTER, Role.EXPERT_UP, Role.SHARED_DOWN} <= roles
    if arch == "deepseek_v3":
        assert {Role.MLA_Q_A, Role.MLA_Q_B, Role.ROUTER_BIAS} <= roles
    if arch == "qwen2":
        assert Role.ATTN_Q_BIAS in roles
    if arch == "qwen3":
        assert Role.ATTN_Q_NORM in roles
    if arch == "qwen3_moe":
        assert {Role.ATTN_Q_NORM, Role.ROUTER, Role.EXPERT_GATE, Role.EXPERT_DOWN} <= roles
        assert not roles & {Role.SHARED_UP, Role.ROUTER_BIAS, Role.MLP_UP}  # every layer is routed


def test_match_extracts_layer_and_expert():
    ref = ARCHITECTURES["deepseek_v3"].match("model.layers.12.mlp.experts.201.down_proj.weight")
    assert (ref.role, ref.layer, ref.expert) == (Role.EXPERT_DOWN, 12, 201)
    mtp = ARCHITECTURES["deepseek_v3"].match("model.layers.61.eh_proj.weight")
    assert mtp.role == Role.MTP_PROJ and mtp.layer == 61
    assert ARCHITECTURES["llama"].match("model.layers.0.mlp.experts.0.up_proj.weight") is None
    assert ARCHITECTURES["llama"].match("model.layers.0.self_attn.q_proj.weight.extra") is None


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_never_quantize_norms_router_or_embeddings(preset, model_dir):
    plan = make_plan(Checkpoint(model_dir("deepseek_v3")), PRESETS[preset])
    for e in plan.entries:
        if ROLE_INFO[e.tensor.ref.role].kind in ("norm", "bias", "router", "embedding"):
            assert e.format is None, e.name
    assert len(plan.quantized) > 50


# -- CLI --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["quantize"], ["plan"], ["inspect"]])
def test_help(command):
    r = dsq(*command, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


def test_plan_json_and_table(model_dir):
    r = dsq("plan", model_dir("qwen2"), "--recipe", "int4", "--json")
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert data["summary"]["quantized"] == 14 and data["summary"]["architecture"] == "qwen2"
    biases = [t for t in data["tensors"] if t["role"] == "attn_q_bias"]
    assert biases and all(t["format"] == "keep" for t in biases)
    assert 4.4 < data["summary"]["quantized_bits_per_weight"] < 4.6
    assert data["summary"]["bytes_out"] < data["summary"]["bytes_in"]
    r = dsq("plan", model_dir("qwen2"), "--recipe", "fp8")
    assert r.exit_code == 0 and "peak RAM estimate" in r.output and "fp8_b128" in r.output


def test_quantize_then_inspect(model_dir, tmp_path):
    out = tmp_path / "q"
    r = dsq("quantize", model_dir("qwen3"), "-o", out, "-r", "int8")
    assert r.exit_code == 0, r.output
    assert "tensors quantized" in r.output and (out / "dsq-report.json").is_file()
    r = dsq("inspect", out)
    assert r.exit_code == 0
    assert "qwen3" in r.output and "compressed-tensors" in r.output and "weight_packed" in r.output


def test_inspect_gguf_and_hostile_gguf(tmp_path):
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = dsq("inspect", path)
    assert r.exit_code == 0 and "token_embd.weight" in r.output and "llama" in r.output
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    for blob, needle in [
        (data[: len(data) // 2], "past the end"),
        (data[:8] + (2**62).to_bytes(8, "little") + data[16:], "hostile"),
        (b"GGUF" + (9).to_bytes(4, "little") + data[8:], "version"),
        (b"NOPE" + data[4:], "bad magic"),
    ]:
        bad.write_bytes(blob)
        r = runner.invoke(app, ["inspect", str(bad)])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (needle, r.output)
