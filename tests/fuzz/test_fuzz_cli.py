"""Issue 13: hostile and broken inputs through the ``dsq`` CLI, each a clear refusal.

Every case asserts: exit 2 (130 for Ctrl-C), one ``error:`` line naming the file, key or flag, no
traceback, nothing written to the output, and a time limit. Inputs come from ``hostile.py`` (built
in tmp dirs). Cases that could hang or abort the interpreter if dsq regressed (named pipes, template
bombs, GGUFs llama.cpp asserts on, signals) run the CLI in a subprocess with a timeout; the rest use
typer's CliRunner in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hostile
import pytest
import torch
from hostile import SECRET
from typer.testing import CliRunner

from dsq.cli import app

runner = CliRunner()
LIMIT_S = 20  # per case; real refusals take well under a second after imports
PYTHONPATH = os.pathsep.join([str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH", "")])


def dsq(*args):
    t0 = time.monotonic()
    result = runner.invoke(app, [str(a) for a in args])
    result.seconds = time.monotonic() - t0
    return result


def dsq_proc(*args, timeout=90, env=None):
    """The CLI in a subprocess (a regression that hangs or aborts fails the test, not the suite)."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dsq.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})
    p.seconds = time.monotonic() - t0
    return p


def assert_refused(output: str, code: int, seconds: float, *needles: str, out: Path | None = None, limit=LIMIT_S):
    assert code == 2, output
    assert "Traceback" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    for n in needles:
        assert n in errors[0], (n, output)
    assert SECRET not in output
    assert seconds < limit, f"took {seconds:.1f}s"
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not [p for p in out.parent.iterdir() if ".partial" in p.name], list(out.parent.iterdir())


def refused(result, *needles, out=None):
    assert_refused(result.output, result.exit_code, result.seconds, *needles, out=out)


def refused_proc(p, *needles, out=None, limit=LIMIT_S + 40):
    # + subprocess start (imports torch: ~3 s alone, 15-30 s on a 2-core machine shared with other jobs)
    assert_refused(p.stdout + p.stderr, p.returncode, p.seconds, *needles, out=out, limit=limit)


@pytest.fixture
def m(model_dir, tmp_path):
    """A private copy of the tiny llama checkpoint (sharded, with index and tokenizer)."""
    return hostile.copy_model(model_dir("llama"), tmp_path / "m")


def no_secret_in(folder: Path) -> bool:
    return not any(SECRET.encode() in f.read_bytes() for f in folder.rglob("*") if f.is_file())


# -- kind 1: reads outside the model folder ---------------------------------------------------------------
@pytest.mark.parametrize("side", ["chat_template.jinja", "special_tokens_map.json", "generation_config.json",
                                  "tokenizer_config.json"])
def test_side_file_linked_outside_is_not_copied_by_quantize(m, tmp_path, side):
    hostile.link_side_file(m, side, hostile.secret_file(tmp_path))
    out = tmp_path / "q"
    refused(dsq("quantize", m, "-o", out), side, "outside the model directory", out=out)


def test_side_file_linked_outside_is_not_copied_by_onnx_export(m, tmp_path):
    pytest.importorskip("onnx")
    hostile.link_side_file(m, "chat_template.jinja", hostile.secret_file(tmp_path))
    out = tmp_path / "onnx"
    refused(dsq("export", m, "--to", "onnx", "-o", out), "chat_template.jinja", "outside", out=out)


@pytest.mark.parametrize("shard", ["../../outside/secret.txt", "/etc/passwd", "link.safetensors"])
def test_index_shard_outside_is_refused(m, tmp_path, shard):
    hostile.secret_file(tmp_path)
    (m / "link.safetensors").symlink_to(tmp_path / "outside" / "secret.txt")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(dsq("plan", m), "outside the model directory")


def test_config_linked_outside_is_refused(m, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text((m / "config.json").read_text())
    hostile.link_side_file(m, "config.json", outside)
    refused(dsq("plan", m), "config.json", "outside the model directory")


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "link.bin", "sub/../../secret.bin"])
def test_onnx_external_data_outside_is_refused_by_run(tmp_path, location):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "onnx"
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    hostile.onnx_with_external_data(folder, location)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    refused(dsq("run", folder, "-p", "hi", "--runtime", "onnxruntime"), "model.onnx", "outside the folder")


@pytest.mark.parametrize("location", ["../secret.bin", "link.bin"])
def test_onnx_external_data_outside_is_refused_by_inspect_and_genai_check(tmp_path, location):
    """The guard runs on every ONNX load, not only onnxruntime's: `dsq inspect` of the folder and of the file,
    and the onnxruntime-genai side of `dsq check` (which loads the decoder genai_config.json names)."""
    from dsq.dsquant.errors import CorruptFileError, InputError
    from dsq.export.onnx_guard import check_genai_dir

    folder = tmp_path / "onnx"
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    hostile.onnx_with_external_data(folder, location)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    refused(dsq("inspect", folder), "model.onnx", "outside the folder")
    refused(dsq("inspect", folder / "model.onnx"), "model.onnx", "outside the folder")
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    with pytest.raises(CorruptFileError, match="outside the folder"):
        check_genai_dir(folder)
    (tmp_path / "evil.onnx").write_bytes((folder / "model.onnx").read_bytes())
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "../evil.onnx"}}}))
    with pytest.raises(InputError, match="outside the model directory|not a file inside"):
        check_genai_dir(folder)


def test_hub_cache_snapshot_layout_is_accepted(model_dir, tmp_path):
    """Every file of a hub snapshot is a link to ../../blobs/HASH: valid, and the common case."""
    snap = hostile.hub_cache_layout(model_dir("llama"), tmp_path / "hub")
    (snap.parent.parent / "blobs" / "extra").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (snap / "chat_template.jinja").symlink_to(Path("..") / ".." / "blobs" / "extra")
    p = dsq("plan", snap, "--summary")
    assert p.exit_code == 0, p.output
    out = tmp_path / "q"
    q = dsq("quantize", snap, "-o", out)
    assert q.exit_code == 0, q.output
    copied = out / "chat_template.jinja"
    assert copied.is_file() and not copied.is_symlink() and "m.content" in copied.read_text()


def test_hub_cache_link_into_another_repo_is_refused(model_dir, tmp_path):
    snap = hostile.hub_cache_layout(model_dir("llama"), tmp_path / "hub")
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "t").write_text(SECRET)
    (snap / "chat_template.jinja").symlink_to(Path("..") / ".." / ".." / "models--evil--x" / "blobs" / "t")
    out = tmp_path / "q"
    refused(dsq("quantize", snap, "-o", out), "chat_template.jinja", "outside", out=out)


# -- kind 2: hyperparameters that crash native code or grow memory ----------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(model_dir, tmp_path_factory):
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    r = runner.invoke(app, ["export", str(model_dir("llama")), "--to", "gguf", "-o", str(out), "--type", "q8_0"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("key,value,needle", [
    ("llama.block_count", 3, "block_count"),  # the tensors have 2 blocks
    ("llama.attention.head_count", 0, "head_count"),
    ("llama.embedding_length", 0, "embedding_length"),
])
def test_gguf_hyperparameters_are_checked_before_llama_cpp(tiny_gguf, tmp_path, key, value, needle):
    pytest.importorskip("llama_cpp")
    bad = hostile.patch_gguf_u32(tiny_gguf, tmp_path / "bad.gguf", key, value)
    refused(dsq("run", bad, "-p", "hi", "--runtime", "llama-cpp", "-n", "1"), "bad.gguf", needle)


def test_gguf_chat_template_syntax_error_is_one_line(tiny_gguf, tmp_path):
    """llama-cpp-python compiles the GGUF's template on load; its TemplateSyntaxError used to escape."""
    pytest.importorskip("llama_cpp")
    bad = hostile.patch_bytes(tiny_gguf, tmp_path / "bad.gguf", b"{% endfor %}", b"{% endfxr %}")
    refused(dsq("run", bad, "-p", "hi", "--runtime", "llama-cpp", "-n", "1"), "bad.gguf", "chat_template")


def test_gguf_absurd_block_count_does_not_abort(tiny_gguf, tmp_path):
    """llama.cpp GGML_ASSERTs (SIGABRT) on this one: a subprocess, so a regression cannot take pytest down."""
    pytest.importorskip("llama_cpp")
    bad = hostile.patch_gguf_u32(tiny_gguf, tmp_path / "bad.gguf", "llama.block_count", 100000)
    refused_proc(dsq_proc("run", bad, "-p", "hi", "--runtime", "llama-cpp", "-n", "1"), "bad.gguf", "block_count")


@pytest.mark.parametrize("value", [1e9, 1000000000, 0, -1, "2"])
def test_absurd_layer_count_is_refused_before_onnx_export(m, tmp_path, value):
    pytest.importorskip("onnx")
    hostile.edit_json(m / "config.json", num_hidden_layers=value)
    out = tmp_path / "onnx"
    refused(dsq("export", m, "--to", "onnx", "-o", out), "config.json", "num_hidden_layers", out=out)


# -- kind 3: hangs ------------------------------------------------------------------------------------------
def test_named_pipe_weights_do_not_hang(model_dir, tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (m / f).write_bytes((model_dir("llama") / f).read_bytes())
    os.mkfifo(m / "model.safetensors")
    hostile.unblock_fifo_after(m / "model.safetensors", LIMIT_S + 5)
    refused(dsq("plan", m), "model.safetensors", "named pipe")


def test_named_pipe_side_file_does_not_hang(m, tmp_path):
    os.mkfifo(m / "chat_template.jinja")
    hostile.unblock_fifo_after(m / "chat_template.jinja", LIMIT_S + 5)
    out = tmp_path / "q"
    refused(dsq("quantize", m, "-o", out), "chat_template.jinja", "named pipe", out=out)


@pytest.mark.parametrize("pattern", ["re:^([a-z0-9_.]*)*Q$", "re:^(a+)+$", "re:(x+x+)+y", "re:^(\\w+\\s?)*$"])
def test_backtracking_recipe_regex_is_bounded(m, tmp_path, pattern):
    rec = tmp_path / "r.toml"
    rec.write_text(f'base = "int4"\n[[override]]\npattern = {json.dumps(pattern)}\nformat = "keep"\n')
    r = dsq("plan", m, "--recipe", rec, "--summary")
    assert r.seconds < LIMIT_S and "Traceback" not in r.output and r.exit_code in (0, 2), r.output


BOMBS = {
    "power": "{{ 10 ** (10 ** 9) }}",
    "nested_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "repeat": "{{ 'x' * 10000000000 }}",
    "width": "{{ '%999999999d' % 1 }}",
    "doubling": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "syntax": "{% for m in messages %}",
    "overflow": "{{ 1.5 ** 100000 }}",
}


@pytest.mark.parametrize("bomb", ["power", "nested_ranges", "repeat"])
def test_template_bomb_in_calibration_jsonl_is_bounded(m, tmp_path, bomb, monkeypatch):
    """A .jsonl calibration file is rendered through the model's chat template (tokenizer_config)."""
    hostile.edit_json(m / "tokenizer_config.json", chat_template=BOMBS[bomb])
    calib = tmp_path / "c.jsonl"
    calib.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "q"
    args = ("quantize", m, "-o", out, "--method", "gptq", "--calib", calib, "--samples", "1", "--seqlen", "16")
    if bomb == "nested_ranges":  # the time bound itself, in a process of its own
        refused_proc(dsq_proc(*args, env={"DSQ_TEMPLATE_SECONDS": "3"}), "chat template", "longer than", out=out)
    else:
        refused(dsq(*args), "chat template", out=out)


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_template_bombs_are_one_error_line(bomb, monkeypatch):
    """Every bomb, through the renderer chat/run/eval/calibration share, within the time limit."""
    from dsq.dsquant.errors import InputError

    monkeypatch.setenv("DSQ_TEMPLATE_SECONDS", "2")
    from dsq.runtimes.chat import render_chat

    t0 = time.monotonic()
    with pytest.raises(InputError, match="chat template") as e:
        render_chat(BOMBS[bomb], [{"role": "user", "content": "hi"}], {})
    assert time.monotonic() - t0 < LIMIT_S and "\n" not in str(e.value)


def test_template_bomb_in_dsq_run_is_bounded(m):
    (m / "chat_template.jinja").write_text(BOMBS["nested_ranges"])
    p = dsq_proc("run", m, "-p", "hi", "--runtime", "torch", "-n", "1", env={"DSQ_TEMPLATE_SECONDS": "3"})
    refused_proc(p, "chat template", "longer than")


# -- kind 4: wrong JSON/TOML types, deep nesting, bad UTF-8 -------------------------------------------------
def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header,needle", [
    ({"w": _entry(dtype=["F32"])}, "dtype"),
    ({"w": _entry(shape="2")}, "shape"),
    ({"w": _entry(shape=[2.0])}, "shape"),
    ({"w": _entry(offsets=[0, 8, 9])}, "data_offsets"),
    ({"w": _entry(), "__metadata__": ["x"]}, "__metadata__"),
    ({"w": _entry(), "__metadata__": {"format": 1}}, "__metadata__"),
    ({"w": [1, 2]}, "`w`"),
])
def test_ill_typed_safetensors_header(model_dir, tmp_path, header, needle):
    m = hostile.single_shard_model(model_dir("llama"), tmp_path / "m", header, b"\0" * 8)
    refused(dsq("plan", m), "model.safetensors", needle)
    refused(dsq("inspect", m), "model.safetensors", needle)


@pytest.mark.parametrize("weight_map", [["a"], {"model.embed_tokens.weight": 3}, "x", None])
def test_ill_typed_index(m, weight_map):
    hostile.edit_json(m / "model.safetensors.index.json", weight_map=weight_map)
    refused(dsq("plan", m), "model.safetensors.index.json", "weight_map")


@pytest.mark.parametrize("changes,needle", [
    ({"hidden_size": "abc"}, "hidden_size"),
    ({"model_type": ["llama"]}, "model_type"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 0]}}, "weight_block_size"),
    ({"quantization_config": ["fp8"]}, "quantization_config"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
])
def test_ill_typed_config(m, tmp_path, changes, needle):
    hostile.edit_json(m / "config.json", **changes)
    refused(dsq("plan", m), "config.json", needle)
    out = tmp_path / "q"
    refused(dsq("quantize", m, "-o", out), "config.json", needle, out=out)


@pytest.mark.parametrize("content,needle", [
    (hostile.deep_json(100_000), "nested"),
    (hostile.deep_json(500), "nested"),
    (b'{"model_type": "llama\xff\xfe"}', "UTF-8"),
    ('{"model_type": "llama", "hidden_size": NaN}', "NaN"),
    ('{"model_type": "llama", "hidden_size": 1' + "0" * 5000 + "}", "JSON"),
    ("[1, 2]", "object"),
])
def test_broken_config_json(m, content, needle):
    (m / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(dsq("plan", m), "config.json", needle)


@pytest.mark.parametrize("toml,needle", [
    ('base = ["int4"]\n', "base"),
    ('default = 4\n', "default"),
    ('base = "int4"\nroles = "int8_g32"\n', "roles"),
    ('base = "int4"\n[roles]\nattn_q = ["int8_g32"]\n', "roles.attn_q"),
    ('base = "int4"\n[[override]]\npattern = ["a"]\nformat = "keep"\n', "pattern"),
    ('base = "int4"\noverride = "x"\n', "override"),
    (hostile.deep_toml(100_000), "nested"),
    (hostile.deep_toml(200), "nested"),
    (b'base = "int4\xff"\n', "TOML"),
])
def test_ill_typed_recipe(m, tmp_path, toml, needle):
    rec = tmp_path / "r.toml"
    rec.write_bytes(toml if isinstance(toml, bytes) else toml.encode())
    refused(dsq("plan", m, "--recipe", rec), "r.toml", needle)


def test_seqlen_bounded_by_max_position_embeddings(m, tmp_path):
    out = tmp_path / "q"
    refused(dsq("quantize", m, "-o", out, "--method", "gptq", "--seqlen", "10000000", "--samples", "1"),
            "--seqlen", "max_position_embeddings", out=out)


# -- the CLI's last line of defence -----------------------------------------------------------------------
def test_unexpected_exception_is_one_line_and_debug_shows_it(m, monkeypatch):
    import dsq.dsquant.plan as plan_mod

    def boom(*a, **k):
        raise ValueError("something dsq did not foresee")

    monkeypatch.setattr(plan_mod, "make_plan", boom)
    refused(dsq("plan", m), "ValueError", "something dsq did not foresee", str(m))
    r = dsq("--debug", "plan", m)
    assert isinstance(r.exception, ValueError)
    monkeypatch.setenv("DSQ_DEBUG", "1")
    assert isinstance(dsq("plan", m).exception, ValueError)


# -- kind 6: the eval reference cache sees every byte -------------------------------------------------------
def test_reference_fingerprint_covers_the_whole_file(tmp_path):
    from dsq.runtimes.eval.evaluate import model_fingerprint

    ref = tmp_path / "ref"
    ref.mkdir()
    w = ref / "model.safetensors"
    w.write_bytes(os.urandom(6 << 20))
    cache = tmp_path / "cache"
    before = model_fingerprint(ref, cache)
    assert model_fingerprint(ref, cache) == before and (cache / "file-digests.json").is_file()
    data = bytearray(w.read_bytes())
    data[(1 << 20) + 12345] ^= 0xFF  # outside the first, middle and last MiB the old key sampled
    st = w.stat()
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the ctime still changes
    assert model_fingerprint(ref, cache) != before


# -- kind 7: interruptions ----------------------------------------------------------------------------------
def test_rerun_removes_partials_of_a_killed_run_and_says_so(m, tmp_path):
    out = tmp_path / "q"
    stale = tmp_path / f".q.{hostile.dead_pid()}.abc_1234.partial"
    legacy = tmp_path / ".q.abcd1234.partial"
    live = tmp_path / f".q.{os.getpid()}.zzz_9999.partial"  # a running process's: must be kept
    for d in (stale, legacy, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    r = dsq("quantize", m, "-o", out)
    assert r.exit_code == 0, r.output
    assert not stale.exists() and not legacy.exists() and live.exists()
    assert f"removed {stale}" in r.output and f"removed {legacy}" in r.output


def _small_disk():
    """In the child: writes past 256 KiB fail with EFBIG, as a full disk fails them with ENOSPC."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.parametrize("command", [("quantize",), ("export", "--to", "gguf", "--type", "q8_0"),
                                     ("export", "--to", "onnx")])
def test_full_disk_is_one_line_and_leaves_nothing(m, tmp_path, command):
    if command[-1] == "onnx":
        pytest.importorskip("onnx")
    out = tmp_path / ("out.gguf" if "gguf" in command else "out")
    args = [sys.executable, "-m", "dsq.cli", command[0], str(m), *command[1:], "-o", str(out)]
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=_small_disk,
                       env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert_refused(p.stdout + p.stderr, p.returncode, time.monotonic() - t0, out.name, "disk full", out=out,
                   limit=LIMIT_S + 40)


def test_keyboard_interrupt_names_the_output(m, tmp_path, monkeypatch):
    import dsq.dsquant.quantize as q

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "quantize_checkpoint", interrupted)
    out = tmp_path / "q"
    r = dsq("quantize", m, "-o", out)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"interrupted; nothing written to {out}"


def test_ctrl_c_on_a_running_quantize(m, tmp_path):
    """A real SIGINT to a running `dsq quantize --method gptq`: exit 130, the message, no output, no partial."""
    out = tmp_path / "q"
    # progress lines at once (DSQ_PROGRESS_SECONDS=0): the first calibration line says the layer loop started
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "DSQ_PROGRESS_SECONDS": "0"}
    args = [sys.executable, "-m", "dsq.cli", "quantize", str(m), "-o", str(out), "--method", "gptq",
            "--samples", "128", "--seqlen", "256"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or line.startswith("calibrate (gptq):"):
            break
    proc.send_signal(signal.SIGINT)  # inside the layer-by-layer calibration
    stdout, stderr = proc.communicate(timeout=60)
    stderr = "".join(seen) + stderr
    if proc.returncode == 0:
        pytest.skip("quantize finished before the signal arrived")
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] in (f"interrupted; nothing written to {out}", "interrupted; nothing written")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def _mapped(pid: int, library: str) -> bool:
    """Whether the process has a shared library whose path contains ``library`` mapped."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# -- kind 5: silent wrong successes: tensors against config.json, NaN/Inf in what dsq keeps --------------------
def _set(t, i, v):
    t = t.clone()
    t.view(-1)[i] = v
    return t


Q = "model.layers.0.self_attn.q_proj.weight"
TENSOR_EDITS = {
    "int16_linear": (Q, lambda t: t.to(torch.int16), "I16"),
    "one_d_linear": (Q, lambda t: t.reshape(-1), "2-D"),
    "transposed_linear": ("model.layers.0.mlp.down_proj.weight", lambda t: t.T, "hidden_size"),
    "zero_sized_linear": (Q, lambda t: t[:0], "2-D"),
    "inf_norm": ("model.norm.weight", lambda t: _set(t, 3, torch.inf), "NaN/Inf"),
    "nan_embedding": ("model.embed_tokens.weight", lambda t: _set(t, 77, torch.nan), "NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_tensors_are_checked_against_config_and_for_nan(m, tmp_path, case):
    name, fn, needle = TENSOR_EDITS[case]
    hostile.edit_tensor(m, name, fn)
    out = tmp_path / "q"
    refused(dsq("quantize", m, "-o", out), name, needle, out=out)


@pytest.mark.parametrize("changes,needle", [
    ({"num_hidden_layers": 1}, "layer 1"),  # two layers of tensors: layer 1 must not be dropped as "MTP"
    ({"num_hidden_layers": 3}, "no layer 2"),
    ({"vocab_size": 100}, "vocab_size"),  # smaller than the embedding
])
def test_config_that_disagrees_with_the_tensors(m, tmp_path, changes, needle):
    hostile.edit_json(m / "config.json", **changes)
    refused(dsq("plan", m), "num_hidden_layers" if "layer" in needle else "vocab_size", needle)
    out = tmp_path / "g.gguf"
    refused(dsq("export", m, "--to", "gguf", "-o", out, "--type", "q8_0"), needle, out=out)


@pytest.mark.parametrize("flag", ["--json", "--html"])
def test_eval_report_onto_a_directory_is_refused_before_running(m, tmp_path, flag):
    (tmp_path / "adir").mkdir()
    refused(dsq("eval", m, "--ref", m, flag, tmp_path / "adir"), flag, "is a directory")
    refused(dsq("bench", m, flag, tmp_path / "adir"), flag, "is a directory")
