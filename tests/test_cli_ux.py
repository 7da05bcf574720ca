"""The commands behave like the field's tools: readable off a terminal, progress in CI logs, honest verdicts."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsq.cli import _gguf_types_help, app

runner = CliRunner()
TEXT = Path(__file__).parent / "data" / "tiny_corpus.txt"
FAST = ["--ctx", "48", "--chunks", "2", "--threads", "2"]


# -- eval: no threshold, no verdict ---------------------------------------------------------------------
def test_eval_without_thresholds_gives_no_verdict(model_dir, quantized_dir, tmp_path):
    ref, q4 = model_dir("qwen2"), quantized_dir("qwen2", "int4")
    js, page = tmp_path / "r.json", tmp_path / "r.html"
    res = runner.invoke(app, ["eval", str(q4), "--ref", str(ref), "--text", str(TEXT), *FAST,
                              "--cache-dir", str(tmp_path / "c"), "--json", str(js), "--html", str(page)])
    assert res.exit_code == 0, res.output
    assert "PASS" not in res.output and "FAIL" not in res.output
    assert "no thresholds given" in res.output
    rep = json.loads(js.read_text())
    assert rep["passed"] is None and rep["results"][1]["passed"] is None and rep["results"][1]["verdict"] == "-"
    html = page.read_text()
    assert ">PASS<" not in html and "no thresholds given" in html
    assert str(tmp_path) not in html and "cache_dir" not in html  # no raw settings dict or absolute paths

    res = runner.invoke(app, ["eval", str(q4), "--ref", str(ref), "--text", str(TEXT), *FAST,
                              "--cache-dir", str(tmp_path / "c"), "--max-kld", "10", "--json", str(js)])
    assert res.exit_code == 0 and "PASS" in res.output and "--max-kld 10" in res.output
    assert json.loads(js.read_text())["results"][1]["verdict"] == "PASS"


def test_eval_text_takes_shipped_names(model_dir, tmp_path):
    from dsq.dsquant.texts import DEFAULT_EVAL_TEXT, resolve_text, text_names

    assert DEFAULT_EVAL_TEXT in text_names() and resolve_text("prose").name == "prose.txt"
    ref = str(model_dir("qwen2"))
    res = runner.invoke(app, ["eval", ref, "--ref", ref, *FAST, "--cache-dir", str(tmp_path)])  # --text heldout
    assert res.exit_code == 0, res.output
    assert "heldout.txt" in res.output
    res = runner.invoke(app, ["eval", ref, "--ref", ref, "--text", "no-such-set", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2 and "heldout" in res.output and "no such file" in res.output


def test_heldout_text_shares_no_8_word_run_with_calibration_sets():
    from dsq.dsquant.calib.data import shipped_sets
    from dsq.dsquant.texts import eval_texts

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + 8]) for i in range(len(words) - 7)}

    calib = set().union(*(grams(s.file.read_text()) for s in shipped_sets().values()))
    for name, path in eval_texts().items():
        held = grams(path.read_text())
        assert len(held) > 2000, name  # enough for the default 16 chunks
        assert not held & calib, f"{name} overlaps calibration text"


# -- output off a terminal ------------------------------------------------------------------------------
def test_plan_off_terminal_is_not_wrapped_and_sorts_layers_numerically(model_dir):
    res = runner.invoke(app, ["plan", str(model_dir("qwen2")), "--recipe", "int4"])
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.output.splitlines() if "model.layers." in ln]
    plan = json.loads(runner.invoke(app, ["plan", str(model_dir("qwen2")), "--json"]).output)
    names = [t["name"] for t in plan["tensors"] if t["name"].startswith("model.layers.")]
    assert len(rows) == len(names)  # one line per tensor: nothing folded onto a second line
    assert all("int4_sym_g32" in ln or "keep" in ln for ln in rows)  # formats are not truncated
    layers = [int(re.search(r"model\.layers\.(\d+)\.", ln).group(1)) for ln in rows]
    assert layers == sorted(layers)


def test_rich_markup_in_data_is_printed_verbatim(monkeypatch):
    from dsq.runtimes import console

    rows = [{"runtime": "llama-cpp", "from": "dsq", "reads": ".gguf", "ok": False, "devices": [], "version": None,
             "why_not": "llama_cpp not installed: pip install 'dsq[llama-cpp]'", "other_devices": ""}]
    monkeypatch.setattr(console, "runtime_rows", lambda: rows)
    res = runner.invoke(app, ["runtimes"])
    assert res.exit_code == 0 and "pip install 'dsq[llama-cpp]'" in res.output, res.output
    res = runner.invoke(app, ["runtimes", "--json"])
    assert json.loads(res.output)[0]["why_not"].endswith("'dsq[llama-cpp]'")


# -- progress -------------------------------------------------------------------------------------------
def test_progress_prints_plain_lines_off_terminal():
    from dsq.dsquant.progress import Reporter

    out = io.StringIO()
    r = Reporter("calibrate (gptq)", "layers", stream=out, interval=0, tty=False)
    for i in range(5):
        r.update(i, 4, f"layer {i}")
    r.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("calibrate (gptq): 0/4 layers (0%) elapsed 0:00")
    assert "4/4 layers (100%)" in lines[-1]
    assert any("ETA" in ln for ln in lines[1:-1])

    out = io.StringIO()
    r = Reporter("quick", "tensors", stream=out, interval=3600, tty=False)
    for i in range(1, 101):
        r.update(i, 100, "")
    r.close()
    assert out.getvalue() == ""  # a job shorter than one interval prints only its result


def test_calibration_progress_shows_layers_tokens_and_eta(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DSQ_PROGRESS_SECONDS", "0")
    res = runner.invoke(app, ["quantize", str(model_dir("llama")), "-o", str(tmp_path / "q"), "--method", "gptq",
                              "--samples", "4", "--seqlen", "32", "--calib", str(TEXT)])
    assert res.exit_code == 0, res.output
    calib = [ln for ln in res.output.splitlines() if ln.startswith("calibrate (gptq):")]
    assert calib and "0/2 layers" in calib[0] and "128 tokens" in calib[0]
    assert "2/2 layers (100%)" in calib[-1]
    assert any("ETA" in ln and "1/2 layers" in ln for ln in calib)
    assert any(ln.startswith("quantize → ") and "tensors (100%)" in ln for ln in res.output.splitlines())


# -- export and inspect ---------------------------------------------------------------------------------
def test_export_prints_a_summary_and_defaults_beside_the_input(quantized_dir, tmp_path):
    import shutil

    src = tmp_path / "llama-int4"
    shutil.copytree(quantized_dir("llama", "int4"), src)
    res = runner.invoke(app, ["export", str(src), "--to", "gguf"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "llama-int4.gguf"
    assert out.is_file()
    assert f"wrote {out}" in res.output.replace("\n", "")
    assert "carried dsq's quantized values exactly" in res.output and "kept F32" in res.output
    assert not res.output.lstrip().startswith("{")  # a human summary, not raw JSON
    res = runner.invoke(app, ["export", str(src), "--to", "gguf", "--overwrite", "--json"])
    assert json.loads(res.output[res.output.index("{"):])["output"] == str(out)


def test_inspect_reads_what_export_to_onnx_writes(quantized_dir, tmp_path):
    pytest.importorskip("onnx")
    onnx_dir = tmp_path / "m-onnx"
    res = runner.invoke(app, ["export", str(quantized_dir("qwen2", "int4")), "--to", "onnx", "-o", str(onnx_dir)])
    assert res.exit_code == 0, res.output
    assert "kept float32: embedding" in res.output  # what stayed float, and why, with the size
    res = runner.invoke(app, ["inspect", str(onnx_dir), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["kind"] == "onnx" and d["architecture"] == "qwen2"
    assert "MatMulNBits" in " ".join(d["facts"]["ops"]) and "genai_config.json" in d["facts"]["files"]
    assert any(t["type"] == "UINT8" for t in d["tensors"])


# -- help -----------------------------------------------------------------------------------------------
def test_help_shows_no_bool_metavar_and_names_default_and_every_gguf_type():
    from dsq.export.gguf_policy import MIXES
    from dsq.export.gguf_quants import GGUF_TYPES
    from dsq.export.gguf_writer import TYPE_NAMES

    listed = [t.strip() for t in _gguf_types_help().split("),", 1)[1].split(",")]
    assert listed == list(TYPE_NAMES) and set(MIXES) < set(listed)
    assert listed[:6] == ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k"]  # llama-quantize's order
    assert listed.index("q4_k") == listed.index("q4_k_s") - 1 and listed[-3:] == ["f16", "bf16", "f32"]
    assert set(GGUF_TYPES) <= set(listed)  # every tensor type dsq writes is also a --type
    for cmd in ("quantize", "plan", "export", "eval", "run", "chat", "bench", "inspect", "runtimes"):
        res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.output, cmd
    assert "`default`" in runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"}).output
    assert "`default`" in runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output


def test_help_lists_are_the_registries():
    """Help texts that name choices (written out so `dsq --help` imports neither torch nor onnx) list exactly
    the registry's entries: adding a preset, method, EP, int4 format or attention choice fails here until
    the help names it."""
    import typer.main

    from dsq.dsquant.calib.methods import METHODS
    from dsq.dsquant.recipes import PRESETS
    from dsq.export.onnx_export import EP_NBITS, INT4_BLOCKS
    from dsq.export.onnx_graph import ATTENTION_IMPLS

    cmd = typer.main.get_command(app)
    helps = {(c, p.name): p.help for c in ("quantize", "export") for p in cmd.commands[c].params}
    registries = {
        ("quantize", "recipe"): PRESETS,
        ("quantize", "method"): METHODS,
        ("export", "ep"): EP_NBITS,
        ("export", "int4_block"): [str(b) for b in INT4_BLOCKS],
        ("export", "attention"): {choice for _, choice in ATTENTION_IMPLS},
    }
    for key, names in registries.items():
        missing = [n for n in names if not re.search(rf"\b{n}\b", helps[key])]
        assert not missing, f"dsq {key[0]} --{key[1]} help does not name {missing}"


def test_every_option_has_help():
    import typer.main

    cmd = typer.main.get_command(app)
    for name, sub in cmd.commands.items():
        for p in getattr(sub, "commands", {sub.name: sub}).values():
            for param in p.params:
                if param.param_type_name == "option" and param.name != "help":
                    assert param.help, f"dsq {name} --{param.name} has no help text"


# -- chat -----------------------------------------------------------------------------------------------
class _FakeRuntime:
    description = "fake"
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    special_tokens: dict = {}

    def __init__(self):
        self.prompts: list[str] = []

    def encode_prompt(self, text):
        self.prompts.append(text)
        return [1]

    def generate(self, ids, max_tokens, sampling):
        yield "Hello"
        if "stop me" in self.prompts[-1]:
            raise KeyboardInterrupt  # the user's Ctrl-C while the reply streams
        yield " there"

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_chat_ctrl_c_stops_the_reply_and_reset_confirms(monkeypatch):
    from rich.console import Console

    from dsq.runtimes import console as con
    from dsq.runtimes import registry
    from dsq.runtimes.base import Sampling

    rt = _FakeRuntime()
    monkeypatch.setattr(registry, "load", lambda *a, **k: rt)
    turns = iter(["first", "stop me", "second", "/reset", "third"])

    def read():
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    buf = io.StringIO()
    con.chat_loop(Path("m"), "auto", "cpu", 8, Sampling(0, 0, 1, 0), False, None, None, read=read,
                  console=Console(file=buf, width=200))
    out = buf.getvalue()
    assert "reply stopped" in out and "history cleared (2 turns)" in out
    # the interrupted turn is not in the history: the next prompt has first + second only
    assert "stop me" not in rt.prompts[2] and "first" in rt.prompts[2]
    assert rt.prompts[3] == "<user>third<assistant>"
