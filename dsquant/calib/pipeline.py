"""Sequential layer-by-layer calibration, with transformers' own decoder-layer modules.

Embed the calibration tokens, then for each decoder layer in turn: load only that layer's weights
from the checkpoint, run transformers' ``<Arch>DecoderLayer`` on the current hidden states with
hooks that collect each linear's input statistics (routed experts: through the router's top-k, see
moe_coverage.py), quantize the layer's linears with the chosen method, and run the *quantized*
layer to produce the next layer's inputs (as GPTQ's reference driver does). Peak memory is one
layer in float32 plus the hidden states of the calibration batch, whatever the model size.

The result maps HF tensor names to a :class:`QuantizedTensor` (in the plan's format) or, for AWQ,
to float tensors it rescaled (norms, unquantized linears); everything else is untouched and goes
through the ordinary round-to-nearest path of ``quantize_checkpoint``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import time
from collections.abc import Callable
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
from .methods import CalibOptions, InputStats, Method, get_method, use_stats
from .moe_coverage import ExpertCapture, fuse_experts
from .resume import ResumeState, fingerprint

Tensors = dict[str, QuantizedTensor | torch.Tensor]
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
    tensors: Tensors
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

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` in float32 with the checkpoint's weights (only this layer's are read)."""
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        prefix = self.prefix(i)
        state: dict[str, torch.Tensor] = {}
        experts: dict[str, torch.Tensor] = {}
        for t in self.by_layer.get(i, []):
            data = self.ckpt.load(t).to(torch.float32)
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

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.ckpt.load(self.others[Role.EMBED]).to(torch.float32)
        return w[ids]

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(x.shape[1]).unsqueeze(0)
        pe = self.rotary(x, pos)
        # no KV cache here; transformers >= 5.24 calls the argument `cache` and warns on `past_key_values`
        no_cache = {"cache" if "cache" in _params(create_causal_mask) else "past_key_values": None}
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None, position_ids=pos, **no_cache)
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """model.norm (RMSNorm in every supported architecture)."""
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
) -> tuple[Tensors, list[torch.Tensor], list[torch.Tensor] | None, LayerReport]:
    """Calibrate layer ``i`` on the quantized stream ``xs``; ``ref`` is the float model's stream (for the
    drift metric). ``collect`` (if a dict) receives each linear's statistics by HF weight name;
    ``given`` (HF weight name -> importance) replaces them (``--imatrix``). Returns (tensors, next xs,
    next ref, report)."""
    t0 = time.perf_counter()
    layer = dec.load_layer(i)
    ref_out = [dec.forward(layer, x) for x in ref] if ref is not None else None
    prefix = dec.prefix(i)
    linears = linear_modules(layer, prefix, formats)
    stats: dict[str, InputStats] = {}
    hooks = []
    quota = math.ceil(opts.awq_tokens / max(len(xs), 1))
    if method.needs_stats:
        for name, lin in linears.items():
            st = stats[name] = InputStats(lin.in_features, method.full_hessian, opts.awq_tokens if method.awq else 0)
            hooks.append(lin.register_forward_pre_hook(lambda _m, args, st=st: st.add(args[0], quota)))
    capture = ExpertCapture.attach(layer, prefix, formats)
    ys_fp = [dec.forward(layer, x) for x in xs]
    for h in hooks:
        h.remove()
    if capture:
        capture.detach()

    out: Tensors = {}
    if method.awq:
        dtypes = {t.name: t.float_dtype for t in dec.by_layer.get(i, [])}
        out.update(apply_awq(layer, prefix, dec.config, stats, formats, opts, dtypes))
    for name, lin in linears.items():
        hf = f"{prefix}{name}.weight"
        qt = method.linear(FORMATS[formats[hf]], lin.weight.data, use_stats(hf, stats.get(name), collect, given), opts)
        out[hf] = qt
        lin.weight.data = qt.dequantize()
    stats.clear()
    coverage: list[dict] = []
    if capture:
        q, coverage = capture.quantize(method, formats, opts, i, collect, given)
        out.update(q)

    ys_q = [dec.forward(layer, x) for x in xs]
    num = sum(float((yq - yf).double().square().sum()) for yq, yf in zip(ys_q, ys_fp, strict=True))
    den = sum(float((yf - x).double().square().sum()) for yf, x in zip(ys_fp, xs, strict=True))
    drift = None
    if ref_out is not None:
        d_num = sum(float((yq - yr).double().square().sum()) for yq, yr in zip(ys_q, ref_out, strict=True))
        drift = _rel(d_num, sum(float(yr.double().square().sum()) for yr in ref_out))
    n_q = sum(1 for v in out.values() if isinstance(v, QuantizedTensor))
    rep = LayerReport(i, _rel(num, den), drift, round(time.perf_counter() - t0, 3), n_q, coverage)
    return out, ys_q, ref_out, rep


def _lm_head(dec: Decoder, xs: list[torch.Tensor], method: Method, formats: dict[str, str], opts: CalibOptions,
             collect: dict | None = None, given: dict[str, torch.Tensor] | None = None):
    t = dec.others.get(Role.LM_HEAD)
    if t is None or t.name not in formats:
        return None, None
    w = dec.ckpt.load(t).to(torch.float32)
    stats = InputStats(w.shape[1], method.full_hessian, 0) if method.needs_stats else None
    normed = [dec.final_norm(x) for x in xs]
    if stats is not None:
        for x in normed:
            stats.add(x)
    # AWQ has no op before lm_head to fold a scale into; it rounds lm_head by RTN.
    qt = method.linear(FORMATS[formats[t.name]], w, use_stats(t.name, stats, collect, given), opts)
    deq = qt.dequantize()
    num = sum(float((x @ (deq - w).T).double().square().sum()) for x in normed)
    den = sum(float((x @ w.T).double().square().sum()) for x in normed)
    return {t.name: qt}, _rel(num, den)


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
    (``--imatrix FILE``, method imatrix).

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
    tensors: Tensors = {}
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
    if xs is None:
        xs = [dec.embed(ids) for ids in batch.ids.split(opts.batch_size)]
        ref = [x.clone() for x in xs] if opts.track_drift else None
    tokens = int(batch.ids.numel())
    if progress:  # the ETA's baseline: layers already done (a resumed run) do not count as this run's speed
        progress(start, dec.n_layers, f"{method} on {tokens} tokens" + (f", resumed at layer {start}" if start else ""))
    with torch.inference_mode():
        for i in range(start, dec.n_layers):
            out, xs, ref, rep = calibrate_layer(dec, i, xs, m, formats, opts, ref, stats, given)
            tensors.update(out)
            reports.append(rep)
            if state is not None:
                state.save(i, out, rep, xs, ref)
            if progress:
                progress(i + 1, dec.n_layers, f"{method}, {tokens} tokens; layer {i} output rel. err {rep.rel_err:.4f}")
        head, head_err = _lm_head(dec, xs, m, formats, opts, stats, given) if opts.quantize_lm_head else (None, None)
    if head:
        tensors.update(head)
    return CalibResult(tensors, reports, method, batch.describe(), start, head_err, stats or {})

