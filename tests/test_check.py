"""Exports behave like their source model (issue 11), measured with each runtime's own tokenizer.

The writer tests use llama.cpp (llama-cpp-python) and onnxruntime-genai directly, not dsq's check, so
they state what the runtime does with the exported file; then `dsq check` on good and hand-broken exports,
the check `dsq export` runs by default, and calibration text that keeps its <think> blocks.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tok_layouts import CHATML, LAYOUTS, write_layout
from typer.testing import CliRunner

from dsq.export.gguf_writer import export_gguf

from fixtures import build_model

TEXT = "The answer is 42."
runner = CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random Llama (vocab 320), saved without a tokenizer: each test adds a layout's files."""
    out = tmp_path_factory.mktemp("tiny") / "llama"
    build_model("llama").to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture
def layout(weights, tmp_path):
    def make(name: str, **kw):
        folder = tmp_path / name
        shutil.copytree(weights, folder)
        LAYOUTS[name](folder, **kw)
        return folder

    return make


def _hf(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# -- llama.cpp on dsq's GGUF ---------------------------------------------------------------------------
def _gguf(src, tmp_path):
    out = tmp_path / (src.name + ".gguf")
    export_gguf(src, out)
    return out


def _vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _eog(llm) -> set[int]:
    import llama_cpp

    return {t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)}


def _field(path, key):
    from gguf import GGUFReader

    f = GGUFReader(path).fields[key]
    return f.contents()


def test_gguf_adds_bos_when_the_post_processor_does(layout, tmp_path):
    """Issue input 1: Llama-3's TemplateProcessing adds <|begin_of_text|>; tokenizer_config has no add_bos_token."""
    src = layout("llama3_post_processor")
    out = _gguf(src, tmp_path)
    assert _field(out, "tokenizer.ggml.add_bos_token") is True
    ids = _vocab(out).tokenize(TEXT.encode(), add_bos=True, special=True)
    assert ids == _hf(src)(TEXT)["input_ids"] and ids[0] == 0


def test_gguf_special_ids_from_special_tokens_map(layout, tmp_path):
    """Issue input 2: names only in special_tokens_map.json; no ordinary token may end generation."""
    src = layout("special_tokens_map_only")
    out = _gguf(src, tmp_path)
    assert [_field(out, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")] == [0, 2, 1]
    assert _eog(_vocab(out)) == {2}


def test_gguf_stops_at_every_generation_eos(layout, tmp_path):
    """Issue input 3, GGUF side: generation_config eos [0, 1], with an end token llama.cpp does not know by name."""
    src = layout("generation_eos_list", end="<|turn_end|>")
    out = _gguf(src, tmp_path)
    assert _eog(_vocab(out)) == {0, 1}


@pytest.mark.parametrize("name", ["chat_template_file_wins", "chat_template_list"])
def test_gguf_chat_template_is_the_one_transformers_uses(name, layout, tmp_path):
    src = layout(name)
    out = _gguf(src, tmp_path)
    assert _field(out, "tokenizer.chat_template") == CHATML == _hf(src).get_chat_template()


def test_gguf_ignores_add_eos_token_as_transformers_does(layout, tmp_path):
    """add_bos_token/add_eos_token beside a tokenizer.json: transformers adds nothing, so llama.cpp must not."""
    src = layout("add_eos_token")
    out = _gguf(src, tmp_path)
    assert _vocab(out).tokenize(TEXT.encode(), add_bos=True, special=True) == _hf(src)(TEXT)["input_ids"]


def test_gguf_named_eos_is_a_control_token(layout, tmp_path):
    """Legacy layout: the EOS is a non-special added token in tokenizer.json; transformers makes it special."""
    src = layout("legacy_added_tokens")
    out = _gguf(src, tmp_path)
    hf = _hf(src)
    types = _field(out, "tokenizer.ggml.token_type")
    assert types[hf.eos_token_id] == 3 and types[hf.convert_tokens_to_ids("<tool>")] == 4  # CONTROL, USER_DEFINED
    llm = _vocab(out)
    assert llm.detokenize([hf.eos_token_id]) == b""  # a control token is not text


def test_gguf_cannot_normalize_nfc(layout, tmp_path):
    """What llama.cpp cannot reproduce: Qwen2's NFC normalizer. Composed text matches, decomposed does not."""
    src = layout("qwen2_nfc")
    out = _gguf(src, tmp_path)
    llm, hf = _vocab(out), _hf(src)
    for text, same in (("caf\u00e9 d\u00e9j\u00e0 vu 1234", True), ("cafe\u0301", False)):
        assert (llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text)["input_ids"]) is same


# -- onnxruntime-genai on dsq's ONNX folder -------------------------------------------------------------
def _onnx(src, tmp_path):
    from dsq.export.onnx_export import export_onnx

    out = tmp_path / (src.name + "-onnx")
    export_onnx(src, out)
    return out


def _genai_tokenizer(folder):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    tok.update_options(add_special_tokens="true")
    return model, tok


def test_genai_stops_at_the_chat_end_token(weights, tmp_path):
    """Issue input 3: config eos 1, generation_config [0, 1] with 0 = <|im_end|>. The model is made to emit
    token 0 first (final norm weight 0: all logits tie at 0, greedy takes the first), so genai must stop at once."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    model = build_model("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()
    src = tmp_path / "eos-list"
    model.to(torch.bfloat16).save_pretrained(src)
    write_layout("generation_eos_list", src)
    out = _onnx(src, tmp_path)
    assert set(json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]) == {0, 1}
    m = og.Model(str(out))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=24, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(np.array([[5, 6, 7]], dtype=np.int32))
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    assert steps == 1  # with eos_token_id 1 only, genai runs on to max_length


def test_genai_special_ids_and_bos(layout, tmp_path):
    """Issue inputs 1 and 2 for genai: BOS from the post-processor, bos/eos/pad from special_tokens_map.json."""
    out = _onnx(layout("llama3_post_processor"), tmp_path)
    _, tok = _genai_tokenizer(out)
    assert list(tok.encode(TEXT)) == _hf(tmp_path / "llama3_post_processor")(TEXT)["input_ids"]
    out = _onnx(layout("special_tokens_map_only"), tmp_path)
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 1)


def test_genai_loads_template_list_and_ignores_add_eos(layout, tmp_path):
    out = _onnx(layout("chat_template_list"), tmp_path)
    _, tok = _genai_tokenizer(out)  # a chat_template list in tokenizer_config.json stops genai loading the folder
    src = layout("add_eos_token")
    out = _onnx(src, tmp_path)
    _, tok = _genai_tokenizer(out)
    assert [int(i) for i in tok.encode(TEXT)] == _hf(src)(TEXT)["input_ids"]


# -- dsq check ----------------------------------------------------------------------------------------
def test_check_passes_good_exports_and_warns_what_runtimes_cannot_do(layout, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from dsq.runtimes.check import check_export

    src = layout("qwen2_nfc")
    report = check_export(_gguf(src, tmp_path), src)
    assert report.passed, report.first_failure
    warned = {r.input for r in report.rows if r.status == "warn"}
    assert "nfd" in warned and "ascii" not in warned
    assert {r.check for r in report.rows} >= {"token ids", "chat prompt", "chat ids", "end of generation", "greedy 16"}
    greedy = next(r for r in report.rows if r.check == "greedy 16")
    assert greedy.status == "ok" and greedy.detail.startswith("16/16")  # bf16 weights in a bf16 GGUF


def test_check_warns_about_an_end_token_llama_cpp_adds_by_name(layout, tmp_path):
    """``</s>`` is an ordinary token of DeepSeek-R1-Distill-Qwen's vocabulary, and llama.cpp makes it
    end-of-generation by its name whatever the GGUF says: a warning (no GGUF can avoid it), not a failure."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from dsq.runtimes.check import check_export

    src = layout("ordinary_named_end")
    out = _gguf(src, tmp_path)
    named = _vocab(out).tokenize(b"</s>", add_bos=False, special=True)
    assert len(named) == 1 and named[0] in _eog(_vocab(out))  # llama.cpp's own rule, the premise of the test
    report = check_export(out, src, greedy=False)
    row = next(r for r in report.rows if r.check == "end of generation")
    assert row.status == "warn" and "</s>" in row.detail and "whatever the GGUF says" in row.detail
    assert report.passed, report.first_failure


def test_check_fails_a_gguf_with_a_wrong_eos_written_by_hand(layout, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from gguf import GGUFReader

    from dsq.cli import app

    src = layout("special_tokens_map_only")
    out = _gguf(src, tmp_path)
    reader = GGUFReader(out, "r+")  # gguf-py's in-place editing, as its gguf_set_metadata script does
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    field.parts[field.data[0]][0] = 40
    del reader
    js = tmp_path / "check.json"
    res = runner.invoke(app, ["check", str(out), "--ref", str(src), "--json", str(js), "--no-greedy"])
    assert res.exit_code == 1, res.output
    error = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "end of generation" in error[0] and "ordinary token(s) [(40, " in error[0]
    result = json.loads(js.read_text())
    assert result["passed"] is False and result["first_failure"] in error[0]


def test_check_fails_an_onnx_folder_with_a_wrong_eos(layout, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from dsq.cli import app

    src = layout("generation_eos_list")
    out = _onnx(src, tmp_path)
    res = runner.invoke(app, ["check", str(out), "--ref", str(src), "--no-greedy"])
    assert res.exit_code == 0, res.output
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["eos_token_id"] = 1  # what dsq wrote before: config.json's eos only
    cfg_path.write_text(json.dumps(cfg))
    res = runner.invoke(app, ["check", str(out), "--ref", str(src), "--no-greedy"])
    assert res.exit_code == 1
    assert "error:" in res.output and "does not stop at [(0, '<|im_end|>')]" in res.output


def test_check_reads_an_onnx_export_for_another_execution_provider(layout, tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from dsq.export.onnx_export import export_onnx
    from dsq.runtimes.check import check_export

    src = layout("generation_eos_list")
    out = tmp_path / "cuda-onnx"
    export_onnx(src, out, ep="cuda")  # genai_config asks for CUDA, which this machine may not have
    report = check_export(out, src, greedy=False)
    assert report.passed, report.first_failure


def test_export_runs_the_check_unless_told_not_to(layout, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from dsq.cli import app

    src = layout("llama3_post_processor")
    out = tmp_path / "m.gguf"
    res = runner.invoke(app, ["export", str(src), "--to", "gguf", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "dsq check" in res.output and "greedy 16" in res.output  # the table, after the summary
    res = runner.invoke(app, ["export", str(src), "--to", "gguf", "-o", str(out), "--overwrite", "--json"])
    check = json.loads(res.output[res.output.index("{"):])["check"]
    assert check["passed"] is True and {r["check"] for r in check["rows"]} >= {"token ids", "end of generation", "greedy 16"}
    res = runner.invoke(app, ["export", str(src), "--to", "gguf", "-o", str(out), "--overwrite", "--json", "--no-check"])
    assert res.exit_code == 0 and "check" not in json.loads(res.output[res.output.index("{"):])


def test_check_names_a_path_that_is_not_an_export(layout, tmp_path):
    from dsq.cli import app

    src = layout("chat_template_list")
    res = runner.invoke(app, ["check", str(src), "--ref", str(src)])
    assert res.exit_code == 2 and "not a GGUF file or an ONNX export folder" in res.output


# -- calibration ----------------------------------------------------------------------------------------
def test_reasoning_calibration_keeps_every_think_block_under_an_r1_template(tmp_path):
    """Issue input 4: an R1-Distill template deletes reasoning from assistant history turns; rendering the
    prompt with the generation prompt and appending the reply verbatim keeps all of it."""
    from dsq.dsquant.calib import data

    src = write_layout("r1_distill", tmp_path / "r1")
    tok = _hf(src)
    docs = data.resolve_source("reasoning")[0][1]
    texts = [data.render(d, tok) for d in docs]
    assert sum(t.count("<think>") for t in texts) == sum(t.count("</think>") for t in texts) == len(docs) == 510
    first = docs[0][-1]["content"]
    assert texts[0].endswith(first.removeprefix("<think>\n")) and "<|Assistant|><think>\n" in texts[0]
    whole = tok.apply_chat_template(docs[0], tokenize=False)  # what rendering the whole conversation gives
    assert "<think>" not in whole
