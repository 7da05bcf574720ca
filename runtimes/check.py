"""``dsq check EXPORT --ref MODEL``: does an export behave like its source model, with the runtime's own tokenizer?

``dsq eval`` feeds the same token ids to every runtime, so a wrong BOS, end-of-generation set or chat
template passes it. This check runs the runtime's *own* tokenizer and template engine — llama.cpp's
vocabulary through llama-cpp-python (``Llama(vocab_only=True)``, and llama-cpp-python's
``Jinja2ChatFormatter`` with the GGUF's template and its BOS/EOS texts, as its chat handler does), and
onnxruntime-genai's tokenizer for ONNX folders when ``onnxruntime_genai`` is installed — against
transformers on the reference on a fixed battery:

* token ids with special tokens added as each side adds them (so BOS/EOS behaviour is compared);
* the chat template the export carries (it must be the one transformers uses), the prompt the runtime's
  engine renders from it for a multi-turn conversation with a ``<think>`` block (with the generation
  prompt), and the ids of transformers' prompt through the runtime's tokenizer;
* the end-of-generation set (:func:`resolve_tokenizer`'s ``eog_ids`` of the reference);
* the greedy first 16 tokens of a prompt: the reference (torch on the reference checkpoint) generates
  them; the runtime, fed the same prefix, must pick the same argmax at each step (teacher-forced).

A difference fails, naming the first mismatch (input, token index, both ids and pieces), except where the
runtime cannot do what the tokenizer asks: text a normalizer (NFC) changes, a template its engine
renders differently from Jinja, llama.cpp's name-based end-of-generation tokens beyond the model's, a
greedy step where quantization changes the argmax (reported as agreement, since ``dsq eval`` is the
accuracy gate). Those are warnings listing the inputs. onnxruntime-genai's ``encode`` adds no special
tokens unless ``update_options(add_special_tokens="true")``; the check compares it in that mode.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsq.dsquant.errors import DsqError, InputError
from dsq.dsquant.tokenizer_facts import TokenizerFacts, resolve_tokenizer

from .base import model_format

BATTERY: tuple[tuple[str, str], ...] = (
    ("ascii", "The answer is 42. Hello, world!"),
    ("digits", "3.14159 2718281828 1,000,000 and 0x1F 2026-11-30"),
    ("cjk", "日本語のテキスト、中文文本。한국어 문장"),
    ("emoji", "🙂 👍🏽 🇫🇷 👨‍👩‍👧 ok"),
    ("code", "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # 🙂\n"),
    ("whitespace", "a  b   c\t\td\n\n\ne    \n  f   "),
    ("nfd", "cafe\u0301 Ame\u0301lie n\u0303"),  # decomposed accents: an NFC normalizer composes them
)
CHAT: list[dict[str, str]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": "<think>\n6*7 = 42, no tricks.\n</think>\n\n42"},
    {"role": "user", "content": "And 6*8?"},
]
GREEDY_PROMPT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April"
GREEDY_TOKENS = 16
GREEDY_AFTER_EXPORT_BYTES = 1_500_000_000  # ~0.7B parameters in bf16: loads and runs 16 steps in seconds


@dataclass
class Row:
    check: str
    input: str
    status: str  # ok | warn | fail | skip
    detail: str = ""


@dataclass
class CheckReport:
    export: str
    ref: str
    runtime: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def add(self, check: str, inp: str, status: str, detail: str = "") -> None:
        self.rows.append(Row(check, inp, status, detail))

    def to_json(self) -> dict:
        return {"export": self.export, "ref": self.ref, "runtime": self.runtime, "passed": self.passed,
                "first_failure": self.first_failure, "seconds": round(self.seconds, 2),
                "rows": [r.__dict__ for r in self.rows]}

    @property
    def first_failure(self) -> str | None:
        f = self.failed
        return f"{f[0].check} [{f[0].input}]: {f[0].detail}" if f else None


# -- the runtimes' own tokenizers ---------------------------------------------------------------------
class _LlamaSide:
    """llama.cpp's vocabulary and llama-cpp-python's chat formatter for a GGUF file."""

    name = "llama-cpp"

    def __init__(self, path: Path):
        from llama_cpp import Llama

        from .llama_cpp_runtime import _quiet_stderr, check_gguf

        self.path = path
        check_gguf(path)  # absurd hyperparameters abort llama.cpp's process: refuse them first
        with _quiet_stderr():
            try:
                self.llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
            except ValueError as e:
                raise InputError(f"{path}: llama.cpp cannot load this GGUF ({e})") from None

    def encode(self, text: str) -> list[int]:
        """Ids with the special tokens llama.cpp adds itself (BOS/EOS per the GGUF); specials in text parsed."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def encode_plain(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def piece(self, tid: int) -> str:
        return self.llm.detokenize([tid], special=True).decode("utf-8", "replace")

    def template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def render_chat(self, messages: list[dict]) -> str | None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.template()
        if not template:
            return None
        model = self.llm._model

        def text(tid: int) -> str:
            return model.token_get_text(tid) if tid != -1 else ""

        fmt = Jinja2ChatFormatter(template=template, eos_token=text(self.llm.token_eos()),
                                  bos_token=text(self.llm.token_bos()), add_generation_prompt=True)
        return fmt(messages=messages).prompt

    def eog_ids(self) -> set[int]:
        import llama_cpp

        vocab = self.llm._model.vocab
        return {t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}

    def written_eog_ids(self) -> set[int]:
        """The end ids the GGUF itself states (eos/eot/eom keys). llama.cpp adds more on its own: tokens it
        knows by name (``</s>``, ``<|endoftext|>``, ...) become end-of-generation whatever the file says."""
        meta = self.llm.metadata
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        return {int(meta[k]) for k in keys if str(meta.get(k, "")).lstrip("-").isdigit()}

    def close(self) -> None:
        self.llm.close()


class _GenaiSide:
    """onnxruntime-genai's tokenizer (onnxruntime-extensions) and its genai_config.json for an ONNX folder."""

    name = "onnxruntime-genai"

    def __init__(self, path: Path):
        import onnxruntime_genai as og

        from dsq.export.onnx_guard import check_genai_dir

        self.path = path
        self.og = og
        check_genai_dir(path)  # genai loads the decoder and its external data: refuse reads outside the folder
        try:
            config = og.Config(str(path))
            config.clear_providers()  # the tokenizer is all the check needs: CPU, whatever EP the export targets
            # from the config alone: og.Model would load the decoder's weights (6.9 GB peak RSS for a 7B int4 export)
            self.model = None
            self.tok = og.Tokenizer(config)
        except Exception as e:  # noqa: BLE001 - genai raises its own RuntimeError kinds; the message says which
            raise InputError(f"{path}: onnxruntime-genai cannot load this folder ({str(e).splitlines()[0]})") from None
        cfg = json.loads((path / "genai_config.json").read_text())
        eos = cfg["model"].get("eos_token_id")
        self._eog = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tcfg = path / "tokenizer_config.json"
        self._template = json.loads(tcfg.read_text()).get("chat_template") if tcfg.is_file() else None

    def _encode(self, text: str, special: bool) -> list[int]:
        # genai's encode adds no special tokens unless asked; asked, it adds BOS/EOS as its config says.
        self.tok.update_options(add_special_tokens="true" if special else "false")
        return [int(i) for i in self.tok.encode(text)]

    def encode(self, text: str) -> list[int]:
        return self._encode(text, True)

    def encode_plain(self, text: str) -> list[int]:
        return self._encode(text, False)

    def template(self) -> str | None:
        return self._template if isinstance(self._template, str) else None

    def piece(self, tid: int) -> str:
        return self.tok.decode([tid])

    def render_chat(self, messages: list[dict]) -> str | None:
        if not hasattr(self.tok, "apply_chat_template"):
            return None
        try:
            return self.tok.apply_chat_template(messages=json.dumps(messages), add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - genai without a template engine for this template: not comparable
            return None

    def eog_ids(self) -> set[int]:
        return set(self._eog)

    def close(self) -> None:
        self.tok = self.model = None


def _runtime_side(export: Path):
    kind = model_format(export)
    if kind == "gguf":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise InputError(f"{export}: checking a GGUF needs llama-cpp-python: pip install 'dsq[llama-cpp]'") from None
        path = export if export.is_file() else next(export.glob("*.gguf"))
        return _LlamaSide(path)
    if kind == "onnx":
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            return None
        return _GenaiSide(export if export.is_dir() else export.parent)
    raise InputError(f"{export}: not a GGUF file or an ONNX export folder; `dsq check` checks exports")


# -- comparisons ------------------------------------------------------------------------------------
def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _describe(i: int, ref: list[int], got: list[int], ref_piece, got_piece) -> str:
    def at(ids, piece):
        return f"{ids[i]} {piece(ids[i])!r}" if i < len(ids) else "(end)"

    return f"token {i}: reference {at(ref, ref_piece)} vs runtime {at(got, got_piece)}"


def _normalizes(facts: TokenizerFacts, text: str) -> bool:
    """Whether the reference's normalizer changes ``text`` (what a runtime without it cannot reproduce)."""
    if not facts.normalizer:
        return False
    norm = _build_normalizer(facts.normalizer)
    return norm is None or norm.normalize_str(text) != text


def _build_normalizer(spec: dict):
    from tokenizers import Tokenizer

    try:
        tj = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"},
              "normalizer": spec}
        return Tokenizer.from_str(json.dumps(tj)).normalizer
    except Exception:  # noqa: BLE001 - a normalizer `tokenizers` cannot build is reported as "may differ"
        return None


def check_export(export: str | Path, ref: str | Path, *, greedy: bool = True, threads: int | None = None) -> CheckReport:
    """Compare ``export`` (a .gguf, or an ONNX folder) with transformers on ``ref`` (an HF directory, hub id
    or ``default``); ``greedy``: also the teacher-forced greedy 16 tokens against torch on ``ref``.

    Returns a :class:`CheckReport`; raises :class:`InputError` for a path that is not an export, a
    reference without a tokenizer, or a missing runtime package for a GGUF.
    """
    from transformers import AutoTokenizer

    from dsq.dsquant.checkpoint import resolve

    t0 = time.perf_counter()
    export, ref = Path(export), resolve(ref)
    facts = resolve_tokenizer(ref)
    if facts.effective_tokenizer is None and facts.tokenizer_class == "none":
        raise InputError(f"--ref {ref}: no tokenizer files; give the source model folder")
    try:
        hf = AutoTokenizer.from_pretrained(str(ref))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the message says which
        raise InputError(f"--ref {ref}: transformers cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    side = _runtime_side(export)
    report = CheckReport(str(export), str(ref), side.name if side else "onnxruntime-genai")
    if side is None:
        report.add("tokenizer", "all", "skip", "onnxruntime-genai is not installed: pip install 'dsq[genai]'")
        report.seconds = time.perf_counter() - t0
        return report
    try:
        _check_tokens(report, facts, hf, side)
        _check_chat(report, facts, hf, side)
        _check_eog(report, facts, side)
        if greedy:
            _check_greedy(report, export, ref, hf, side, threads)
    finally:
        side.close()
    report.seconds = time.perf_counter() - t0
    return report


def _ref_piece(hf):
    return lambda tid: hf.decode([int(tid)])


def _check_tokens(report: CheckReport, facts: TokenizerFacts, hf, side) -> None:
    specials = [t.content for t in facts.added if t.special][:3]
    battery = [*BATTERY, ("specials", "say " + " and ".join(specials) + " in text" if specials else "no specials")]
    for name, text in battery:
        ref_ids = list(hf(text, add_special_tokens=True)["input_ids"])
        got = side.encode(text)
        if got == ref_ids:
            report.add("token ids", name, "ok", f"{len(ref_ids)} tokens")
            continue
        i = _first_diff(ref_ids, got)
        detail = _describe(i, ref_ids, got, _ref_piece(hf), side.piece)
        if _normalizes(facts, text):
            report.add("token ids", name, "warn",
                       f"the reference normalizes this text ({'+'.join(facts.normalizer_names)}), "
                       f"{side.name} does not: {detail}")
        elif i == 0 and (ref_ids[:1] == [facts.bos_id]) != (got[:1] == [facts.bos_id]):
            report.add("BOS", name, "fail", f"{detail} (transformers {'adds' if facts.add_bos else 'adds no'} BOS)")
        else:
            report.add("token ids", name, "fail", detail)


def _check_chat(report: CheckReport, facts: TokenizerFacts, hf, side) -> None:
    if not facts.chat_template:
        report.add("chat prompt", "multi-turn <think>", "skip", "the reference has no chat template")
        return
    ref_prompt = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    held = side.template()
    if held != facts.chat_template:
        report.add("chat template", "template text", "fail",
                   "the export carries no chat template" if not held else
                   f"the export's chat template is not the one transformers uses ({len(held)} vs "
                   f"{len(facts.chat_template)} chars, from {facts.sources.get('chat_template')})")
        return
    got_prompt = side.render_chat(CHAT)
    if got_prompt is None:
        report.add("chat prompt", "multi-turn <think>", "warn", f"{side.name} exposes no chat template engine to compare")
    elif got_prompt != ref_prompt:
        # Same template text, another result: the runtime's template engine, not the export.
        i = next((k for k, (a, b) in enumerate(zip(ref_prompt, got_prompt, strict=False)) if a != b),
                 min(len(ref_prompt), len(got_prompt)))
        report.add("chat prompt", "multi-turn <think>", "warn",
                   f"{side.name}'s template engine renders the same template differently at char {i}: "
                   f"reference {ref_prompt[i:i + 24]!r} vs runtime {got_prompt[i:i + 24]!r}")
    else:
        report.add("chat prompt", "multi-turn <think>", "ok", f"{len(ref_prompt)} chars")
    ref_ids = list(hf(ref_prompt, add_special_tokens=False)["input_ids"])
    got = side.encode_plain(ref_prompt)
    if got == ref_ids:
        report.add("chat ids", "multi-turn <think>", "ok", f"{len(ref_ids)} tokens")
    else:
        i = _first_diff(ref_ids, got)
        report.add("chat ids", "multi-turn <think>", "fail", _describe(i, ref_ids, got, _ref_piece(hf), side.piece))


def _check_eog(report: CheckReport, facts: TokenizerFacts, side) -> None:
    want, got = set(facts.eog_ids), side.eog_ids()
    missing = sorted(want - got)
    extra = sorted(got - want)
    ordinary = [t for t in extra if t not in facts.special_ids]
    by_id = {i: s for s, i in facts.vocab.items()}
    if missing:
        report.add("end of generation", "eog set", "fail",
                   f"{side.name} does not stop at {[(t, by_id.get(t)) for t in missing]} (reference stops at "
                   f"{sorted(want)})")
    elif ordinary and (written := getattr(side, "written_eog_ids", lambda: set(ordinary))()) & set(ordinary):
        wrong = sorted(written & set(ordinary))
        report.add("end of generation", "eog set", "fail",
                   f"{side.name} stops at ordinary token(s) {[(t, by_id.get(t)) for t in wrong]} the export names "
                   "as end-of-generation")
    elif ordinary:  # not in the file: llama.cpp's own by-name rule, which no GGUF key can switch off
        report.add("end of generation", "eog set", "warn",
                   f"{side.name} also stops at ordinary token(s) {[(t, by_id.get(t)) for t in ordinary]}: it treats "
                   "tokens with these names as end-of-generation whatever the GGUF says (any GGUF of this model "
                   "does the same); the model stops early if it writes one")
    elif extra:
        report.add("end of generation", "eog set", "warn",
                   f"{side.name} also stops at special token(s) {[(t, by_id.get(t)) for t in extra]} (known by name)")
    else:
        report.add("end of generation", "eog set", "ok", str(sorted(want)))


def _check_greedy(report: CheckReport, export: Path, ref: Path, hf, side, threads) -> None:
    """Reference greedy continuation (torch), then the runtime's argmax on the same prefixes (teacher-forced)."""
    import numpy as np

    from .registry import load

    ids = list(hf(GREEDY_PROMPT, add_special_tokens=True)["input_ids"])
    try:
        with load(ref, "torch", threads=threads) as rt:
            seq = list(ids)
            row = rt.prefill(seq)
            for _ in range(GREEDY_TOKENS):
                tok = int(np.argmax(row))
                seq.append(tok)
                row = rt.decode(tok)
            ref_logits = rt.logits(seq)
    except DsqError as e:  # e.g. a quantized MoE checkpoint transformers cannot load on this machine
        report.add("greedy 16", "prompt", "skip", f"torch cannot run the reference: {e}")
        return
    runtime = "llama-cpp" if side.name == "llama-cpp" else "onnxruntime"
    try:
        with load(export, runtime, threads=threads, n_ctx=max(64, len(seq) + 1)) as rt:
            got_logits = rt.logits(seq)
    except DsqError as e:
        report.add("greedy 16", "prompt", "fail", f"{runtime} cannot run the export: {e}")
        return
    n = len(ids)
    ref_next = [int(x) for x in np.argmax(ref_logits[n - 1 : -1], axis=-1)]
    got_next = [int(x) for x in np.argmax(got_logits[n - 1 : -1], axis=-1)]
    agree = sum(a == b for a, b in zip(ref_next, got_next, strict=True))
    status = "ok" if agree == len(ref_next) else "warn"
    detail = f"{agree}/{len(ref_next)} greedy steps agree"
    if agree < len(ref_next):
        i = _first_diff(ref_next, got_next)
        detail += "; first: " + _describe(i, ref_next, got_next, _ref_piece(hf), side.piece) + " (quantization)"
    report.add("greedy 16", "prompt", status, detail)


def print_report(report: dict) -> None:
    """The check's table (``CheckReport.to_json()``) on stderr, so stdout stays machine-readable."""
    from rich.markup import escape
    from rich.table import Table

    from dsq.dsquant.render import make_console

    console = make_console(stderr=True)
    if "skipped" in report:
        console.print(f"[yellow]check skipped[/]: {escape(report['skipped'])}")
        return
    colors = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
    table = Table(title=escape(f"dsq check: {report['export']} ({report['runtime']}) vs transformers on {report['ref']}"))
    for col in ("check", "input", "result", "detail"):
        table.add_column(col, overflow="fold")
    for r in report["rows"]:
        table.add_row(escape(r["check"]), escape(r["input"]), f"[{colors[r['status']]}]{r['status']}[/]",
                      escape(r["detail"]))
    console.print(table)
    warns = [r["input"] for r in report["rows"] if r["status"] == "warn"]
    if warns:
        console.print(f"[yellow]warning[/]: {report['runtime']} cannot reproduce the reference on: "
                      f"{escape(', '.join(warns))}")


def check_after_export(source: str | Path, out: Path, report: dict) -> dict:
    """The check ``dsq export`` runs on what it wrote, against its own source (an HF folder with a tokenizer).

    Returns the check's JSON (``skipped`` with a reason when the source has no tokenizer or the runtime
    package is missing); for an ONNX folder it is also written into ``onnx-report.json``. The greedy
    comparison loads both models, so it runs here only for references up to
    ``GREEDY_AFTER_EXPORT_BYTES`` of weights (seconds on a CPU); ``dsq check`` always runs it.
    """
    from dsq.dsquant.checkpoint import resolve
    from dsq.dsquant.paths import resolve_model_file

    src = resolve(source)
    target = Path(report.get("output") or out)
    if model_format(target) not in ("gguf", "onnx"):  # MLX: mlx_lm tokenizes with transformers on the copied files
        return {"skipped": f"{target}: dsq check compares llama.cpp's and onnxruntime-genai's own tokenizers; "
                           "this export's runtime uses transformers' tokenizer from the copied files"}
    if not any(resolve_model_file(src, f) for f in ("tokenizer.json", "tokenizer_config.json")):
        return {"skipped": f"{src}: no tokenizer files to check against"}
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    greedy = weights <= GREEDY_AFTER_EXPORT_BYTES
    try:
        result = check_export(target, src, greedy=greedy).to_json()
        if not greedy:
            result["rows"].append(Row("greedy 16", "prompt", "skip", f"reference of {weights / 1e9:.1f} GB: run "
                                      "`dsq check` for the greedy comparison").__dict__)
    except InputError as e:
        if "pip install" not in str(e):
            raise
        return {"skipped": str(e)}
    if target.is_dir() and (rep := target / "onnx-report.json").is_file():
        data = json.loads(rep.read_text())
        data["check"] = result
        rep.write_text(json.dumps(data, indent=2))
    return result
