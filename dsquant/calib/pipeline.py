"""Sequential layer-by-layer calibration, with transformers' own decoder-layer modules.

Embed the calibration tokens, then for each decoder layer in turn: load only that layer's weights
from the checkpoint, run transformers' ``<Arch>DecoderLayer`` on the current hidden states with
hooks that collect each linear's input statistics (routed experts: through the router's top-k, see
moe_coverage.py), quantize the layer's linears with the chosen method, and run the *quantized*
layer to produce the next layer's inputs (as GPTQ's reference driver does). Peak memory is one
layer plus the hidden states of the calibration batch (twice: the layer's input and its float output,
for the error metric) plus the layer's largest Hessian, whatever the model size.

At scale (``CalibOptions.resolve``) the forwards and the hidden states are bfloat16 (the checkpoint's own
dtype; about twice float32's matmul speed on CPUs with bf16 units) and the float-model stream for the
drift metric (a third forward) is skipped; linears that read the same input share one float32
``X^T X`` (methods.SharedInputs). Measured at 7B widths: bench/calib_scale.py.

The result maps HF tensor names to a :class:`QuantizedTensor` (in the plan's format) or, for AWQ,
to float tensors it rescaled (norms, unquantized linears); everything else is untouched and goes
through the ordinary round-to-nearest path of ``quantize_checkpoint``. Each layer's result is written to
disk as soon as the layer is done (resume.LayerStore) and the writer reads it back one tensor at a time.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..archs import Role
from ..checkpoint import Checkpoint, SourceTensor
from ..errors import InputError, UnsupportedError
from ..formats import FORMATS, QuantizedTensor
from ..plan import Plan
from .awq import apply_awq
from .data import CalibBatch, calibration_batch, load_tokenizer
from .methods import CalibOptions, InputStats, Method, SharedInputs, get_method, use_stats
from .moe_coverage import ExpertCapture, fuse_experts
from .pool import LOCAL, CalibPool
from .resume import LayerStore, ResumeState, fingerprint

Tensors = dict[str, QuantizedTensor | torch.Tensor]
TensorMap = Mapping[str, QuantizedTensor | torch.Tensor]  # a LayerStore: on disk, read one tensor at a time
ProgressFn = Callable[[int, int, str], None]


@dataclass
class LayerReport:
    layer: int
    rel_err: float  # ||y_q - y|| / ||y - x||: error of the quantized layer's update to the residual stream
    drift: float | None  # ||h_q - h|| / ||h||: quantized model vs float model, hidden states after this layer
    seconds: float
    quantized: int
    experts: list[dict] = field(default_factory=list)  # coverage rows (MoE layers)


@dataclass
class CalibResult:
    tensors: TensorMap
    layers: list[LayerReport]
    method: str
    batch: dict
    resumed_from: int = 0
    lm_head_rel_err: float | None = None
    # HF weight name -> (sum of x^2 per input column, tokens): filled when calibrate(collect=True)
    stats: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)

    @property
    def coverage(self) -> list[dict]:
        return [row for rep in self.layers for row in rep.experts]

    def report(self) -> dict:
        """The ``calibration`` section of dsq-report.json."""
        return {
            "method": self.method,
            "data": self.batch,
            "resumed_from_layer": self.resumed_from,
            "layers": [{k: v for k, v in asdict(r).items() if k != "experts"} for r in self.layers],
            "lm_head_rel_err": self.lm_head_rel_err,
            "expert_coverage": self.coverage,
        }


@functools.cache
def _params(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


@dataclass
class LayerRunner:
    """Runs one decoder layer on one batch of hidden states: what a forward needs besides the layer
    (the config and the rotary embedding), small and picklable, so a pool can run it elsewhere."""

    config: object
    rotary: nn.Module

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(x.shape[1]).unsqueeze(0)
        pe = self.rotary(x, pos)
        # no KV cache here; transformers >= 5.24 calls the argument `cache` and warns on `past_key_values`
        no_cache = {"cache" if "cache" in _params(create_causal_mask) else "past_key_values": None}
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None, position_ids=pos, **no_cache)
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out


class Decoder:
    """One checkpoint's decoder layers, built one at a time from its own weights."""

    def __init__(self, ckpt: Checkpoint) -> None:
        from transformers import AutoConfig

        arch = ckpt.arch  # its record names transformers' own classes (no re-implementation here)
        self.ckpt = ckpt
        self.config = AutoConfig.from_pretrained(str(ckpt.path))
        self.config._attn_implementation = "sdpa"
        self.config._experts_implementation = "eager"  # the loop that calls the experts module (hooked)
        mod = importlib.import_module(arch.hf_module)
        self.layer_cls = getattr(mod, arch.decoder_layer)
        self.rotary = getattr(mod, arch.rotary)(config=self.config)
        self.runner = LayerRunner(self.config, self.rotary)
        self.n_layers = int(self.config.num_hidden_layers)
        self.by_layer: dict[int, list[SourceTensor]] = {}
        self.others: dict[Role, SourceTensor] = {}
        for t in ckpt.tensors:
            if t.ref is not None and t.ref.layer is not None and t.ref.layer < self.n_layers:
                self.by_layer.setdefault(t.ref.layer, []).append(t)
            elif t.ref is not None:
                self.others.setdefault(t.ref.role, t)

    def prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def load_layer(self, i: int, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Decoder layer ``i`` in ``dtype`` with the checkpoint's weights (only this layer's are read)."""
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        prefix = self.prefix(i)
        state: dict[str, torch.Tensor] = {}
        experts: dict[str, torch.Tensor] = {}
        for t in self.by_layer.get(i, []):
            data = self.ckpt.load(t).to(dtype)
            local = t.name[len(prefix) :]
            if t.ref is not None and t.ref.expert is not None:
                experts[local] = data
            else:
                state[local] = data
        state.update(fuse_experts(layer, experts))
        missing = set(layer.state_dict()) - set(state)
        if missing:
            raise UnsupportedError(f"layer {i}: checkpoint has no tensor for `{prefix}{sorted(missing)[0]}`")
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def embed(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.embed_batches([ids], dtype)[0]

    def embed_batches(self, batches: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The embedding rows of each batch of token ids, in ``dtype``; the matrix (1 GB at 7B) is read once."""
        w = self.ckpt.load(self.others[Role.EMBED])
        return [w[ids].to(dtype) for ids in batches]

    def forward_flop(self, tokens: int) -> float:
        """2 x decoder-layer weights x ``tokens``: the matmul work of one forward over them (attention aside)."""
        return 2.0 * sum(math.prod(t.shape) for ts in self.by_layer.values() for t in ts) * tokens

    def bf16_layers(self) -> bool:
        """Whether every decoder-layer tensor is stored as bfloat16 (so a bfloat16 forward reads them exactly)."""
        return all(t.float_dtype == torch.bfloat16 for ts in self.by_layer.values() for t in ts)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.runner(layer, x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """model.norm (RMSNorm in every supported architecture), in float32."""
        x = x.to(torch.float32)
        w = self.ckpt.load(self.others[Role.OUTPUT_NORM]).to(torch.float32)
        eps = float(getattr(self.config, "rms_norm_eps", 1e-6))
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def linear_modules(layer: nn.Module, prefix: str, formats: dict[str, str]) -> dict[str, nn.Linear]:
    """The layer's nn.Linear modules the plan quantizes, by local module name."""
    return {
        name: m
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and f"{prefix}{name}.weight" in formats
    }


def _rel(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def calibrate_layer(
    dec: Decoder,
    i: int,
    xs: list[torch.Tensor],
    method: Method,
    formats: dict[str, str],
    opts: CalibOptions,
    ref: list[torch.Tensor] | None = None,
    collect: dict | None = None,
    given: dict[str, torch.Tensor] | None = None,
    pool: CalibPool = LOCAL,
    on_unit: Callable[[int, int], None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensors, list[torch.Tensor], list[torch.Tensor] | None, LayerReport]:
    """Calibrate layer ``i`` on the quantized stream ``xs``; ``ref`` is the float model's stream (for the
    drift metric). ``collect`` (if a dict) receives each linear's statistics by HF weight name;
    ``given`` (HF weight name -> importance) replaces them (``--imatrix``). Returns (tensors, next xs,
    next ref, report). ``dtype``: the layer's forward and the hidden states (``xs`` come in it; float32 or
    bfloat16, see ``CalibOptions.compute_dtype``); weights are always quantized from float32 values.

    Linears that read the same input (q/k/v, gate/up) share one ``X^T X`` (methods.SharedInputs), summed
    in float32 from products in ``dtype``, batch by batch, so no layer-wide activation is ever held but
    the hidden states themselves. ``pool`` runs the independent parts (pool.py): the float reference
    forward and the quantized forward, per batch, and each linear's and each routed expert's
    quantization. The statistics forward stays here, in batch order (its sums are order-dependent), and
    so does AWQ's scale search over the layer's groups. Every pool gives the same tensors, bit for bit.
    ``on_unit(done, total)``: after each linear or expert of this layer."""
    t0 = time.perf_counter()
    layer = dec.load_layer(i, dtype)
    ref_out = pool.forward(dec.runner, layer, ref) if ref is not None else None
    prefix = dec.prefix(i)
    linears = linear_modules(layer, prefix, formats)
    quota = math.ceil(opts.awq_tokens / max(len(xs), 1))
    shared = SharedInputs(
        lambda cols: InputStats(cols, method.full_hessian, opts.awq_tokens if method.awq else 0, dtype),
        quota if method.awq else 0,
    )
    hooks = [lin.register_forward_pre_hook(shared.hook(name, lin.in_features))
             for name, lin in linears.items()] if method.needs_stats else []
    capture = ExpertCapture.attach(layer, prefix, formats)
    ys_fp = []
    for x in xs:
        ys_fp.append(dec.forward(layer, x))
        shared.end_batch()
    for h in hooks:
        h.remove()
    if capture:
        capture.detach()
    stats = shared.stats

    out: Tensors = {}
    if method.awq:
        dtypes = {t.name: t.float_dtype for t in dec.by_layer.get(i, [])}
        out.update(apply_awq(layer, prefix, dec.config, stats, formats, opts, dtypes))
    n_units = len(linears) + (capture.n_experts if capture else 0)
    jobs = [
        (FORMATS[formats[f"{prefix}{name}.weight"]], lin.weight.data,
         use_stats(f"{prefix}{name}.weight", stats.get(name), collect, given), opts)
        for name, lin in linears.items()
    ]
    del stats
    shared.stats = {}  # the jobs hold the statistics now: each is freed as soon as its last linear is done
    qts = pool.map(method.linear, _drain(jobs), on_unit and (lambda k: on_unit(k, n_units)))
    for (name, lin), qt in zip(linears.items(), qts, strict=True):
        out[f"{prefix}{name}.weight"] = qt
        lin.weight.data = qt.dequantize().to(dtype)
    del qts
    coverage: list[dict] = []
    if capture:
        done = len(linears)
        q, coverage = capture.quantize(method, formats, opts, i, collect, given, pool,
                                       on_unit and (lambda k: on_unit(done + k, n_units)))
        out.update(q)

    ys_q = pool.forward(dec.runner, layer, xs)
    num = sum(float((yq - yf).double().square().sum()) for yq, yf in zip(ys_q, ys_fp, strict=True))
    den = sum(float((yf - x).double().square().sum()) for yf, x in zip(ys_fp, xs, strict=True))
    del ys_fp
    drift = None
    if ref_out is not None:
        d_num = sum(float((yq - yr).double().square().sum()) for yq, yr in zip(ys_q, ref_out, strict=True))
        drift = _rel(d_num, sum(float(yr.double().square().sum()) for yr in ref_out))
    n_q = sum(1 for v in out.values() if isinstance(v, QuantizedTensor))
    rep = LayerReport(i, _rel(num, den), drift, round(time.perf_counter() - t0, 3), n_q, coverage)
    return out, ys_q, ref_out, rep


def _drain(jobs: list) -> Iterator:
    """The jobs in order, each dropped from the list as it is handed out, so a job's statistics (a 1.4 GB
    down_proj Hessian at 7B) are freed when it finishes rather than when the whole layer does."""
    for k in range(len(jobs)):
        job, jobs[k] = jobs[k], None
        yield job
        del job


def _lm_head(dec: Decoder, xs: list[torch.Tensor], method: Method, formats: dict[str, str], opts: CalibOptions,
             collect: dict | None = None, given: dict[str, torch.Tensor] | None = None, pool: CalibPool = LOCAL):
    t = dec.others.get(Role.LM_HEAD)
    if t is None or t.name not in formats:
        return None, None
    w = dec.ckpt.load(t).to(torch.float32)
    stats = InputStats(w.shape[1], method.full_hessian, 0) if method.needs_stats else None
    if stats is not None:
        for x in xs:
            stats.add(dec.final_norm(x))
    # AWQ has no op before lm_head to fold a scale into; it rounds lm_head by RTN.
    qt = pool.map(method.linear, [(FORMATS[formats[t.name]], w, use_stats(t.name, stats, collect, given), opts)])[0]
    deq = qt.dequantize()
    # the error on the first HEAD_ERR_TOKENS tokens: over all of them it would cost two more full lm_head
    # products (at 7B x 128x512 tokens, 140 TFLOP: longer than calibrating lm_head itself)
    num = den = 0.0
    seen = 0
    for x in xs:
        if seen >= HEAD_ERR_TOKENS:
            break
        x = dec.final_norm(x).reshape(-1, w.shape[1])[: HEAD_ERR_TOKENS - seen]
        seen += x.shape[0]
        num += float((x @ (deq - w).T).double().square().sum())
        den += float((x @ w.T).double().square().sum())
    return {t.name: qt}, _rel(num, den)


HEAD_ERR_TOKENS = 8192


def calibrate(
    ckpt: Checkpoint,
    plan: Plan,
    method: str = "gptq",
    calib: str = "mixed",
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    options: CalibOptions | None = None,
    work_dir: str | None = None,
    progress: ProgressFn | None = None,
    batch: CalibBatch | None = None,
    collect: bool = False,
    given: dict[str, torch.Tensor] | None = None,
    pool: CalibPool | None = None,
) -> CalibResult:
    """Calibrate every quantized linear of ``plan`` layer by layer; see the module docstring.

    ``samples`` sequences of ``seqlen`` tokens are drawn from ``calib`` (a shipped set or a .txt/.jsonl
    file) with ``seed``, unless ``batch`` gives the token ids ([samples, seqlen] int64) directly; ``method``:
    gptq, awq, imatrix or rtn (``calib.methods.METHODS``). Returns ``CalibResult``: HF weight name ->
    QuantizedTensor in the plan's format (AWQ: also the rescaled float norms/linears), and per decoder layer
    the relative error of its update to the residual stream and the drift from the float model.
    ``work_dir``: per-layer results are kept there and a rerun with the same inputs resumes after the last
    finished layer. ``progress(done, total, detail)`` per layer.

    ``collect``: keep every calibrated linear's input statistics in ``CalibResult.stats`` (for
    ``--imatrix-out``; refused on a resumed run, whose earlier layers' statistics are gone).
    ``given``: HF weight name -> per-column importance used instead of the collected statistics
    (``--imatrix FILE``, method imatrix). ``pool``: where each layer's independent work runs (None:
    here; ``ray_executor.RayCalibPool``: Ray tasks, same tensors); a pool also reports each finished
    linear/expert through ``progress`` as ``units k/n`` of the current layer.

    Raises InputError (unknown method, bad calibration data or tokenizer, a stale or damaged ``work_dir``,
    ``collect`` on a resumed run, experts seeing fewer tokens than ``options.fail_below_tokens``),
    UnsupportedError (an architecture or checkpoint layout calibration does not handle) and the formats'
    BadWeightsError."""
    opts = options or CalibOptions()
    m = get_method(method)
    formats = {e.name: e.format for e in plan.entries if e.format}
    if batch is None:
        batch = calibration_batch(calib, load_tokenizer(ckpt.path), samples, seqlen, seed)
    dec = Decoder(ckpt)
    state = ResumeState(work_dir, fingerprint(ckpt, formats, method, opts, batch)) if work_dir else None
    # each finished layer's tensors go to disk at once (the work dir, or a temporary one): never all in memory
    tensors = state.store if state is not None else LayerStore()
    reports: list[LayerReport] = []
    stats: dict | None = {} if collect else None
    start = 0
    xs: list[torch.Tensor] | None = None
    ref: list[torch.Tensor] | None = None
    if state is not None and state.next_layer > 0:
        start = state.next_layer
        tensors, rows, xs, ref = state.load()
        reports = [LayerReport(**r) for r in rows]
        if collect:
            raise InputError(
                f"--imatrix-out: --work-dir {work_dir} resumes at layer {start}, and the statistics of layers "
                f"0..{start - 1} are not kept there; rerun without --work-dir (or with an empty one)"
            )
    tokens = int(batch.ids.numel())
    dtype, drift = opts.resolve(dec.forward_flop(tokens), dec.bf16_layers())
    if xs is None:
        xs = dec.embed_batches(list(batch.ids.split(opts.batch_size)), dtype)
        ref = [x.clone() for x in xs] if drift else None
    if progress:  # the ETA's baseline: layers already done (a resumed run) do not count as this run's speed
        progress(start, dec.n_layers, f"{method} on {tokens} tokens" + (f", resumed at layer {start}" if start else ""))
    with torch.inference_mode():
        for i in range(start, dec.n_layers):
            on_unit = None
            if pool is not None and progress:
                def on_unit(k: int, n: int, i: int = i) -> None:
                    progress(i, dec.n_layers, f"{method}, layer {i}: {k}/{n} units (linears, experts) done")
            out, xs, ref, rep = calibrate_layer(dec, i, xs, m, formats, opts, ref, stats, given, pool or LOCAL, on_unit,
                                                dtype)
            reports.append(rep)
            if state is not None:
                state.save(i, out, rep, xs, ref)
            else:
                tensors.put(f"layer-{i:05d}", out)
            del out
            if progress:
                progress(i + 1, dec.n_layers, f"{method}, {tokens} tokens; layer {i} output rel. err {rep.rel_err:.4f}")
        head, head_err = _lm_head(dec, xs, m, formats, opts, stats, given, pool or LOCAL) if opts.quantize_lm_head else (None, None)
    if head:
        tensors.put("lm_head", head)
    return CalibResult(tensors, reports, method, batch.describe(), start, head_err, stats or {})

