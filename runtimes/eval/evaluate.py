"""``dsq eval``: does a quantized model, in each runtime it ships to, behave like the reference?

Over the first ``chunks`` chunks of ``ctx`` tokens of a text, each candidate (a model file in a
runtime) is compared with the reference's next-token distribution at every scored position
(all but the first of each chunk): perplexity, KL(reference || candidate), top-1 agreement.

The reference's logits are computed once and cached compactly, keyed by the reference model's
contents, runtime, text and settings: per position the log-sum-exp of all its logits, the
log-probability of the true next token, and its most likely tokens (indices and logits): as many as
it takes to cover ``coverage`` (0.99) of the probability, at least ``kld.MIN_K`` and at most ``top_k``.

KL(reference || candidate) is computed from those tokens and a merged tail: see ``runtimes.eval.kld`` for
the bounds and their measured error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dsq.dsquant.errors import InputError

from ..base import file_size
from ..reasoning import Answer, answer_prompts, compare
from ..registry import choose, model_path
from .kld import keep_most_likely, kld_bounds, kld_histogram, log_softmax

SCHEMA = "dsq.eval/1"
CACHE_VERSION = 2

# Fixed probes a tokenizer must split exactly as the reference's does (plus the text's own start).
TOKENIZER_PROBES = (
    "Hello, world! 12345 678.9",
    "  leading spaces\tand\ttabs\n\nnew lines",
    "naïve café – ünïcödé 日本語 🙂",
    "def f(x):\n    return x ** 2  # code",
)

# Threshold flags: (flag, result field, passes when value <op> limit, what it measures).
CHECKS: tuple[tuple[str, str, str, str], ...] = (
    ("max_kld", "kld_mean", "<=", "mean KL divergence"),
    ("min_top1", "top1", ">=", "top-1 agreement"),
    ("max_ppl_ratio", "ppl_ratio", "<=", "perplexity / reference perplexity"),
    ("min_answer_agree", "answer_agree", ">=", "agreement with the reference's math answers"),
    ("max_loops", "loops", "<=", "greedy answers ending in a repetition loop"),
)
_OPS: dict[str, Callable[[float, float], bool]] = {"<=": lambda v, lim: v <= lim, ">=": lambda v, lim: v >= lim}


@dataclass(frozen=True)
class EvalSettings:
    ctx: int = 256
    chunks: int = 16
    top_k: int = 1024  # most reference tokens kept per position
    coverage: float = 0.99  # keep the most likely tokens until they hold this much probability
    device: str = "cpu"
    threads: int | None = None
    ref_runtime: str = "auto"
    ref_dtype: str | None = None  # torch reference: None = float32 on CPU
    cache_dir: Path | None = None
    reasoning_tokens: int = 0  # >0: also run the math prompts of dsq.runtimes.reasoning, this many new tokens


@dataclass
class RefData:
    """The reference's compact logits for every scored position (rows are chunk-major)."""

    ids: np.ndarray  # [chunks, ctx] int32: the token chunks scored
    topk_idx: np.ndarray  # [R, K] int32, R = chunks * (ctx - 1), most likely first
    topk_logit: np.ndarray  # [R, K] float32, -inf past a row's count
    topk_n: np.ndarray  # [R] int32, tokens kept in each row
    lse: np.ndarray  # [R] float32, log-sum-exp of all logits
    target_logp: np.ndarray  # [R] float32, log p(true next token)
    probes: list[list[int]]  # reference ids of TOKENIZER_PROBES + the text's start
    vocab_size: int
    add_bos: bool
    bos_id: int
    description: str

    def topk_logp(self) -> np.ndarray:
        return self.topk_logit - self.lse[:, None]

    def save(self, path: Path) -> None:
        meta = {"probes": self.probes, "vocab_size": self.vocab_size, "add_bos": self.add_bos,
                "bos_id": self.bos_id, "description": self.description, "version": CACHE_VERSION}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, ids=self.ids, topk_idx=self.topk_idx, topk_logit=self.topk_logit,
                                    topk_n=self.topk_n, lse=self.lse,
                                    target_logp=self.target_logp, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk or Ctrl-C leaves no half-written entry
            raise

    @classmethod
    def load(cls, path: Path) -> RefData | None:
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("version") != CACHE_VERSION:
                    return None
                arrays = {k: z[k] for k in ("ids", "topk_idx", "topk_logit", "topk_n", "lse", "target_logp")}
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None  # unreadable cache entry: recompute
        return cls(**arrays, probes=meta["probes"], vocab_size=meta["vocab_size"], add_bos=meta["add_bos"],
                   bos_id=meta["bos_id"], description=meta["description"])


@dataclass
class Result:
    """One model in one runtime (the reference itself is the first row)."""

    model: str
    runtime: str
    description: str
    file_size: int
    tokens: int
    ppl: float
    ppl_ratio: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    kld_upper_mean: float  # mean of the per-token upper bounds: the true mean KLD lies in [kld_mean, this]
    top1: float
    seconds: float
    is_reference: bool = False
    answer_agree: float | None = None  # reasoning check (None: not run)
    same_text: float | None = None
    loops: int | None = None
    answers: list[str | None] | None = None
    failures: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # the threshold flags applied (none: no verdict to give)
    kld_tokens: np.ndarray | None = field(default=None, repr=False)  # per-token KLD, for plots (not in JSON)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        """``ref``, ``PASS``/``FAIL`` against the thresholds asked for, or ``-`` when none was asked for."""
        if self.is_reference:
            return "ref"
        if not self.checks:
            return "-"
        return "PASS" if self.passed else "FAIL"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("kld_tokens")
        d["passed"] = self.passed if self.checks else None  # null: no threshold was asked for
        d["verdict"] = self.verdict
        d["kld_hist"] = kld_histogram(self.kld_tokens) if self.kld_tokens is not None else None
        return d


@dataclass
class Report:
    reference: str
    text: str
    text_sha256: str
    settings: dict
    thresholds: dict
    results: list[Result]
    ref_cached: bool

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def thresholds_asked(self) -> bool:
        return any(v is not None for v in self.thresholds.values())

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "reference": self.reference, "text": self.text, "text_sha256": self.text_sha256,
                "settings": self.settings, "thresholds": self.thresholds, "ref_cached": self.ref_cached,
                "passed": self.passed if self.thresholds_asked else None, "results": [r.to_json() for r in self.results]}


# -- cache ---------------------------------------------------------------------------------------------
_FINGERPRINT_FILES = ("*.json", "*.safetensors", "*.gguf", "*.onnx", "*.onnx.data", "*.data", "tokenizer.model")
_DIGESTS = "file-digests.json"  # in the cache dir: full-content digests keyed by the file's identity


def _identity(f: Path) -> str:
    """What changes whenever a file's content can have changed: size, mtime, ctime (not settable by
    users: any write or touch updates it), inode and device."""
    st = f.stat()
    return f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"


def file_digest(f: Path, memo: dict[str, str] | None = None) -> str:
    """SHA-256 of the whole file, read in 8 MiB pieces; ``memo`` maps ``_identity`` -> digest so an
    unchanged file is hashed once (a 16 GB reference: ~10 s the first time, nothing after)."""
    ident = _identity(f)
    if memo is not None and ident in memo:
        return memo[ident]
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[ident] = digest
    return digest


def model_fingerprint(path: Path, cache_dir: Path | None = None) -> str:
    """A hash of a model's full content: per file its name and SHA-256 (issue 13: sampling the first,
    middle and last MiB let a changed reference reuse stale logits). With ``cache_dir``, digests are
    remembered there by file identity (size, mtime, ctime, inode), so only changed files are re-read."""
    path = Path(path)
    files = [path] if path.is_file() else sorted({f for pat in _FINGERPRINT_FILES for f in path.glob(pat)})
    memo_file = Path(cache_dir) / _DIGESTS if cache_dir else None
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            loaded = json.loads(memo_file.read_text())
            memo = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(loaded, dict) else {}
        except (OSError, ValueError, RecursionError):
            memo = {}  # a damaged memo only costs a re-hash
    before = dict(memo)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:{file_digest(f, memo)}".encode())
    if memo_file is not None and memo != before:
        live = {k: v for k, v in memo.items() if Path(k.split("|", 1)[0]).exists()}  # forget deleted files
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(memo_file.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(live))
            os.replace(tmp, memo_file)
        except OSError:
            pass  # a full or read-only cache: the digests are recomputed next time
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSQ_CACHE", Path.home() / ".cache" / "dsq")) / "ref-logits"


# -- engine --------------------------------------------------------------------------------------------
def read_text(text_path: Path) -> str:
    p = Path(text_path)
    if not p.is_file():
        raise InputError(f"--text {p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--text {p}: not UTF-8 text ({e})") from None


def _chunks(ids: list[int], s: EvalSettings, text_path: Path) -> np.ndarray:
    n = len(ids) // s.ctx
    if n < 1:
        raise InputError(
            f"--text {text_path}: {len(ids)} tokens, shorter than one chunk of --ctx {s.ctx}; "
            "give a longer text or a smaller --ctx"
        )
    n = min(n, s.chunks)
    return np.asarray(ids[: n * s.ctx], dtype=np.int32).reshape(n, s.ctx)


def _model_input(chunk: np.ndarray, add_bos: bool, bos_id: int) -> tuple[list[int], int]:
    """The ids fed to a runtime for a chunk, and the row whose logits predict ``chunk[1]``."""
    ids = [int(t) for t in chunk]
    return ([bos_id, *ids], 1) if add_bos else (ids, 0)


def _probes(text: str) -> list[str]:
    return [*TOKENIZER_PROBES, text[:2000]]


def compute_reference(rt, text: str, text_path: Path, s: EvalSettings, log: Callable[[str], None]) -> RefData:
    ids = rt.tokenize(text)
    chunks = _chunks(ids, s, text_path)
    bos = rt.bos_id if rt.bos_id is not None else -1
    idx, logit, counts, lse, tgt = [], [], [], [], []
    inputs = [_model_input(chunk, rt.add_bos, bos) for chunk in chunks]
    batch = getattr(rt, "logits_batch", None)  # a layer-by-layer reference reads its weights once for all chunks
    stream = batch([i for i, _ in inputs], log) if batch else (rt.logits(i) for i, _ in inputs)
    for ci, (chunk, (_, first), full) in enumerate(zip(chunks, inputs, stream, strict=True)):
        log(f"reference chunk {ci + 1}/{len(chunks)}")
        lg = full[first : first + s.ctx - 1].astype(np.float64)
        top, tl, n = keep_most_likely(lg, s.coverage, s.top_k)
        m = lg.max(axis=1, keepdims=True)
        row_lse = (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))[:, 0]
        idx.append(top)
        logit.append(tl)
        counts.append(n)
        lse.append(row_lse.astype(np.float32))
        tgt.append((lg[np.arange(s.ctx - 1), chunk[1:]] - row_lse).astype(np.float32))
    width = max(a.shape[1] for a in idx)
    idx = [np.pad(a, ((0, 0), (0, width - a.shape[1])), mode="edge") for a in idx]
    logit = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-np.inf) for a in logit]
    return RefData(chunks, np.concatenate(idx), np.concatenate(logit), np.concatenate(counts), np.concatenate(lse),
                   np.concatenate(tgt), [rt.tokenize(t) for t in _probes(text)], rt.vocab_size, bool(rt.add_bos), bos,
                   rt.description)


def check_tokenizer(rt, ref: RefData, text: str, ref_path: Path) -> None:
    """Refuse a candidate whose tokenizer or vocabulary differs from the reference's: KLD would be meaningless."""
    if rt.vocab_size != ref.vocab_size:
        raise InputError(
            f"{rt.path}: vocabulary of {rt.vocab_size} logits, reference {ref_path} has {ref.vocab_size}; "
            "KL divergence needs the same tokenizer"
        )
    for probe, want in zip(_probes(text), ref.probes, strict=True):
        got = rt.tokenize(probe)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            raise InputError(
                f"{rt.path} ({rt.name}): its tokenizer splits {probe[:40]!r} differently from the reference "
                f"{ref_path} (first difference at token {at}); KL divergence over different tokens is meaningless"
            )


def score(rt, ref: RefData, s: EvalSettings, log: Callable[[str], None], label: str) -> dict:
    """Per-token stats of one loaded runtime against the reference."""
    ref_logp = ref.topk_logp().astype(np.float64)
    n = ref.ids.shape[1] - 1
    nll, lo, hi, agree = [], [], [], []
    inputs = [_model_input(chunk, ref.add_bos, ref.bos_id) for chunk in ref.ids]
    batch = getattr(rt, "logits_batch", None)
    stream = batch([i for i, _ in inputs], log) if batch else (rt.logits(i) for i, _ in inputs)
    for ci, (chunk, (_, first), full) in enumerate(zip(ref.ids, inputs, stream, strict=True)):
        log(f"{label}: chunk {ci + 1}/{len(ref.ids)}")
        logq = log_softmax(full[first : first + n])
        sl = slice(ci * n, (ci + 1) * n)
        nll.append(-logq[np.arange(n), chunk[1:]])
        width = int(ref.topk_n[sl].max())
        a, b = kld_bounds(ref.topk_idx[sl, :width], ref_logp[sl, :width], logq)
        lo.append(a)
        hi.append(b)
        agree.append(logq.argmax(axis=1) == ref.topk_idx[sl, 0])
    return {"nll": np.concatenate(nll), "kld": np.concatenate(lo), "kld_upper": np.concatenate(hi),
            "top1": np.concatenate(agree)}


def summarize(model: Path, rt, stats: dict, ref_ppl: float, seconds: float, is_ref: bool = False) -> Result:
    kld = stats["kld"]
    ppl = float(math.exp(stats["nll"].mean()))
    return Result(
        model=str(model), runtime=rt.name, description=rt.description, file_size=file_size(model),
        tokens=int(kld.size), ppl=ppl, ppl_ratio=ppl / ref_ppl, kld_mean=float(kld.mean()),
        kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()),
        kld_upper_mean=float(stats["kld_upper"].mean()), top1=float(stats["top1"].mean()), seconds=seconds,
        is_reference=is_ref, kld_tokens=kld,
    )


def apply_thresholds(results: list[Result], thresholds: dict[str, float | None]) -> None:
    for flag, fld, _, _ in CHECKS:
        if thresholds.get(flag) is not None and any(getattr(r, fld) is None for r in results):
            raise InputError(f"--{flag.replace('_', '-')} needs --reasoning N (the math-prompt check)")
    for r in results:
        if r.is_reference:
            continue
        for flag, fld, op, what in CHECKS:
            lim = thresholds.get(flag)
            if lim is None:
                continue
            r.checks.append(flag)
            v = getattr(r, fld)
            if not _OPS[op](v, lim):
                r.failures.append(f"{what} {v:.4g} fails --{flag.replace('_', '-')} {lim:g} (needs {op} {lim:g})")


def evaluate(
    candidates: list[tuple[Path, str]],
    ref_path: Path,
    text_path: Path,
    settings: EvalSettings,
    thresholds: dict[str, float | None],
    log: Callable[[str], None] = lambda m: None,
) -> Report:
    """Compare every (model, runtime spec) in ``candidates`` with the reference; thresholds fill ``failures``."""
    s = settings
    ref_path = model_path(ref_path)
    candidates = [(model_path(p), spec) for p, spec in candidates]
    for flag in ("min_answer_agree", "max_loops"):
        if thresholds.get(flag) is not None and not s.reasoning_tokens:
            raise InputError(f"--{flag.replace('_', '-')} needs --reasoning N (the math-prompt check)")
    if s.ctx < 2:
        raise InputError(f"--ctx {s.ctx}: a chunk needs at least 2 tokens")
    if not 0 < s.coverage <= 1 or s.top_k < 1 or s.chunks < 1:
        raise InputError(f"--coverage {s.coverage} must be in (0, 1], --top-k {s.top_k} and --chunks {s.chunks} >= 1")
    text = read_text(text_path)
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    ref_cls = choose(Path(ref_path), s.ref_runtime)[0]
    load_kw = {"threads": s.threads, "n_ctx": s.ctx + 1}
    key = hashlib.sha256(json.dumps(
        [CACHE_VERSION, model_fingerprint(ref_path, s.cache_dir or default_cache_dir()), ref_cls.name, s.ref_dtype, s.device, text_sha, s.ctx, s.chunks,
         s.top_k, s.coverage]).encode()).hexdigest()[:32]
    cache = Path(s.cache_dir or default_cache_dir())
    cache_file = cache / f"{key}.npz"
    ref = RefData.load(cache_file) if cache_file.is_file() else None
    cached = ref is not None
    answers_file = cache / f"{key}-answers-{s.reasoning_tokens}.json"
    ref_answers = _load_answers(answers_file) if s.reasoning_tokens else None
    ref_rt = None
    if ref is None or (s.reasoning_tokens and ref_answers is None):
        extra = {"log": log} if ref_cls.name == "torch" else {}
        log(f"loading the reference {Path(ref_path).name}")
        ref_rt = ref_cls.load(Path(ref_path), s.device, dtype=s.ref_dtype, **extra,
                              **{**load_kw, "n_ctx": max(s.ctx + 1, s.reasoning_tokens + 256 if s.reasoning_tokens else 0)})
    if s.reasoning_tokens and ref_answers is None:
        log("reference: math prompts")
        ref_answers = answer_prompts(ref_rt, s.reasoning_tokens)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            answers_file.write_text(json.dumps([asdict(a) for a in ref_answers]))
        except OSError as e:  # a full or read-only cache costs a recompute next time, not this run
            log(f"reference answers not cached ({e.strerror}: {cache})")
    if ref is None:
        t0 = time.perf_counter()
        ref = compute_reference(ref_rt, text, text_path, s, log)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            ref.save(cache_file)
            log(f"reference logits cached: {cache_file} ({cache_file.stat().st_size / 1e6:.1f} MB, "
                f"{time.perf_counter() - t0:.1f}s)")
        except OSError as e:  # a full or read-only cache costs a recompute next time, not this run
            log(f"reference logits not cached ({e.strerror}: {cache})")
    ref_ppl = float(math.exp(-ref.target_logp.mean()))
    results = [Result(
        model=str(ref_path), runtime=ref_cls.name, description=ref.description, file_size=_size(ref_path),
        tokens=int(ref.target_logp.size), ppl=ref_ppl, ppl_ratio=1.0, kld_mean=0.0, kld_median=0.0, kld_p99=0.0,
        kld_max=0.0, kld_upper_mean=0.0, top1=1.0, seconds=0.0, is_reference=True,
    )]
    if ref_answers is not None:
        for k, v in compare(ref_answers, ref_answers).items():
            setattr(results[0], k, v)
    if ref_rt is not None:
        ref_rt.close()

    for path, spec in candidates:
        for cls in choose(Path(path), spec):
            t0 = time.perf_counter()
            kw = {**load_kw, "n_ctx": max(s.ctx + 1, s.reasoning_tokens + 256 if s.reasoning_tokens else 0)}
            log(f"loading {Path(path).name} [{cls.name}]")
            with cls.load(Path(path), s.device, **kw) as rt:
                check_tokenizer(rt, ref, text, Path(ref_path))
                label = f"{Path(path).name} [{cls.name}]"
                stats = score(rt, ref, s, log, label)
                res = summarize(Path(path), rt, stats, ref_ppl, time.perf_counter() - t0)
                if ref_answers is not None:
                    log(f"{label}: math prompts")
                    for k, v in compare(ref_answers, answer_prompts(rt, s.reasoning_tokens)).items():
                        setattr(res, k, v)
                results.append(res)
    apply_thresholds(results, thresholds)
    return Report(str(ref_path), str(text_path), text_sha,
                  {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
                  dict(thresholds), results, cached)


def _load_answers(path: Path):
    if not path.is_file():
        return None
    try:
        return [Answer(**a) for a in json.loads(path.read_text())]
    except (json.JSONDecodeError, TypeError):
        return None


def _size(path: Path) -> int:
    return file_size(path)
