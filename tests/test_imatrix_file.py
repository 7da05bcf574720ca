"""llama.cpp imatrix files both ways: GGUF and legacy .dat round trips, the GGUF layout llama.cpp's
loader expects, dsq's calibration statistics written under GGUF names and read back, per-expert MoE
entries with dsq's coverage, and a file's importance driving ``--method imatrix``.

Cross-checking with llama.cpp's own ``llama-quantize --imatrix`` needs its binaries (not built here):
left to a bench."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from typer.testing import CliRunner

from dsq.cli import app
from dsq.dsquant.calib.data import calibration_batch, load_tokenizer
from dsq.dsquant.calib.hook import CalibSpec, run_calibration
from dsq.dsquant.calib.imatrix import search_scales
from dsq.dsquant.calib.imatrix_file import (
    Imatrix,
    ImatrixEntry,
    from_stats,
    gguf_targets,
    read_imatrix,
    to_importance,
    write_dat,
    write_gguf,
)
from dsq.dsquant.calib.pipeline import calibrate
from dsq.dsquant.checkpoint import Checkpoint
from dsq.dsquant.errors import CorruptFileError, InputError
from dsq.dsquant.formats import FORMATS
from dsq.dsquant.plan import make_plan
from dsq.dsquant.recipes import load_recipe

SAMPLES, SEQLEN = 4, 32
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic() -> Imatrix:
    rng = np.random.default_rng(0)
    dense = ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 50, np.array([96], dtype=np.float32))
    # three experts, the middle one never routed (count 0): llama.cpp's "partial data" case
    sums = rng.random((3, 32), dtype=np.float32) * 10
    sums[1] = 0
    experts = ImatrixEntry(sums, np.array([40, 0, 7], dtype=np.float32))
    return Imatrix({"blk.0.attn_q.weight": dense, "blk.1.ffn_down_exps.weight": experts}, ["mixed"], 3, 32)


def test_gguf_round_trip_is_exact(tmp_path):
    im = _synthetic()
    back = read_imatrix(write_gguf(tmp_path / "im.gguf", im))
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (["mixed"], 3, 32, False)
    assert set(back.entries) == set(im.entries)
    for name, e in im.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums) and np.array_equal(back.entries[name].counts, e.counts)
    imp = back.entries["blk.1.ffn_down_exps.weight"].importance()
    assert np.array_equal(imp[1], np.ones(32, dtype=np.float32))  # llama-quantize: zero count -> ones
    assert np.array_equal(imp[2], im.entries["blk.1.ffn_down_exps.weight"].sums[2] / np.float32(7))


def test_gguf_layout_is_what_llama_cpp_loads(tmp_path):
    """The names, ggml shapes (ne) and types of llama.cpp tools/imatrix/imatrix.cpp
    ``IMatrixCollector::save_imatrix``: ``gguf_set_val_str(ctx_gguf, "general.type", "imatrix")``,
    ``gguf_set_arr_str(.., "imatrix.datasets", ..)``, ``gguf_set_val_u32(.., "imatrix.chunk_count" /
    "imatrix.chunk_size", ..)``, ``ggml_new_tensor_2d(ctx, GGML_TYPE_F32, nval / nmat, nmat)`` named
    ``"%s.in_sum2"`` and ``ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, nmat)`` named ``"%s.counts"``;
    tools/quantize/quantize.cpp ``load_imatrix`` refuses a GGUF imatrix without all three imatrix.* keys
    ("missing imatrix metadata") and divides in_sum2 row j by counts[j]."""
    r = GGUFReader(write_gguf(tmp_path / "im.gguf", _synthetic()))
    f = r.fields
    assert f["general.type"].contents() == "imatrix"
    assert f["imatrix.datasets"].contents() == ["mixed"]
    assert f["imatrix.chunk_count"].contents() == 3 and f["imatrix.chunk_size"].contents() == 32
    assert f["imatrix.chunk_count"].types == [f["imatrix.chunk_size"].types[0]]  # both uint32
    assert f["imatrix.chunk_size"].types[0].name == "UINT32"
    assert "general.architecture" not in f  # llama-imatrix writes none
    got = {t.name: (list(map(int, t.shape)), t.tensor_type) for t in r.tensors}
    f32 = GGMLQuantizationType.F32
    assert got == {  # gguf-py reports ggml's ne order
        "blk.0.attn_q.weight.in_sum2": ([64, 1], f32),
        "blk.0.attn_q.weight.counts": ([1, 1], f32),
        "blk.1.ffn_down_exps.weight.in_sum2": ([32, 3], f32),
        "blk.1.ffn_down_exps.weight.counts": ([1, 3], f32),
    }


def test_legacy_dat_round_trip_and_layout(tmp_path):
    im = _synthetic()
    path = write_dat(tmp_path / "im.dat", im)
    raw = path.read_bytes()
    # save_imatrix_legacy: int32 n_entries, then (int32 len, name, int32 ncall, int32 nval, floats)...
    (n,) = struct.unpack_from("<i", raw, 0)
    (ln,) = struct.unpack_from("<i", raw, 4)
    name = raw[8 : 8 + ln].decode()
    ncall, nval = struct.unpack_from("<ii", raw, 8 + ln)
    assert (n, name, ncall, nval) == (2, "blk.0.attn_q.weight", 3, 64)  # ncall = ceil(96 / 32)
    # ... then int32 last chunk, int32 len + dataset name
    assert raw.endswith(struct.pack("<i", 3) + struct.pack("<i", 5) + b"mixed")
    back = read_imatrix(path)
    assert back.legacy and back.datasets == ["mixed"] and back.chunk_count == 3
    for key, e in im.entries.items():
        got, want = back.entries[key].importance(e.sums.shape[1]), e.importance()
        seen = e.counts > 0
        np.testing.assert_allclose(got[seen], want[seen], rtol=1e-6)  # (v / c * ncall) / ncall
        # a never-routed expert: the .dat stores 1 and llama-quantize divides by ncall (the legacy
        # format cannot say "no data"; the GGUF one can, which is why dsq writes GGUF by default)
        ncall = back.entries[key].counts[0]
        assert np.array_equal(got[~seen], np.full_like(got[~seen], np.float32(1) / ncall))
    assert write_dat(tmp_path / "again.dat", back).read_bytes() == raw  # .dat -> .dat is byte-exact


def test_bad_files_raise_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_imatrix(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(struct.pack("<i", 2) + struct.pack("<i", 5) + b"ab")
    with pytest.raises(CorruptFileError, match="truncated"):
        read_imatrix(bad)


@pytest.fixture(scope="module")
def llama(model_dir):
    ckpt = Checkpoint(model_dir("llama"))
    plan = make_plan(ckpt, load_recipe("int4"))
    batch = calibration_batch("mixed", load_tokenizer(ckpt.path), SAMPLES, SEQLEN, seed=0)
    return ckpt, plan, batch, calibrate(ckpt, plan, "imatrix", batch=batch, collect=True)


def test_calibration_statistics_written_and_read_back(llama, tmp_path):
    ckpt, plan, batch, res = llama
    quantized = {e.name for e in plan.entries if e.format and len(e.shape) == 2}
    assert set(res.stats) == quantized  # every calibrated linear (lm_head too when the recipe quantizes it)
    im = from_stats(ckpt, res.stats, ["mixed"], SAMPLES, SEQLEN)
    targets = gguf_targets(ckpt)
    assert set(im.entries) == {targets[n][0] for n in quantized}
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= set(im.entries)
    assert ("output.weight" in im.entries) == ("lm_head.weight" in quantized)
    for fmt_path in ("im.gguf", "im.dat"):
        path = tmp_path / fmt_path
        (write_gguf if fmt_path.endswith("gguf") else write_dat)(path, im)
        back = to_importance(read_imatrix(path), ckpt)
        assert set(back) == quantized
        for hf, (sums, count) in res.stats.items():
            # InputStats.importance: what --method imatrix quantized this linear with
            want = (sums / count).to(torch.float32).numpy()
            np.testing.assert_allclose(back[hf], want, rtol=2e-6, err_msg=f"{fmt_path} {hf}")
            assert (back[hf] > 0).all()


def test_imatrix_file_drives_method_imatrix(llama, tmp_path):
    """A file with deliberately different importance: the run quantizes with the file's vectors."""
    ckpt, plan, batch, res = llama
    im = from_stats(ckpt, res.stats, ["mixed"], SAMPLES, SEQLEN)
    rng = np.random.default_rng(1)
    for e in im.entries.values():  # spiky importance: a few columns dominate
        e.sums = (rng.random(e.sums.shape, dtype=np.float32) ** 8 * 1e3).astype(np.float32)
    path = write_gguf(tmp_path / "spiky.gguf", im)
    given = to_importance(read_imatrix(path), ckpt)
    spec = CalibSpec("imatrix", "mixed", SAMPLES, SEQLEN, 0, imatrix_in=str(path))
    tensors, report = run_calibration(ckpt, plan, spec)
    assert report["imatrix_in"]["tensors"] == len(given)
    # layer 0 sees the float embeddings, so its linears can be recomputed here from the checkpoint
    by_name = {t.name: t for t in ckpt.tensors}
    differs = 0
    for hf in [n for n in given if n.startswith("model.layers.0.")]:
        fmt = FORMATS[next(e.format for e in plan.entries if e.name == hf)]
        w = ckpt.load(by_name[hf]).to(torch.float32)
        want = search_scales(fmt, w, torch.from_numpy(given[hf]))
        assert torch.equal(tensors[hf].codes, want.codes) and torch.equal(tensors[hf].scale, want.scale), hf
        differs += not torch.equal(res.tensors[hf].scale, want.scale)
    assert differs > 0  # the file changed the result: it was not ignored


def test_moe_experts_get_per_expert_entries_with_dsq_coverage(model_dir, tmp_path):
    ckpt = Checkpoint(model_dir("deepseek_v3"))
    plan = make_plan(ckpt, load_recipe("int4"))
    batch = calibration_batch("mixed", load_tokenizer(ckpt.path), SAMPLES, SEQLEN, seed=0)
    res = calibrate(ckpt, plan, "imatrix", batch=batch, collect=True)
    cfg = ckpt.config
    n_exp = cfg["n_routed_experts"]
    r = GGUFReader(write_gguf(tmp_path / "moe.gguf", from_stats(ckpt, res.stats, ["mixed"], SAMPLES, SEQLEN)))
    tensors = {t.name: t for t in r.tensors}
    coverage = {(row["layer"], row["expert"]): row for row in res.coverage}
    tokens = SAMPLES * SEQLEN
    for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        for proj in ("gate", "up", "down"):
            name = f"blk.{i}.ffn_{proj}_exps.weight"
            counts = np.array(tensors[name + ".counts"].data).reshape(-1)
            assert [int(x) for x in tensors[name + ".in_sum2"].shape][1] == n_exp
            assert counts.shape == (n_exp,) and (counts > 0).all(), (name, counts)  # every expert covered
            for e in range(n_exp):  # the count is the tokens dsq calibrated expert e on
                row = coverage[(i, e)]
                want = row["tokens"] + (tokens if row["policy"] == "routed+all" else 0)
                assert counts[e] == want, (name, e, row)
        assert f"blk.{i}.ffn_down_shexp.weight.in_sum2" in tensors
    assert not any("attn_k_b" in n or "attn_v_b" in n for n in tensors)  # kv_b: other inputs in llama.cpp
    # the names are the ones dsq's own GGUF export writes for this checkpoint
    from dsq.dsquant.source import Source
    from dsq.export.gguf_tensors import plan_tensors

    gguf_names = {t.name for t in plan_tensors(Source(ckpt.path))[0]}
    assert {n.rsplit(".", 1)[0] for n in tensors} <= gguf_names


def test_cli_writes_imatrix_and_refuses_rtn(model_dir, tmp_path):
    runner = CliRunner()
    src = str(model_dir("llama"))
    out = tmp_path / "im.gguf"
    res = runner.invoke(app, ["quantize", src, "-o", str(tmp_path / "q"), "--method", "imatrix", "--samples", "2",
                              "--seqlen", "32", "--imatrix-out", str(out)])
    assert res.exit_code == 0, res.output
    assert "blk.0.ffn_down.weight" in read_imatrix(out).entries
    res = runner.invoke(app, ["quantize", src, "-o", str(tmp_path / "q2"), "--imatrix-out", str(out)])
    assert res.exit_code == 2 and "needs calibration" in res.output


def test_flags_refused_where_the_statistics_would_be_wrong(llama, tmp_path):
    ckpt, plan, _, _ = llama
    with pytest.raises(InputError, match="--method awq"):  # AWQ rescales after its statistics are taken
        run_calibration(ckpt, plan, CalibSpec("awq", "mixed", SAMPLES, SEQLEN, imatrix_out=str(tmp_path / "a.gguf")))
    path = write_gguf(tmp_path / "im.gguf", _synthetic())
    with pytest.raises(InputError, match="--method imatrix only"):  # GPTQ needs a Hessian, not a diagonal
        run_calibration(ckpt, plan, CalibSpec("gptq", "mixed", SAMPLES, SEQLEN, imatrix_in=str(path)))
    wrong = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 7), np.float32), np.ones(1, np.float32))},
                    [], 1, 1)
    with pytest.raises(InputError, match="another model"):
        to_importance(wrong, ckpt)
