"""Every bad input gets one clear error naming the file/tensor/flag, a non-zero exit, no traceback,
and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from dsq.cli import app
from dsq.dsquant.errors import (
    BadWeightsError,
    CorruptFileError,
    InputError,
    OutputError,
    RecipeError,
    UnsupportedError,
)
from dsq.dsquant.quantize import quantize_checkpoint
from dsq.dsquant.safetensors_io import read_header

runner = CliRunner()


def dsq(*args):
    return runner.invoke(app, [str(a) for a in args])


def copy_model(model_dir, tmp_path, arch="llama"):
    dst = tmp_path / "m"
    shutil.copytree(model_dir(arch), dst)
    return dst


def shards(path):
    return sorted(path.glob("*.safetensors"))


def assert_clean_failure(result, *needles):
    assert result.exit_code == 2, result.output
    out = result.output
    assert out.startswith("error: "), out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    for n in needles:
        assert n in out, (n, out)


def no_partial_outputs(parent):
    return not [p for p in parent.iterdir() if ".partial" in p.name]


def test_missing_path(tmp_path):
    assert_clean_failure(dsq("quantize", tmp_path / "nope", "-o", tmp_path / "out"), "nope", "no such directory")


def test_not_a_model_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(dsq("plan", tmp_path / "empty"), "no config.json")


def test_truncated_safetensors(model_dir, tmp_path):
    m = copy_model(model_dir, tmp_path)
    f = shards(m)[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    r = dsq("quantize", m, "-o", tmp_path / "out")
    assert_clean_failure(r, f.name, "truncated")
    assert not (tmp_path / "out").exists() and no_partial_outputs(tmp_path)


def _write_raw_safetensors(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, b"\0" * 64, "header lies about sizes"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24, "overlap"),
        ({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, b"\0" * 16, "truncated"),
        ({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "negative dimension"),
        ({"w": {"shape": [4]}}, b"", "malformed"),
    ],
)
def test_hostile_headers(tmp_path, header, data, needle):
    f = tmp_path / "x.safetensors"
    _write_raw_safetensors(f, header, data)
    with pytest.raises(CorruptFileError, match=needle):
        read_header(f)
    assert_clean_failure(dsq("inspect", f), "x.safetensors")


def test_huge_header_length_is_refused_before_reading(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CorruptFileError, match="header claims"):
        read_header(f)
    f.write_bytes(b"abc")
    with pytest.raises(CorruptFileError, match="not a safetensors"):
        read_header(f)


def test_unknown_architecture(model_dir, tmp_path):
    m = copy_model(model_dir, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (m / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(dsq("plan", m), "gpt_neox", "not supported", "qwen2")


def test_unmapped_tensor_is_an_error_unless_allowed(model_dir, tmp_path):
    m = copy_model(model_dir, tmp_path)
    save_file({"model.extra_adapter.weight": torch.ones(4, 4)}, m / "extra.safetensors")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra_adapter.weight"] = "extra.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_failure(dsq("quantize", m, "-o", tmp_path / "out"), "model.extra_adapter.weight", "--allow-unmapped")
    report = quantize_checkpoint(m, tmp_path / "out", "int4", allow_unmapped=True)
    extra = next(t for t in report["tensors"] if t["name"] == "model.extra_adapter.weight")
    assert extra["role"] == "unmapped" and extra["format"] is None and "unmapped" in extra["note"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights_name_tensor_and_block(model_dir, tmp_path, bad):
    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(model_dir("llama") / "config.json", m)
    from safetensors.torch import load_file

    sd = {}
    for f in shards(model_dir("llama")):
        sd.update(load_file(f))
    sd["model.layers.1.mlp.down_proj.weight"][100, 300] = bad
    save_file(sd, m / "model.safetensors")
    r = dsq("quantize", m, "-o", tmp_path / "out")
    assert_clean_failure(r, "model.layers.1.mlp.down_proj.weight", "[100, 300]", "block (100, 9)")
    assert not (tmp_path / "out").exists() and no_partial_outputs(tmp_path)
    with pytest.raises(BadWeightsError):
        quantize_checkpoint(m, tmp_path / "out", "int8")


def test_unsupported_recipe_key(model_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('default = "int4_sym_g32"\nbits = 3\n')
    assert_clean_failure(dsq("plan", model_dir("llama"), "--recipe", recipe), "bits", "known keys")
    recipe.write_text('default = "int3_g7"\n')
    with pytest.raises(RecipeError, match="unknown format 'int3_g7'"):
        quantize_checkpoint(model_dir("llama"), tmp_path / "o", str(recipe))
    recipe.write_text('default = "int4_sym_g32"\n[roles]\nattn_x = "keep"\n')
    assert_clean_failure(dsq("plan", model_dir("llama"), "-r", recipe), "attn_x")
    assert_clean_failure(dsq("plan", model_dir("llama"), "-r", "int5"), "int5", "not a preset")
    recipe.write_text('default = "int4_sym_g32"\n[roles]\nattn_norm = "int8_g32"\n')
    assert_clean_failure(dsq("plan", model_dir("llama"), "-r", recipe), "attn_norm", "stays 16-bit")
    recipe.write_text('default = "int4_sym_g32"\n[roles]\nnorm = "int8_g32"\n')
    assert_clean_failure(dsq("plan", model_dir("llama"), "-r", recipe), "norm")
    recipe.write_text("default = [unclosed\n")
    assert_clean_failure(dsq("plan", model_dir("llama"), "-r", recipe), "not valid TOML")


def test_output_not_writable_or_existing(model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_clean_failure(dsq("quantize", model_dir("llama"), "-o", blocker / "out"), "does not exist")
    report = quantize_checkpoint(model_dir("llama"), tmp_path / "new" / "deeper" / "out", "int8")
    assert report["summary"]["quantized_tensors"] and (tmp_path / "new" / "deeper" / "out" / "config.json").is_file()
    (tmp_path / "done").mkdir()
    assert_clean_failure(dsq("quantize", model_dir("llama"), "-o", tmp_path / "done"), "--overwrite")
    with pytest.raises(OutputError):
        quantize_checkpoint(model_dir("llama"), tmp_path / "done", "int4")


def test_disk_full_leaves_nothing(model_dir, tmp_path, monkeypatch):
    import errno

    from dsq.dsquant import safetensors_io

    real_write = safetensors_io.SafetensorsWriter.write_part
    calls = {"n": 0}

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OutputError(f"{self.path}: cannot write ({errno.errorcode[errno.ENOSPC]}); is the disk full?")
        return real_write(self, name, tensor)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write_part", failing_write)
    with pytest.raises(OutputError, match="disk full"):
        quantize_checkpoint(model_dir("llama"), tmp_path / "out", "int4")
    assert not (tmp_path / "out").exists() and no_partial_outputs(tmp_path)


def test_overwrite_replaces_atomically(model_dir, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(model_dir("llama"), out, "int8")
    quantize_checkpoint(model_dir("llama"), out, "int4", overwrite=True)
    assert json.loads((out / "dsq-report.json").read_text())["recipe"]["name"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask  # an ordinary directory, not mkdtemp's 0700


def test_pickle_only_checkpoint_is_refused(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsupportedError, match="pickle"):
        from dsq.dsquant.checkpoint import Checkpoint

        Checkpoint(m)


def test_index_pointing_outside_the_model_dir(model_dir, tmp_path):
    m = copy_model(model_dir, tmp_path)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_failure(dsq("plan", m), "outside the model directory")


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError, match="cannot be reached"):
        from dsq.dsquant.checkpoint import resolve

        resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")


def test_wrong_flag_is_a_usage_error(model_dir):
    r = dsq("quantize", model_dir("llama"), "--bits", "3")
    assert r.exit_code == 2 and "--bits" in r.output


@pytest.mark.parametrize("damage", ["scale_shape", "nan_scale", "weight_shape"])
def test_damaged_quantized_checkpoint_is_refused_by_name(quantized_dir, tmp_path, damage):
    """A quantized checkpoint whose weight_shape or scales disagree with its packed data (or a NaN scale) is
    refused naming the tensor, before any export unpacks it into wrong values."""
    from safetensors.torch import load_file

    src = quantized_dir("llama", "int4")
    dst = tmp_path / "q"
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(f)
    mod = "model.layers.0.self_attn.q_proj"
    if damage == "scale_shape":
        sd[mod + ".weight_scale"] = sd[mod + ".weight_scale"][:, :-1].contiguous()
    elif damage == "nan_scale":
        sd[mod + ".weight_scale"][0, 0] = float("nan")
    else:
        sd[mod + ".weight_shape"] = torch.tensor([7, 3], dtype=torch.int64)
    save_file(sd, f)
    r = dsq("export", dst, "--to", "gguf", "-o", tmp_path / "o.gguf", "--no-check")
    assert r.exit_code == 2, r.output
    assert mod in r.output and "Traceback" not in r.output and "unexpected" not in r.output
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("damage", ["kv_lora_rank", "missing_expert"])
def test_deepseek_config_and_experts_must_match_the_weights(model_dir, tmp_path, damage):
    """A DeepSeek kv_lora_rank that disagrees with the MLA weights, or a routed expert with no weights, is
    refused before anything is written (silently wrong outputs before)."""
    import json

    from safetensors.torch import load_file

    src = model_dir("deepseek_v3")
    m = tmp_path / "m"
    m.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, m)
    sd = {}
    for f in shards(src):
        sd.update(load_file(f))
    cfg = json.loads((m / "config.json").read_text())
    if damage == "kv_lora_rank":
        cfg["kv_lora_rank"] += 8
        (m / "config.json").write_text(json.dumps(cfg))
        needles = ("kv_lora_rank", "kv_a_proj_with_mqa")
    else:
        layer = cfg.get("first_k_dense_replace", 0)
        gone = f"model.layers.{layer}.mlp.experts.1."
        sd = {k: v for k, v in sd.items() if not k.startswith(gone)}
        needles = (f"layer {layer} has no weights for expert 1",)
    save_file(sd, m / "model.safetensors")
    r = dsq("quantize", m, "-o", tmp_path / "out")
    assert_clean_failure(r, *needles)
    assert not (tmp_path / "out").exists()
