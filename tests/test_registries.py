"""Every architecture record names only kinds that exist: in each exporter's mechanism table, in gguf-py's
tensor lists, in transformers and mlx-lm. A record with a missing mechanism fails here, not when one command
meets that model at run time. Also: architecture facts live in the records only (no model_type literals
elsewhere in the library)."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from dsq.dsquant.archs import ARCHITECTURES, ROLES, Role, module_path
from dsq.dsquant.archs.base import Architecture

from fixtures import ARCHS

RECORDS = sorted(ARCHITECTURES)
LIBRARY = Path(__file__).resolve().parents[1]


def arch(name: str) -> Architecture:
    return ARCHITECTURES[name]


def test_every_record_has_a_fixture_and_every_fixture_a_record():
    assert set(ARCHS) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", RECORDS)
def test_roles_are_known_and_listed_once(name):
    a = arch(name)
    assert a.model_type == name
    assert len(set(a.roles)) == len(a.roles)
    assert set(a.roles) <= set(ROLES)
    assert {Role.EMBED, Role.LM_HEAD, Role.OUTPUT_NORM, Role.ATTN_NORM, Role.FFN_NORM, Role.ATTN_O} <= set(a.roles)
    if a.moe:
        assert {Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN} <= set(a.roles)


@pytest.mark.parametrize("name", RECORDS)
def test_gguf_mechanisms_exist(name):
    import gguf

    from dsq.export import gguf_meta, gguf_tensors

    a = arch(name)
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    assert a.gguf_arch in by_name, f"{name}: llama.cpp has no architecture `{a.gguf_arch}`"
    assert a.gguf_hparams in gguf_meta.HPARAMS
    assert set(a.transforms.values()) <= set(gguf_tensors.TRANSFORMS)
    assert set(a.transforms) <= set(a.roles)
    if a.moe or a.scoring:
        assert (a.scoring or "softmax") in gguf_meta.GATING
    # every tensor the record has is one llama.cpp loads for that architecture (MTP is left out by design)
    allowed = set(gguf.MODEL_TENSORS[by_name[a.gguf_arch]])
    for role in a.roles:
        if ROLES[role].group == "mtp":
            continue
        if role == Role.MLA_KV_B:  # split into attn_k_b / attn_v_b
            assert {gguf.MODEL_TENSOR.ATTN_K_B, gguf.MODEL_TENSOR.ATTN_V_B} <= allowed
            continue
        tensor, _ = gguf_tensors.ROLE_TENSORS[role]
        assert tensor in allowed, f"{name}: {role.value} -> {tensor.name}, which llama.cpp's {a.gguf_arch} lacks"


@pytest.mark.parametrize("name", RECORDS)
def test_onnx_mechanisms_exist(name):
    from dsq.export import onnx_graph, onnx_moe

    a = arch(name)
    assert (a.attention, "plain") in onnx_graph.ATTENTION_IMPLS
    assert {onnx_graph.ATTENTION_IMPLS[k] for k in onnx_graph.ATTENTION_IMPLS if k[0] == a.attention} <= set(
        onnx_graph.ATTENTION
    )
    assert bool(a.routers) == a.moe
    assert {kind for _, kind in a.routers} <= set(onnx_moe.ROUTERS)
    assert isinstance(a.genai_type, str) and a.genai_type
    spec = onnx_graph.arch_spec({"model_type": name})
    assert (spec.attention, spec.rotary_class, spec.qkv_bias, spec.qk_norm, spec.moe) == (
        a.attention, a.rotary, a.qkv_bias, a.qk_norm, a.moe
    )


@pytest.mark.parametrize("name", RECORDS)
def test_transformers_classes_exist(name):
    """Calibration and the ONNX rotary tables run transformers' own classes, named by the record."""
    import transformers

    a = arch(name)
    mod = importlib.import_module(a.hf_module)
    for cls in (a.decoder_layer, a.rotary):
        assert hasattr(mod, cls), f"{a.hf_module} has no {cls}"
    for cls in a.hf_classes:
        assert hasattr(transformers, cls)
    assert transformers.AutoConfig.for_model(name).model_type == name


@pytest.mark.parametrize("name", RECORDS)
def test_awq_groups_resolve_to_modules_of_the_record(name):
    from dsq.dsquant.calib.awq import CONDITIONS, scale_groups

    a = arch(name)
    for g in a.awq_groups:
        assert g.when in CONDITIONS
        assert g.prev in a.roles and set(g.linears) <= set(a.roles)
        assert ROLES[g.prev].kind in ("norm", "linear")
        assert all(ROLES[r].kind == "linear" for r in g.linears)
    groups = scale_groups(name)
    assert [grp.prev for grp in groups] == [module_path(g.prev) for g in a.awq_groups]


@pytest.mark.parametrize("name", RECORDS)
def test_mlx_lm_has_the_model_and_the_record_names_real_roles(name):
    a = arch(name)
    assert set(a.mlx_requantized) <= set(a.roles)
    if importlib.util.find_spec("mlx_lm") is None:
        pytest.skip("mlx-lm is not installed")
    assert importlib.util.find_spec(f"mlx_lm.models.{name}") is not None, f"mlx_lm has no model `{name}`"


def test_model_type_literals_live_in_the_records_only():
    """A model_type that is not also a GGUF or genai name (those are kinds of their own) is spelled only in
    its family's record module: the issue's ``grep -rl '"deepseek_v3"'`` goal, for every such type."""
    files = [p for d in ("dsquant", "export", "runtimes") for p in (LIBRARY / d).rglob("*.py")]
    files.append(LIBRARY / "cli.py")
    texts = {p: p.read_text(encoding="utf-8") for p in files if p.is_file()}
    checked = 0
    others = {r.gguf_arch for r in ARCHITECTURES.values()} | {r.genai_type for r in ARCHITECTURES.values()}
    for name in ARCHITECTURES:
        if name in others:
            continue
        where = sorted(str(p.relative_to(LIBRARY)) for p, t in texts.items() if re.search(rf"[\"']{name}[\"']", t))
        assert len(where) == 1 and where[0].startswith("dsquant/archs/"), (name, where)
        checked += 1
    assert checked >= 2
