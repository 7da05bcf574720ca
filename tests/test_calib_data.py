"""Calibration data: shipped sets with provenance, user files, deterministic sampling."""

from __future__ import annotations

import gzip
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from dsq.dsquant.calib import data
from dsq.dsquant.errors import InputError


def test_manifest_lists_every_shipped_file_with_provenance():
    sets = data.shipped_sets()
    assert {"prose", "code", "reasoning", "reasoning_zh", "literature", "pydoc", "stdlib_code", "poetry_zh"} <= set(sets)
    from dsq.dsquant.texts import eval_texts

    held_out = eval_texts()
    shipped = {p.name for p in data.DATA_DIR.iterdir() if p.suffix in (".txt", ".jsonl", ".gz")}
    listed = {s.file.name for s in sets.values()} | {p.name for p in held_out.values()}
    assert shipped == listed, "every shipped text is in the manifest and vice versa"
    assert not set(held_out) & set(sets), "held-out eval text is never a calibration set"
    for s in sets.values():
        assert s.licence and s.source and s.description
        assert s.file.is_file() and s.nbytes > 1000
        assert s.text()  # readable, gzipped or not
    assert sum(s.nbytes for s in sets.values()) < 1_000_000  # what the wheel carries, compressed
    assert set(data.mixes()["mixed"]) == set(sets)  # the default uses every shipped set
    rows = {r["name"]: r for r in data.list_sets()}
    assert rows["mixed"]["bytes"] == sum(rows[p]["bytes"] for p in data.mixes()["mixed"])
    assert rows["reasoning"]["documents"] == len(sets["reasoning"].text().splitlines()) == 510


def _make_reasoning():
    sys.path.insert(0, str(data.DATA_DIR))
    try:
        import make_reasoning
    finally:
        sys.path.pop(0)
    return make_reasoning


def test_reasoning_sets_regenerate_byte_for_byte():
    mr = _make_reasoning()
    for name in ("reasoning.jsonl.gz", "reasoning_zh.jsonl.gz"):
        assert mr.build(name) == (data.DATA_DIR / name).read_bytes(), name
    first = json.loads(gzip.decompress(mr.build("reasoning_zh.jsonl.gz")).decode().splitlines()[0])
    assert first["messages"][1]["content"].startswith("<think>") and "元" in first["messages"][1]["content"]


@pytest.mark.parametrize("name", ["reasoning", "reasoning_zh"])
def test_reasoning_arithmetic_is_exact(name):
    """Every integer product, sum and difference written in a working is true (``a x b = c``, ``a × b = c``,
    ``a + b = c``, ``a - b = c``), so calibration never shows the model wrong arithmetic."""
    text = data.shipped_sets()[name].text()
    num = r"(-?\d+)"
    alone = r"(?<![-+x×*/^(] )(?<![-\d./^(])"  # not the tail of a longer expression
    checked = 0
    for op, f in (("[x×]", lambda a, b: a * b), (r"\+", lambda a, b: a + b), ("-", lambda a, b: a - b)):
        for a, b, c in re.findall(alone + num + rf" {op} {num} = {num}(?![\d./)]| [-+x×*/])", text):
            assert f(int(a), int(b)) == int(c), (a, op, b, c)
            checked += 1
    assert checked > 150


def _smollm2_tokenizer(tmp_path_factory):
    from dsq.dsquant import default_model as dm

    cached = dm.default_cache_dir() / "default-model" / dm.MODEL_NAME
    path = cached if (cached / dm.PROVENANCE).is_file() else dm.ensure_default_model(tmp_path_factory.mktemp("dm"))
    return data.load_tokenizer(path)


def test_default_mix_has_over_250k_unique_tokens_and_draws_128x512_without_repeats(tmp_path_factory):
    """Issue 16 item 6: the default ``--calib mixed`` holds >= 250k tokens (SmolLM2's tokenizer, chats
    rendered through its chat template), English and Chinese, so 128 windows of 512 never share a token."""
    tok = _smollm2_tokenizer(tmp_path_factory)
    batch = data.calibration_batch("mixed", tok, 128, 512, seed=0)
    d = batch.describe()
    assert d["unique_tokens"] >= 250_000 and d["unique_tokens"] > 3 * 128 * 512
    assert min(d["streams"].values()) > 1000
    chinese = d["streams"]["poetry_zh"] + d["streams"]["reasoning_zh"]
    assert chinese > 0.15 * d["unique_tokens"]
    texts = tok.batch_decode(batch.ids)
    assert any("<think>" in t for t in texts) and any("def " in t for t in texts)
    assert any(re.search(r"[\u4e00-\u9fff]{8}", t) for t in texts)  # some windows are Chinese
    # no window repeats: the same draw over streams of positions (sampling sees only lengths and the seed)
    # takes every position at most once, and the batch is the token at each drawn position
    lengths, base, pos_streams = list(d["streams"].values()), 0, []
    for n in lengths:
        pos_streams.append(list(range(base, base + n)))
        base += n
    pos = data.sample_windows(pos_streams, 128, 512, seed=0).flatten().tolist()
    assert len(set(pos)) == len(pos)
    parts = data.source_files("mixed")
    flat = [t for path_kind in parts for t in data._cached_stream(path_kind[1], path_kind[2], tok, data._tokenizer_key(tok))]
    assert [flat[p] for p in pos] == batch.ids.flatten().tolist()


def _grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _cjk_grams(text: str, n: int = 12) -> set[str]:
    chars = "".join(re.findall(r"[\u4e00-\u9fff]", text))
    return {chars[i : i + n] for i in range(len(chars) - n + 1)}


def test_evaluation_texts_are_disjoint_from_calibration():
    """No 8-word run (nor 12-character run of Chinese) of an evaluation text occurs in any calibration set:
    the shipped held-out text, and the benchmark's Jane Austen text when this machine has it."""
    calib = [s.text() for s in data.shipped_sets().values()]
    words = set().union(*map(_grams, calib))
    chars = set().union(*map(_cjk_grams, calib))
    assert len(chars) > 20_000
    evals = [data.DATA_DIR / "heldout.txt"]
    austen = Path("~/.cache/dsq-bench/eval_austen.txt").expanduser()
    evals += [austen] if austen.is_file() else []
    for path in evals:
        text = path.read_text(encoding="utf-8")
        held = _grams(text)
        assert len(held) > 2000 and not held & words, path
        assert not _cjk_grams(text) & chars, path


class ToyTokenizer:
    """Characters as tokens: enough to check sampling without a model."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False, verbose=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) % 500 + 1 for c in text]}


def test_sampling_is_seeded_and_windows_come_from_the_stream():
    streams = [list(range(1, 50)), list(range(100, 400))]
    a = data.sample_windows(streams, 6, 16, seed=3)
    b = data.sample_windows(streams, 6, 16, seed=3)
    c = data.sample_windows(streams, 6, 16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a.tolist():
        s = streams[0] if row[0] < 100 else streams[1]
        i = s.index(row[0])
        assert row == [s[(i + j) % len(s)] for j in range(16)]  # a (cyclic) window of its source


def test_windows_are_drawn_without_replacement_across_sources(caplog):
    """Token ids are unique positions here, so any overlap between two samples would repeat an id."""
    streams = [list(range(0, 5000)), list(range(10_000, 10_700)), list(range(20_000, 20_100))]
    with caplog.at_level(logging.WARNING, logger="dsq.calib"):
        ids = data.sample_windows(streams, 80, 64, seed=0)  # 78 + 10 + 1 windows exist
    flat = ids.flatten().tolist()
    assert len(set(flat)) == len(flat) and not caplog.records
    per_source = [sum(1 for row in ids.tolist() if lo <= row[0] < lo + 10_000) for lo in (0, 10_000, 20_000)]
    assert per_source[0] > per_source[1] >= 1  # shares follow the sources' sizes
    every = data.sample_windows(streams, 89, 64, seed=0)  # all of them: each source's windows exactly once
    assert len(set(every.flatten().tolist())) == 89 * 64


def test_more_samples_than_text_warns_once_and_still_fills_the_batch(caplog):
    streams = [list(range(1, 300))]
    with caplog.at_level(logging.WARNING, logger="dsq.calib"):
        ids = data.sample_windows(streams, 10, 64, seed=1, source="--calib small.txt")
    assert ids.shape == (10, 64)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "\n" not in msg and "--calib small.txt" in msg and "299 unique tokens" in msg and "repeat" in msg
    for row in ids.tolist():  # still windows of the stream, just overlapping ones
        i = row[0] - 1
        assert row == [streams[0][(i + j) % 299] for j in range(64)]


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
    gz = tmp_path / "mine.txt.gz"
    gz.write_bytes(gzip.compress(txt.read_bytes()))
    assert torch.equal(data.calibration_batch(str(gz), tok, 4, 8, seed=0).ids, b1.ids)  # gzip read transparently
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(InputError, match="bad.jsonl.gz: not a readable gzip file"):
        data.resolve_source(str(bad))
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
    assert batch.ids.shape == (6, 32) and set(batch.describe()["streams"]) == set(data.mixes()["mixed"])
    assert int(batch.ids.max()) < 320


def test_cli_calib_list_json():
    from typer.testing import CliRunner

    from dsq.cli import app

    res = CliRunner().invoke(app, ["calib", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) == {*data.shipped_sets(), "mixed"}
    assert all(r["licence"] for r in rows.values())
    assert rows["prose"]["sha256"] == data.shipped_sets()["prose"].sha256
