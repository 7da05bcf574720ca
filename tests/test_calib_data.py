"""Calibration data: shipped sets with provenance, user files, deterministic sampling."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dsq.dsquant.calib import data
from dsq.dsquant.errors import InputError


def test_manifest_lists_every_shipped_file_with_provenance():
    sets = data.shipped_sets()
    assert {"prose", "code", "reasoning"} <= set(sets)
    from dsq.dsquant.texts import eval_texts

    held_out = eval_texts()
    shipped = {p.name for p in data.DATA_DIR.iterdir() if p.suffix in (".txt", ".jsonl")}
    listed = {s.file.name for s in sets.values()} | {p.name for p in held_out.values()}
    assert shipped == listed, "every shipped text is in the manifest and vice versa"
    assert not set(held_out) & set(sets), "held-out eval text is never a calibration set"
    for s in sets.values():
        assert s.licence and s.source and s.description
        assert s.file.is_file() and s.nbytes > 1000
    assert sum(s.nbytes for s in sets.values()) < 1_000_000
    for parts in data.mixes().values():
        assert set(parts) <= set(sets)
    rows = {r["name"]: r for r in data.list_sets()}
    assert rows["mixed"]["bytes"] == sum(rows[p]["bytes"] for p in data.mixes()["mixed"])
    assert rows["reasoning"]["documents"] == len(data.shipped_sets()["reasoning"].file.read_text().splitlines())


def test_reasoning_set_regenerates_byte_for_byte():
    sys.path.insert(0, str(data.DATA_DIR))
    try:
        import make_reasoning
    finally:
        sys.path.pop(0)
    assert make_reasoning.generate() == (data.DATA_DIR / "reasoning.jsonl").read_text()
    first = json.loads(make_reasoning.generate().splitlines()[0])
    assert first["messages"][1]["content"].startswith("<think>")


class ToyTokenizer:
    """Characters as tokens: enough to check sampling without a model."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 500 + 1 for c in text]}


def test_sampling_is_seeded_and_windows_come_from_the_stream():
    streams = [list(range(1, 50)), list(range(100, 400))]
    a = data.sample_windows(streams, 6, 16, seed=3)
    b = data.sample_windows(streams, 6, 16, seed=3)
    c = data.sample_windows(streams, 6, 16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for k, row in enumerate(a.tolist()):
        s = streams[k % 2]
        i = s.index(row[0])
        assert row == [s[(i + j) % len(s)] for j in range(16)]  # a (cyclic) window of its source


def test_user_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("hello calibration world " * 20)
    jl = tmp_path / "mine.jsonl"
    jl.write_text(
        json.dumps({"text": "plain document"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    tok = ToyTokenizer()
    b1 = data.calibration_batch(str(txt), tok, 4, 8, seed=0)
    assert b1.ids.shape == (4, 8) and b1.describe()["streams"] == {"mine.txt": 20 * 24 + 1}
    docs = data.resolve_source(str(jl))[0][1]
    assert docs[0] == "plain document" and docs[1][1]["content"] == "a"
    assert data.render(docs[1], tok) == "user: q\nassistant: a\n"  # no chat template: plain fallback
    assert data.calibration_batch(str(txt), tok, 4, 8, seed=0).fingerprint == b1.fingerprint


@pytest.mark.parametrize(
    "content, match",
    [("{not json\n", "mine.jsonl:1: not valid JSON"), ('{"foo": 1}\n', "mine.jsonl:1: expected"), ("\n", "no documents")],
)
def test_bad_user_jsonl_names_file_and_line(tmp_path, content, match):
    p = tmp_path / "mine.jsonl"
    p.write_text(content)
    with pytest.raises(InputError, match=match):
        data.resolve_source(str(p))


def test_unknown_source_and_bad_suffix(tmp_path):
    with pytest.raises(InputError, match="not a shipped set"):
        data.resolve_source("no-such-set")
    p = tmp_path / "x.csv"
    p.write_text("a,b")
    with pytest.raises(InputError, match=r"\.txt or \.jsonl"):
        data.resolve_source(str(p))


def test_chat_documents_use_the_model_chat_template(model_dir):
    tok = data.load_tokenizer(model_dir("qwen2"))
    docs = data.resolve_source("reasoning")[0][1]
    text = data.render(docs[0], tok)
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n<think>" in text
    batch = data.calibration_batch("mixed", tok, 6, 32, seed=0)
    assert batch.ids.shape == (6, 32) and set(batch.describe()["streams"]) == {"prose", "code", "reasoning"}
    assert int(batch.ids.max()) < 320


def test_cli_calib_list_json():
    from typer.testing import CliRunner

    from dsq.cli import app

    res = CliRunner().invoke(app, ["calib", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) == {"prose", "code", "reasoning", "mixed"}
    assert all(r["licence"] for r in rows.values())
    assert rows["prose"]["sha256"] == data.shipped_sets()["prose"].sha256
