"""Runtime interface, registry (entry points + plugins), torch backend, streaming, chat template, CLI run/chat/bench."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dsq.cli import app
from dsq.dsquant.errors import InputError, UnsupportedError
from dsq.runtimes import registry
from dsq.runtimes.base import Sampler, Sampling, TextStream, model_format
from dsq.runtimes.chat import ThinkSplitter, render_chat, starts_in_think

PLUGIN_SRC = Path(__file__).parent / "plugins" / "dsq_dummy_runtime"
runner = CliRunner()


@pytest.fixture(scope="module")
def torch_rt(model_dir):
    from dsq.runtimes.torch_runtime import TorchRuntime

    rt = TorchRuntime.load(model_dir("qwen2"), "cpu", threads=2)
    yield rt
    rt.close()


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """Install the dummy plugin as a distribution (package + dist-info with an entry point) on sys.path."""
    site = tmp_path / "site"
    shutil.copytree(PLUGIN_SRC, site / "dsq_dummy_runtime")
    info = site / "dsq_dummy_runtime-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dsq-dummy-runtime\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dsq.runtimes]\ndummy = dsq_dummy_runtime:DummyRuntime\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("dsq_dummy_runtime", None)


# -- registry ------------------------------------------------------------------------------------------
def test_own_backends_are_entry_points_of_dsq_in_auto_order():
    """dsq's backends come from its own [project.entry-points."dsq.runtimes"], like any plugin's,
    ordered for `auto` by Runtime.priority: native runtimes first, the torch reference last."""
    b = {name: x for name, x in registry.backends().items() if x.source == "dsq"}
    assert list(b) == ["llama-cpp", "onnxruntime", "mlx", "torch"]
    assert b["torch"].availability().ok and "cpu" in b["torch"].availability().devices


def test_plugin_listed_and_used_through_entry_points(plugin_site, tmp_path):
    from importlib.metadata import entry_points

    assert "dummy" in {ep.name for ep in entry_points(group="dsq.runtimes")}  # really through importlib.metadata
    b = registry.backends()["dummy"]
    assert b.source == "dsq-dummy-runtime" and b.cls.__name__ == "DummyRuntime"
    res = runner.invoke(app, ["runtimes"])
    assert res.exit_code == 0, res.output
    assert "dummy" in res.output and "dsq-dummy-runtime" in res.output

    model = tmp_path / "m.dummy"
    model.write_text("")
    res = runner.invoke(app, ["run", str(model), "-p", "a", "--raw", "-n", "5"])  # auto picks the plugin
    assert res.exit_code == 0, res.output
    assert "bcdef" in res.output


def test_broken_plugin_is_listed_not_fatal(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dsq.runtimes]\nbroken = no_such_module_xyz:Runtime\n")
    monkeypatch.syspath_prepend(str(site))
    av = registry.backends()["broken"].availability()
    assert not av.ok and "no_such_module_xyz" in av.reason
    assert runner.invoke(app, ["runtimes"]).exit_code == 0


def test_missing_package_names_pip_extra(monkeypatch):
    from dsq.runtimes.llama_cpp_runtime import LlamaCppRuntime
    from dsq.runtimes.onnxruntime_runtime import OnnxRuntime

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "pip install 'dsq[llama-cpp]'" in LlamaCppRuntime.available().reason
    assert "pip install 'dsq[onnx]'" in OnnxRuntime.available().reason


def test_wrong_runtime_for_model(model_dir, tmp_path):
    hf = model_dir("qwen2")
    assert model_format(hf) == "hf"
    with pytest.raises(InputError, match="reads a GGUF file, but this is a Hugging Face directory"):
        registry.choose(hf, "llama-cpp")
    with pytest.raises(InputError, match="unknown runtime"):
        registry.choose(hf, "tensorrt")
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"not a gguf")
    with pytest.raises(UnsupportedError, match="no available runtime reads"):
        registry.choose(fake, "auto")
    res = runner.invoke(app, ["run", str(hf), "-p", "hi", "--runtime", "onnxruntime"])
    assert res.exit_code == 2 and "reads an ONNX model" in res.output and "Traceback" not in res.output


# -- shared pieces -------------------------------------------------------------------------------------
def test_text_stream_keeps_multibyte_characters_whole():
    data = "é🙂a".encode()
    ids = list(data)  # one byte per token: é and 🙂 span several tokens
    stream = TextStream(lambda t: bytes(t).decode(errors="replace"))
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "é🙂a"
    assert all("\ufffd" not in p for p in pieces)


def test_sampler_greedy_topk_and_seed():
    logits = np.array([0.0, 5.0, 4.9, -3.0], dtype=np.float32)
    assert Sampler(Sampling())(logits) == 1
    draws = {Sampler(Sampling(temperature=1.0, top_k=2, seed=s))(logits) for s in range(40)}
    assert draws == {1, 2}
    a = [Sampler(Sampling(temperature=1.0, seed=7))(logits) for _ in range(5)]
    assert a == [Sampler(Sampling(temperature=1.0, seed=7))(logits) for _ in range(5)]
    assert {Sampler(Sampling(temperature=1.0, top_p=0.5, seed=s))(logits) for s in range(30)} == {1}


def test_think_splitter_handles_tags_split_across_pieces():
    sp = ThinkSplitter(in_think=starts_in_think("<|user|>q<|assistant|><think>\n"))
    out = []
    for piece in ["reason", "ing </th", "ink>The ans", "wer <thi", "nk>x</think>!"]:
        out += list(sp.feed(piece))
    out += list(sp.flush())
    think = "".join(t for t, th in out if th)
    plain = "".join(t for t, th in out if not th)
    assert think == "reasoning x" and plain == "The answer !"


def test_chat_template_is_sandboxed():
    msgs = [{"role": "user", "content": "hi"}]
    t = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert render_chat(t, msgs, {}) == "<user>hi<a>"
    with pytest.raises(InputError, match="chat template"):
        render_chat("{{ messages.append({'role': 'x'}) }}", msgs, {})  # immutable sandbox: no mutation
    with pytest.raises(InputError, match="unsafe"):
        render_chat("{{ ''.__class__.__mro__ }}", msgs, {})  # no access to Python internals
    with pytest.raises(InputError, match="bad role"):
        render_chat("{{ raise_exception('bad role') }}", msgs, {})


# -- torch backend -------------------------------------------------------------------------------------
def test_torch_logits_cache_and_greedy_generate(torch_rt):
    rt = torch_rt
    ids = rt.tokenize("The quick brown fox jumps over the lazy dog.")
    assert rt.detokenize(ids) == "The quick brown fox jumps over the lazy dog."
    full = rt.logits(ids)
    assert full.shape == (len(ids), rt.vocab_size) and full.dtype == np.float32
    row = rt.prefill(ids[:-3])
    np.testing.assert_allclose(row, full[-4], atol=1e-4)
    for j, t in enumerate(ids[-3:]):  # KV-cached decode matches the full forward pass
        np.testing.assert_allclose(rt.decode(t), full[len(ids) - 3 + j], atol=1e-4)

    from dsq.runtimes.base import GenerationStats

    st = GenerationStats()
    text = "".join(rt.generate(ids, 6, stats=st))
    chain, cur = [], list(ids)
    for _ in range(st.new_tokens):  # greedy = argmax of the full forward pass, token by token
        nxt = int(np.argmax(rt.logits(cur)[-1]))
        chain.append(nxt)
        cur.append(nxt)
    assert st.token_ids == chain and text == rt.detokenize(chain)
    assert st.prompt_tokens == len(ids) and st.first_token_s > 0


def test_torch_loads_dsq_quantized_output_dequantized(torch_rt, quantized_dir):
    from dsq.runtimes.torch_runtime import TorchRuntime

    ids = torch_rt.tokenize("The quick brown fox")
    with TorchRuntime.load(quantized_dir("qwen2", "int8"), "cpu") as q:
        diff = np.abs(q.logits(ids) - torch_rt.logits(ids)).max()
    assert 0 < diff < 0.5  # the same model, rounded


def test_torch_loads_dsq_quantized_deepseek_v3_with_fused_experts(model_dir, quantized_dir):
    """dsq writes routed experts one tensor each (as DeepSeek does); transformers' MoE holds them fused."""
    import torch

    from dsq.dsquant.quantized import QuantizedCheckpoint
    from dsq.runtimes.torch_runtime import TorchRuntime

    q = quantized_dir("deepseek_v3", "int4")
    deq = QuantizedCheckpoint(q).dequantized_state_dict(torch.float32)
    with TorchRuntime.load(q, "cpu") as rt, TorchRuntime.load(model_dir("deepseek_v3"), "cpu") as ref:
        layer = next(i for i, m in enumerate(rt.model.model.layers) if hasattr(m.mlp, "experts"))
        experts = rt.model.model.layers[layer].mlp.experts
        for e in range(experts.gate_up_proj.shape[0]):
            p = f"model.layers.{layer}.mlp.experts.{e}."
            want = torch.cat([deq[p + "gate_proj.weight"], deq[p + "up_proj.weight"]])
            assert torch.equal(experts.gate_up_proj[e], want)
            assert torch.equal(experts.down_proj[e], deq[p + "down_proj.weight"])
        ids = [3, 17, 42, 5, 99]
        diff = np.abs(rt.logits(ids) - ref.logits(ids)).max()
    assert 0 < diff < 0.5  # the same model, rounded to int4


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_run_and_chat_through_runner(model_dir):
    m = str(model_dir("qwen2"))
    res = runner.invoke(app, ["run", m, "-p", "The quick", "--raw", "-n", "8", "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert "prompt + " in res.output and "tok/s" in res.output
    res = runner.invoke(app, ["chat", m, "-n", "6", "--temperature", "0"], input="hello\n/reset\nagain\n/exit\n")
    assert res.exit_code == 0, res.output
    assert "torch float32 on cpu" in res.output


def test_cli_bench_json(model_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", str(model_dir("qwen2")), "--threads", "2", "--prompt-tokens", "16",
                              "--new-tokens", "4", "--runs", "2", "--warmup", "1", "--json", str(out),
                              "--html", str(tmp_path / "b.html")])
    assert res.exit_code == 0, res.output
    (r,) = json.loads(out.read_text())["results"]
    assert r["runtime"] == "torch" and r["threads"] == 2 and r["prompt_tokens"] == 16
    assert len(r["samples"]) == 2 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert r["ttft_s"] > 0 and r["peak_rss_mb"] > 50
    assert "prefill tok/s" in res.output
    assert "data:image/png;base64," in (tmp_path / "b.html").read_text()
