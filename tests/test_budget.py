"""The size-budget search (dsquant/budget.py, export/gguf_budget.py): ``dsq export SRC --to gguf --target-size``.

On the tiny llama fixture (rows of 256 and 512: every K-quant fits) and a tied 320-wide qwen2 copy (rows that
are not whole 256-blocks: llama.cpp's fallbacks are the candidates). Checked: the file is at most the target
and exactly the size the search counted; a larger budget never predicts a higher KL; an impossible budget or
a malformed size is refused with one line naming the flag; the choice is deterministic; the Fisher proxy
tracks the KL measured with the quantized tensor swapped into the model; the knapsack is optimal against
brute force.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from dsq.dsquant.budget import Option, choose, parse_target_size
from dsq.dsquant.errors import InputError
from dsq.dsquant.source import Source
from dsq.export.gguf_budget import candidates, held, measure_kl, plan_budget, reference
from dsq.export.gguf_quants import GGUF_TYPES
from dsq.export.gguf_tensors import plan_tensors
from dsq.export.gguf_writer import export_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = dict(samples=4, seqlen=32, rows=64)


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """The sensitivities' cache (~/.cache/dsq/budget) goes to a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DSQ_CACHE", str(tmp_path_factory.mktemp("dsq-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def planned(model_dir):
    """plan_budget on the llama fixture at a few targets (one calibration each), with what it measured."""
    src = Source(model_dir("llama"))
    outs, _ = plan_tensors(src)
    cache: dict = {}

    def get(target: int):
        if target not in cache:
            keep: dict = {}
            types, rep = plan_budget(src, outs, target, "--target-size", keep=keep, **SMALL)
            cache[target] = (types, rep, keep)
        return cache[target]

    return get


def test_parse_target_size():
    assert parse_target_size("105MB") == 105_000_000
    assert parse_target_size("105M") == 105_000_000
    assert parse_target_size("1.5 GB") == 1_500_000_000
    assert parse_target_size("100MiB") == 100 * 2**20
    assert parse_target_size("2kib") == 2048
    assert parse_target_size(123456) == 123456
    for bad in ("", "12XB", "-5MB", "0", "MB", "5 MiBs"):
        with pytest.raises(InputError, match="--target-size"):
            parse_target_size(bad)


def test_candidates_follow_llama_cpp_fallbacks():
    assert candidates((10, 512)) == ["q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"]
    # rows of 320: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (gguf_policy.FALLBACK)
    assert candidates((10, 320)) == ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def test_knapsack_is_optimal_and_monotone():
    rng = np.random.default_rng(0)
    opts = {}
    for i in range(6):
        sizes = np.sort(rng.integers(100, 2000, 4))
        kls = np.sort(rng.random(4))[::-1]
        opts[f"t{i}"] = [Option(f"c{j}", int(s), float(k)) for j, (s, k) in enumerate(zip(sizes, kls, strict=True))]
    names = sorted(opts)
    last = np.inf
    for target in range(200 + sum(o[0].bytes for o in opts.values()), 200 + sum(o[-1].bytes for o in opts.values()), 397):
        sel = choose(opts, 200, target)
        assert sel.bytes <= target
        best = min(sum(o.kl for o in combo) for combo in itertools.product(*(opts[n] for n in names))
                   if 200 + sum(o.bytes for o in combo) <= target)
        # the DP counts bytes in units of span / RESOLUTION, rounded up: optimal up to that slack (here none)
        assert sel.predicted_kl == pytest.approx(best, rel=1e-12)
        assert sel.predicted_kl <= last
        last = sel.predicted_kl
    with pytest.raises(InputError, match="--target-bpw: .* too small"):
        choose(opts, 200, 300, "--target-bpw")


def test_file_fits_exactly_and_larger_budgets_predict_less(planned, model_dir, tmp_path):
    small = planned(700_000)
    types, rep, _ = small
    assert rep["predicted_bytes"] <= 700_000
    assert len(set(types.values())) > 1  # a real mix, not one type
    report = export_gguf(model_dir("llama"), tmp_path / "a.gguf", types=types)
    assert report["bytes"] == rep["predicted_bytes"]  # the search counts the file's layout exactly
    got = {t.name: t.tensor_type.name.lower() for t in GGUFReader(tmp_path / "a.gguf").tensors}
    assert all(got[n] == t for n, t in types.items())
    kls = [planned(t)[1]["predicted_kl"] for t in (700_000, 900_000, 1_200_000)]
    assert kls[0] >= kls[1] >= kls[2] > 0
    assert kls[0] > kls[2]


def test_choice_is_deterministic(planned, model_dir):
    types, rep, _ = planned(900_000)
    src = Source(model_dir("llama"))
    outs, _ = plan_tensors(src)
    again, rep2 = plan_budget(src, outs, 900_000, "--target-size", keep={}, **SMALL)  # keep: measured afresh
    assert again == types and rep2["predicted_kl"] == rep["predicted_kl"]
    assert rep2["sensitivity_cached"] is None
    # a second export at another size reuses the sensitivities (same model, tokens and settings)
    _, rep3 = plan_budget(src, outs, 800_000, "--target-size", **SMALL)
    _, rep4 = plan_budget(src, outs, 800_000, "--target-size", **SMALL)
    assert rep4["sensitivity_cached"] and rep4["per_tensor"] == rep3["per_tensor"]


def test_predicted_kl_tracks_measured(planned):
    """The Fisher proxy against the KL measured with one tensor quantized (same calibration tokens), for every
    tensor (the untied embedding too) at Q2_K, Q4_K and Q6_K: within a factor of 2 each (measured here: 0.76 to
    1.19), and the ranking of the types right for each tensor."""
    _, _, keep = planned(900_000)
    model, opts = keep["model"], keep["options"]
    ref = reference(model, keep["ids"])
    params = dict(model.named_parameters(remove_duplicate=False))
    param_of = {p.key.split("#")[0]: p.param for p in keep["probes"]}
    assert len(param_of) == 16 and "token_embd.weight#embedding" in {p.key for p in keep["probes"]}
    for key, param in param_of.items():
        w = params[param].detach().float()
        measured = []
        for c in ("q2_k", "q4_k", "q6_k"):
            pred = next(o.kl for o in opts[key] if o.type == c)
            kl = float(measure_kl(model, ref, {param: held(w, GGUF_TYPES[c])}).mean())
            assert pred / 2 < kl < pred * 2, (key, c, pred, kl)
            measured.append(kl)
        assert measured[0] > measured[1] > measured[2]


def test_export_refuses_impossible_and_conflicting_flags(model_dir, tmp_path):
    src = model_dir("llama")
    with pytest.raises(InputError, match=r"^--target-size: 0.001 MB is too small; the smallest file .* is 0\.\d+ MB"):
        export_gguf(src, tmp_path / "x.gguf", target_size="1kB")
    with pytest.raises(InputError, match="--target-bpw 0: expected a positive"):
        export_gguf(src, tmp_path / "x.gguf", target_bpw=0)
    with pytest.raises(InputError, match="leave out --type"):
        export_gguf(src, tmp_path / "x.gguf", target_size="1MB", type="q4_0")
    with pytest.raises(InputError, match="--target-size sizes one file"):
        export_gguf(src, tmp_path / "x.gguf", target_size="1MB", split_max_size="1M")
    with pytest.raises(InputError, match="--calib applies to --target-size"):
        export_gguf(src, tmp_path / "x.gguf", calib="mixed")
    assert not list(tmp_path.iterdir())


def test_tied_embedding_and_fallback_rows_via_cli(model_dir, tmp_path):
    """A tied 320-wide qwen2: token_embd is also the output matrix; rows of 320 take fallback types."""
    import transformers
    from typer.testing import CliRunner

    from dsq.cli import app

    from fixtures import _COMMON, SPECS, save_model

    cls_name, kw = SPECS["qwen2"]
    config = getattr(transformers, cls_name)(**{**_COMMON, "tie_word_embeddings": True},
                                             **{**kw, "hidden_size": 320, "num_attention_heads": 5,
                                                "num_key_value_heads": 1, "intermediate_size": 640})
    torch.manual_seed(0)
    src = save_model(transformers.AutoModelForCausalLM.from_config(config).eval(), tmp_path / "tied")
    out = tmp_path / "t.gguf"
    res = CliRunner().invoke(app, ["export", str(src), "--to", "gguf", "-o", str(out), "--target-bpw", "6",
                                   "--no-check", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    n = sum(int(np.prod(r["shape"])) for r in report["tensors"])
    assert report["bytes"] <= 6 * n / 8
    b = report["budget"]
    assert b["flag"] == "--target-bpw" and "token_embd.weight" in b["per_tensor"]
    assert "output.weight" not in {t.name for t in GGUFReader(out).tensors}
    assert set(b["types"]) <= {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
    for name, info in b["per_tensor"].items():
        width = next(r["shape"][-1] for r in report["tensors"] if r["name"] == name)
        assert set(info["options"]) == set(candidates((1, width)))


def test_quantize_records_the_choice_and_export_follows_it(model_dir, tmp_path):
    """``dsq quantize --target-size``: linear weights chosen as Q4_0/Q4_1/Q8_0 are quantized to their dsq twins and
    carried exactly; the rest stay float and are quantized by ``dsq export OUT --to gguf`` (no --type) to the recorded type."""
    from dsq.dsquant.quantize import quantize_checkpoint
    from dsq.export.gguf_budget import RECORD, budget_recipe, twin_format, write_record

    src, out = model_dir("llama"), tmp_path / "q"
    recipe = tmp_path / "budget.toml"
    record = budget_recipe(src, out, recipe, target_size="1MB", **SMALL)
    # dsq never quantizes an input embedding (recipes.NEVER_QUANTIZED_KINDS): the export quantizes it
    twins = {n for n, t in record["types"].items() if twin_format(t) and n != "token_embd.weight"}
    assert twins and len(twins) < len(record["types"])  # a mix of carried and export-quantized tensors
    quantize_checkpoint(src, out, str(recipe))
    write_record(out, record)
    assert (out / RECORD).is_file()
    report = export_gguf(out, tmp_path / "q.gguf")
    assert report["bytes"] <= 1_000_000 and report["budget"]["recorded"]
    rows = {r["name"]: r for r in report["tensors"]}
    for name, t in record["types"].items():
        assert rows[name]["type"].lower() == t
        assert rows[name]["status"] == ("exact" if name in twins else "quantized")
    with pytest.raises(InputError, match=RECORD):
        (out / RECORD).write_text("{")
        export_gguf(out, tmp_path / "r.gguf")


def test_quantize_gguf_type_follows_llama_cpp_policy_and_is_carried(model_dir, tmp_path):
    """``dsq quantize --gguf-type q4_k_m --method gptq``: every linear is calibrated straight onto the grid of the type
    llama.cpp's Q4_K_M policy gives it, and ``dsq export OUT --to gguf`` (no --type) writes exactly the policy's types,
    carrying those tensors byte for byte (status exact); the embedding, which dsq never quantizes, is the export's."""
    from typer.testing import CliRunner

    from dsq.cli import app
    from dsq.export.gguf_budget import RECORD, twin_format

    src, out = model_dir("llama"), tmp_path / "q"
    policy = export_gguf(src, tmp_path / "policy.gguf", type="q4_k_m")
    want = {r["name"]: r["type"].lower() for r in policy["tensors"]}
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--gguf-type", "q4_k_m", "--method", "gptq",
                                 "--samples", "4", "--seqlen", "32"])
    assert r.exit_code == 0, r.output
    record = json.loads((out / RECORD).read_text())
    assert record["policy"] == "q4_k_m" and "budget" not in record
    report = export_gguf(out, tmp_path / "q.gguf")
    rows = {x["name"]: x for x in report["tensors"]}
    assert {n: x["type"].lower() for n, x in rows.items()} == want
    carried = {n for n, t in record["types"].items() if twin_format(t) and ".weight" in n and n != "token_embd.weight"}
    assert len(carried) >= 7 and {"q4_k", "q6_k"} <= {record["types"][n] for n in carried}
    for n in carried:
        assert rows[n]["status"] == "exact", (n, rows[n])
    assert policy["bytes"] == report["bytes"]
    bad = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "x"), "--gguf-type", "q9_k"])
    assert bad.exit_code == 2 and "--gguf-type q9_k" in bad.output and "q4_k_m" in bad.output
