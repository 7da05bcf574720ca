"""The tokenizer resolver against transformers itself (AutoTokenizer + GenerationConfig), one test per layout,
and the one function every side file is opened through (links out of the model folder are refused)."""

from __future__ import annotations

import json
import os

import pytest
from tok_layouts import CHATML, LAYOUTS, write_layout

from dsq.dsquant.errors import CorruptFileError, InputError
from dsq.dsquant.paths import resolve_model_file
from dsq.dsquant.tokenizer_facts import resolve_tokenizer

TEXT = "The answer is 42."


def _hf(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _generation_eos(folder) -> set[int]:
    from transformers import AutoConfig, GenerationConfig

    if (folder / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(folder))
    else:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder)))
    eos = gen.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resolver_equals_transformers(layout, tmp_path):
    folder = write_layout(layout, tmp_path / layout)
    facts = resolve_tokenizer(folder)
    hf = _hf(folder)
    assert facts.ids == {"bos": hf.bos_token_id, "eos": hf.eos_token_id, "pad": hf.pad_token_id, "unk": hf.unk_token_id}
    with_special = hf(TEXT)["input_ids"]
    plain = hf(TEXT, add_special_tokens=False)["input_ids"]
    assert with_special == [*facts.prefix_ids, *plain, *facts.suffix_ids]
    assert facts.add_bos == (with_special[:1] == [hf.bos_token_id] != plain[:1])
    assert facts.special_ids == {i for i, t in hf.added_tokens_decoder.items() if t.special}
    template = hf.chat_template
    assert facts.chat_template == (template.get("default") if isinstance(template, dict) else template)
    # generation stops at every id transformers' generate() stops at, and at the tokenizer's EOS
    assert _generation_eos(folder) | ({hf.eos_token_id} - {None}) <= set(facts.eog_ids)
    assert facts.eog_ids[0] == (hf.eos_token_id if hf.eos_token_id is not None else facts.eog_ids[0])
    assert type(hf).__name__ == facts.tokenizer_class
    assert facts.normalizer_names == ((type(hf.backend_tokenizer.normalizer).__name__,)
                                      if hf.backend_tokenizer.normalizer else ())


def test_layout_specific_facts(tmp_path):
    """What each layout is about, stated once (the test above checks them against transformers)."""
    f = resolve_tokenizer(write_layout("llama3_post_processor", tmp_path / "a"))
    assert f.add_bos and f.bos_id == 0 and f.template_end == "<|eot_id|>" and set(f.eog_ids) == {1, 2}
    f = resolve_tokenizer(write_layout("special_tokens_map_only", tmp_path / "b"))
    assert (f.bos_id, f.eos_id, f.pad_id) == (0, 2, 1) and f.sources["eos_token"] == "special_tokens_map.json"
    f = resolve_tokenizer(write_layout("generation_eos_list", tmp_path / "c"))
    assert f.eog_ids == (1, 0) and f.template_end == "<|im_end|>"
    f = resolve_tokenizer(write_layout("chat_template_list", tmp_path / "d"))
    assert f.chat_template == CHATML and set(f.chat_templates) == {"default", "tool_use"}
    f = resolve_tokenizer(write_layout("chat_template_file_wins", tmp_path / "e"))
    assert f.chat_template == CHATML and f.sources["chat_template"] == "chat_template.jinja"
    f = resolve_tokenizer(write_layout("add_eos_token", tmp_path / "f"))
    assert not f.add_bos and not f.add_eos and any("ignored by transformers" in n for n in f.notes)
    f = resolve_tokenizer(write_layout("legacy_added_tokens", tmp_path / "g"))
    by_text = {t.content: t.special for t in f.added}
    assert by_text == {"<|endoftext|>": True, "<|eos|>": True, "<tool>": False}
    f = resolve_tokenizer(write_layout("qwen2_nfc", tmp_path / "h"))
    assert f.normalizer_names == ("NFC",) and f.tokenizer_class == "Qwen2Tokenizer"


def test_qwen2_model_type_gets_qwen2_tokenizer(model_dir):
    """transformers loads Qwen2Tokenizer for model_type qwen2 whatever tokenizer_class says: NFC, Qwen2's regex."""
    from tokenizers import Tokenizer

    src = model_dir("qwen2")
    facts = resolve_tokenizer(src)
    hf = _hf(src)
    assert facts.tokenizer_class == type(hf).__name__ == "Qwen2Tokenizer"
    ours = Tokenizer.from_str(json.dumps(facts.effective_tokenizer))
    for text in ("numbers 1234567 and 3.14", "cafe\u0301 it's"):
        assert ours.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"]


def test_bad_side_files_are_named(tmp_path):
    folder = write_layout("chat_template_list", tmp_path / "m")
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="generation_config.json: not valid JSON"):
        resolve_tokenizer(folder)
    (folder / "generation_config.json").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFileError, match="chat_template"):
        resolve_tokenizer(folder)


# -- resolve_model_file ------------------------------------------------------------------------------
def test_links_out_of_the_model_folder_are_refused(tmp_path):
    folder = write_layout("special_tokens_map_only", tmp_path / "m")
    secret = tmp_path / "secret.json"
    secret.write_text('{"bos_token": "<s>"}')
    (folder / "special_tokens_map.json").unlink()
    os.symlink(secret, folder / "special_tokens_map.json")
    with pytest.raises(InputError, match=r"special_tokens_map.json: points outside the model directory \(to .*secret.json"):
        resolve_tokenizer(folder)
    with pytest.raises(InputError, match="points outside the model directory"):
        resolve_model_file(folder, "../secret.json")
    with pytest.raises(InputError, match="is an absolute path"):
        resolve_model_file(folder, str(secret))


def test_links_inside_the_folder_and_missing_files(tmp_path):
    folder = write_layout("special_tokens_map_only", tmp_path / "m")
    (folder / "sub").mkdir()
    (folder / "sub" / "real.json").write_text("{}")
    os.symlink("sub/real.json", folder / "linked.json")
    assert resolve_model_file(folder, "linked.json") == (folder / "sub" / "real.json").resolve()
    assert resolve_model_file(folder, "absent.json") is None
    os.symlink("sub/gone.json", folder / "dangling.json")
    assert resolve_model_file(folder, "dangling.json") is None


def test_hub_cache_snapshot_links_resolve_into_blobs(tmp_path):
    """huggingface_hub's cache: snapshots/REV/FILE -> ../../blobs/HASH stays inside models--ORG--NAME only."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text('{"eos_token": "</s>"}')
    os.symlink("../../blobs/f00d", snap / "special_tokens_map.json")
    assert resolve_model_file(snap, "special_tokens_map.json") == (repo / "blobs" / "f00d").resolve()
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "beef").write_text("{}")
    os.symlink("../../../models--org--other/blobs/beef", snap / "tokenizer_config.json")
    with pytest.raises(InputError, match="outside the model directory"):
        resolve_model_file(snap, "tokenizer_config.json")
