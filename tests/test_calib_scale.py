"""Calibration at 7B scale (issue 14, item 2) on tiny fixtures: one X^T X per distinct input, float32
sums, the in-place GPTQ inverse factor, bfloat16 forwards, and calibrated tensors streamed through disk."""

from __future__ import annotations

import gc
import hashlib

import pytest
import torch

from dsq.dsquant.calib import gptq
from dsq.dsquant.calib.data import calibration_batch, load_tokenizer
from dsq.dsquant.calib.methods import CalibOptions, InputStats, SharedInputs, add_gram, mirror_gram
from dsq.dsquant.calib.pipeline import Decoder, calibrate, linear_modules
from dsq.dsquant.calib.resume import LayerStore
from dsq.dsquant.checkpoint import Checkpoint
from dsq.dsquant.errors import InputError
from dsq.dsquant.formats import FORMATS, QuantizedTensor
from dsq.dsquant.plan import make_plan
from dsq.dsquant.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLES, SEQLEN = 8, 32


@pytest.fixture(scope="module")
def llama(model_dir):
    ckpt = Checkpoint(model_dir("llama"))
    batch = calibration_batch("mixed", load_tokenizer(ckpt.path), SAMPLES, SEQLEN, seed=0)
    return ckpt, make_plan(ckpt, load_recipe("int4")), batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_gram_equals_the_full_product(dtype):
    x = torch.randn(50, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    acc = torch.zeros(11, 11)
    for part in x.split(20):  # three batches, blocks of 4 columns: full, partial and diagonal blocks
        add_gram(acc, part, block=4)
    assert torch.count_nonzero(acc[4:, :4]) == 0  # lower blocks are left for the mirror
    ref = x.double().T @ x.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(mirror_gram(acc, block=4).double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_linears_reading_one_input_share_one_hessian(llama):
    """q/k/v and gate/up get one statistics object each; its Hessian equals each linear's own X^T X."""
    ckpt, plan, batch = llama
    dec = Decoder(ckpt)
    layer = dec.load_layer(0)
    formats = {e.name: e.format for e in plan.entries if e.format}
    linears = linear_modules(layer, dec.prefix(0), formats)
    shared = SharedInputs(lambda cols: InputStats(cols, True, 0))
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = []
    for name, lin in linears.items():
        hooks.append(lin.register_forward_pre_hook(shared.hook(name, lin.in_features)))
        hooks.append(lin.register_forward_pre_hook(lambda _m, a, n=name: seen[n].append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.inference_mode():
        for ids in batch.ids.split(4):
            dec.forward(layer, dec.embed(ids))
            shared.end_batch()
    for h in hooks:
        h.remove()
    st = shared.stats
    q, k, v = (st[f"self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v and q.users == 3
    assert st["mlp.gate_proj"] is st["mlp.up_proj"] and st["mlp.gate_proj"].users == 2
    assert st["self_attn.o_proj"] is not q and st["mlp.down_proj"] is not st["mlp.gate_proj"]
    assert len(shared.unique()) == 4
    for name, s in st.items():
        x = torch.cat(seen[name]).double()
        ref = 2 * x.T @ x / x.shape[0]
        assert s.count == x.shape[0]
        torch.testing.assert_close(s.hessian.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(s.sum_sq, (x * x).sum(0), rtol=1e-6, atol=0)
    # the last of the three users takes the buffer itself; the others get copies
    with torch.inference_mode():  # as in calibrate(): the sums were made there
        h1, h2 = q.take_hessian(), q.take_hessian()
        assert q.xtx is not None and h1.data_ptr() != q.xtx.data_ptr()
        h3 = q.take_hessian()
    assert q.xtx is None and torch.equal(h1, h2) and torch.equal(h1, h3)


def _fp64_upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The GPTQ reference's chain (cholesky -> cholesky_inverse -> upper cholesky) in float64."""
    h64 = h.double()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h64)), upper=True).to(h.dtype)


@pytest.mark.parametrize("n", [5, 300, 700])
def test_inverse_factor_matches_the_float64_reference(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g) * torch.rand(n, generator=g) * 3
    h = gptq._damped(x.T @ x / (2 * n), 0.01)
    ref = _fp64_upper_inverse_cholesky(h).double()
    work = h.clone()
    got = gptq._upper_inverse_cholesky(work)
    assert got.data_ptr() == work.data_ptr()  # in the Hessian's own memory
    assert torch.count_nonzero(got.tril(-1)) == 0
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-6


def test_inverse_factor_raises_damping_for_a_singular_hessian():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))  # rank 3 < 8
    u = gptq._upper_inverse_cholesky(x.T @ x)
    assert torch.isfinite(u).all() and bool((torch.diagonal(u) > 0).all())


@pytest.mark.parametrize("fmt", ["int4_sym_g32", "int4_asym_g128"])
def test_gptq_from_float32_hessian_matches_float64_reference(monkeypatch, fmt):
    g = torch.Generator().manual_seed(1)
    # correlated inputs (as activations are), so compensation has something to gain over rounding alone
    x = torch.randn(2048, 48, generator=g) @ torch.randn(48, 256, generator=g) + 0.3 * torch.randn(2048, 256, generator=g)
    w = torch.randn(64, 256, generator=g)
    st = InputStats(256, True, 0)
    for part in x.split(512):
        st.add(part)
    h32 = st.hessian
    h64 = (2 * x.double().T @ x.double() / x.shape[0])
    got = gptq.gptq_quantize(FORMATS[fmt], w, h32)
    monkeypatch.setattr(gptq, "_upper_inverse_cholesky", _fp64_upper_inverse_cholesky)
    ref = gptq.gptq_quantize(FORMATS[fmt], w, h64.float())

    def loss(qt: QuantizedTensor) -> float:
        d = (qt.dequantize() - w).double()
        return float(torch.einsum("ri,ij,rj->", d, h64, d))

    assert float((got.codes == ref.codes).float().mean()) > 0.97
    assert abs(loss(got) - loss(ref)) < 0.01 * loss(ref)
    assert loss(got) < 0.8 * loss(FORMATS[fmt].quantize(w))  # and still GPTQ: well below round to nearest


def test_auto_options_resolve_by_run_size():
    assert CalibOptions().resolve(1e13, True) == (torch.bfloat16, False)
    assert CalibOptions().resolve(1e13, False) == (torch.float32, False)
    assert CalibOptions().resolve(1e9, True) == (torch.float32, True)
    assert CalibOptions(track_drift=True, compute_dtype="bfloat16").resolve(1e9, False) == (torch.bfloat16, True)
    with pytest.raises(InputError, match="compute_dtype 'fp16'"):
        CalibOptions(compute_dtype="fp16").resolve(1e9, True)


def _live_quantized() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is QuantizedTensor)  # type(): no proxy __class__ lookups


def test_calibrate_holds_one_layer_of_tensors_at_a_time(llama):
    ckpt, plan, batch = llama
    before = _live_quantized()
    per_layer = len([e for e in plan.entries if e.format and ".layers.0." in e.name])
    peaks = []
    res = calibrate(ckpt, plan, "gptq", batch=batch, progress=lambda done, total, _: peaks.append(_live_quantized()))
    assert isinstance(res.tensors, LayerStore) and len(res.tensors) == 2 * per_layer
    assert max(peaks) - before <= per_layer  # old behaviour: every finished layer's tensors stay in a dict
    assert _live_quantized() == before  # all of them are on disk, read back on access
    qt = res.tensors["model.layers.1.mlp.down_proj.weight"]
    assert isinstance(qt, QuantizedTensor) and qt.format == "int4_sym_g32"


@pytest.mark.parametrize("arch, method, gain", [("llama", "gptq", 0.8), ("llama", "awq", 1.0), ("llama", "imatrix", 1.0),
                                                ("qwen3_moe", "gptq", 0.8), ("qwen3_moe", "awq", 1.0)])
def test_bfloat16_forward_keeps_quality(model_dir, arch, method, gain):
    ckpt = Checkpoint(model_dir(arch))
    plan = make_plan(ckpt, load_recipe("int4"))
    batch = calibration_batch("mixed", load_tokenizer(ckpt.path), SAMPLES, SEQLEN, seed=0)
    f32 = calibrate(ckpt, plan, method, batch=batch, options=CalibOptions(compute_dtype="float32"))
    bf16 = calibrate(ckpt, plan, method, batch=batch, options=CalibOptions(compute_dtype="bfloat16"))
    rtn = calibrate(ckpt, plan, "rtn", batch=batch, options=CalibOptions(compute_dtype="bfloat16"))
    assert set(f32.tensors) == set(bf16.tensors)
    # layer 0 sees the same inputs in both runs (later ones each run's own quantized stream)
    assert bf16.layers[0].rel_err < gain * rtn.layers[0].rel_err
    for a, b in zip(f32.layers, bf16.layers, strict=True):
        assert b.rel_err < 1.25 * a.rel_err, (a, b)


def _digests(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.suffix != ".json"}


def test_streamed_tensors_write_the_same_checkpoint_as_held_ones(model_dir, tmp_path, monkeypatch):
    from dsq.dsquant import quantize
    from dsq.dsquant.calib.hook import CalibSpec, run_calibration

    spec = CalibSpec("awq", "mixed", SAMPLES, SEQLEN)  # quantized tensors and AWQ's rescaled float norms
    quantize.quantize_checkpoint(model_dir("llama"), tmp_path / "streamed", "int4", calibration=spec)

    def held(*args, **kwargs):
        tensors, report = run_calibration(*args, **kwargs)
        assert isinstance(tensors, LayerStore)
        return {name: tensors[name] for name in tensors}, report

    monkeypatch.setattr(quantize, "run_calibration", held)
    quantize.quantize_checkpoint(model_dir("llama"), tmp_path / "held", "int4", calibration=spec)
    a, b = _digests(tmp_path / "streamed"), _digests(tmp_path / "held")
    assert a == b and any(n.endswith(".safetensors") for n in a)


def test_store_keeps_every_part_and_is_removed_with_it(tmp_path):
    from dsq.dsquant.kformats import KQuantTensor

    store = LayerStore()
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    held = {"w": FORMATS["int4_asym_g32"].quantize(w), "k": FORMATS["q4_k"].quantize(w),
            "norm": torch.ones(3, dtype=torch.bfloat16)}
    assert type(held["k"]) is KQuantTensor
    store.put("layer-00000", held)
    path = store.dir
    for name in ("w", "k"):
        got, ref = store[name], held[name]
        assert type(got) is type(ref) and got.shape == ref.shape
        for f in ("codes", "scale", "zero", "dmin", "sub_scale", "sub_min"):
            a, b = getattr(got, f, None), getattr(ref, f, None)
            assert (a is None and b is None) or torch.equal(a, b), (name, f)
    assert store["norm"].dtype == torch.bfloat16
    del got, store
    gc.collect()
    assert not path.exists()
