"""Calibration data: the shipped sets (``calib_data/MANIFEST.json``), user files, and seeded sampling.

A calibration *source* is a shipped set name (``dsq calib list``), a mix of them (``mixed``, the
default: about 480k tokens of English and Chinese prose, Python code and ``<think>`` math reasoning,
counted with SmolLM2's tokenizer), or a user file: ``.txt`` (one text) or ``.jsonl`` (one document a
line, either ``{"text": ...}`` or ``{"messages": [{"role", "content"}, ...]}``), each optionally
gzipped (``.txt.gz``, ``.jsonl.gz``). Chat documents are rendered through the model's own chat
template, so a reasoning distill is calibrated on ``<think>`` turns in the exact shape it writes them
(see :func:`render`: the reply is never passed through the template).

Sampling: each source becomes one token stream (documents joined as the tokenizer renders them,
separated by EOS). Each stream is cut into whole windows of ``seqlen`` tokens at a seeded phase; the
windows of all the sources are pooled and drawn without replacement, so no two samples share a token
while the sources have enough of them, and each source's share of the batch follows its size. When
``samples`` windows exceed what the sources hold, one warning line says so and further passes draw
windows at new phases (text then repeats). A stream shorter than ``seqlen`` is one window read
cyclically (it wraps around through an EOS) instead of padded, so no attention mask is needed. The
batch is a pure function of (source files, tokenizer, samples, seqlen, seed).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..errors import InputError
from ..sandbox import pick_template, render_chat_template

DATA_DIR = Path(__file__).resolve().parents[2] / "calib_data"
MANIFEST = DATA_DIR / "MANIFEST.json"
DEFAULT_SOURCE = "mixed"
log = logging.getLogger("dsq.calib")

Document = str | list[dict]  # plain text, or chat messages


@dataclass(frozen=True)
class CalibSet:
    name: str
    file: Path
    kind: str  # text | chat
    description: str
    source: str
    licence: str

    @property
    def nbytes(self) -> int:
        return self.file.stat().st_size

    @property
    def sha256(self) -> str:
        """Of the shipped file's bytes (compressed, for a .gz)."""
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    def text(self) -> str:
        """The set's UTF-8 text, decompressed."""
        return read_text(self.file)


@cache
def _manifest() -> tuple[dict[str, CalibSet], dict[str, tuple[str, ...]]]:
    data = json.loads(MANIFEST.read_text())
    sets = {
        s["name"]: CalibSet(s["name"], DATA_DIR / s["file"], s["kind"], s["description"], s["source"], s["licence"])
        for s in data["sets"]
    }
    mixes = {name: tuple(parts) for name, parts in data.get("mixes", {}).items()}
    return sets, mixes


def shipped_sets() -> dict[str, CalibSet]:
    return _manifest()[0]


def mixes() -> dict[str, tuple[str, ...]]:
    return _manifest()[1]


def list_sets() -> list[dict]:
    """Rows for ``dsq calib list``: every shipped set and mix with size, source and licence."""
    rows = []
    for s in shipped_sets().values():
        rows.append(
            {
                "name": s.name,
                "kind": s.kind,
                "bytes": s.nbytes,
                "documents": len(read_documents(s.file, s.kind)),
                "description": s.description,
                "source": s.source,
                "licence": s.licence,
                "file": s.file.name,
                "sha256": s.sha256,
            }
        )
    for name, parts in mixes().items():
        sets = [shipped_sets()[p] for p in parts]
        rows.append(
            {
                "name": name,
                "kind": "mix",
                "bytes": sum(s.nbytes for s in sets),
                "documents": sum(len(read_documents(s.file, s.kind)) for s in sets),
                "description": "windows drawn without replacement from all of: " + ", ".join(parts)
                + " (each set's share follows its size)",
                "source": "see its parts",
                "licence": ", ".join(sorted({s.licence for s in sets})),
                "file": "",
                "sha256": "",
            }
        )
    return rows


def _suffix(path: Path) -> str:
    """``.txt`` or ``.jsonl`` (or another suffix), looking through a trailing ``.gz``."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_text(path: Path) -> str:
    """A calibration file's text, gunzipped when its name ends in .gz; InputError names the file."""
    if not path.is_file():
        raise InputError(f"{path}: calibration file not found")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: calibration text is not UTF-8 ({e})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path}: not a readable gzip file ({e})") from None


def read_documents(path: Path, kind: str | None = None) -> list[Document]:
    """The documents of one file: a .txt is one document; a .jsonl has one per line (either may be .gz)."""
    text = read_text(path)
    if _suffix(path) != ".jsonl":
        if not text.strip():
            raise InputError(f"{path}: calibration file is empty")
        return [text]
    docs: list[Document] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            docs.append(item["text"])
        elif isinstance(item, dict) and _is_messages(item.get("messages")):
            docs.append(item["messages"])
        else:
            raise InputError(
                f"{path}:{lineno}: expected {{\"text\": \"...\"}} or {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}"
            )
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs


def _is_messages(m: object) -> bool:
    return isinstance(m, list) and bool(m) and all(
        isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str) for x in m
    )


def source_files(spec: str) -> list[tuple[str, Path, str | None]]:
    """``spec`` (set name, mix name or file path) -> [(source name, file, kind or None to infer)]."""
    sets, mix = shipped_sets(), mixes()
    if spec in sets:
        names: tuple[str, ...] = (spec,)
    elif spec in mix:
        names = mix[spec]
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(
                f"--calib {spec!r}: not a shipped set ({', '.join([*sets, *mix])}) and no such file; "
                "give a .txt or .jsonl file (optionally .gz)"
            )
        if _suffix(path) not in (".txt", ".jsonl"):
            raise InputError(f"--calib {path}: calibration files must be .txt or .jsonl (optionally .gz)")
        return [(path.name, path, None)]
    return [(n, sets[n].file, sets[n].kind) for n in names]


def resolve_source(spec: str) -> list[tuple[str, list[Document]]]:
    """``spec`` (set name, mix name or file path) -> [(source name, documents)]."""
    return [(name, read_documents(path, kind)) for name, path, kind in source_files(spec)]


_THINK = "<think>"


def _apply_template(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (the one place calibration renders a template).

    dsq's bounded sandbox renders it, not transformers' apply_chat_template: the template came with the
    model (time, integer and size limits; see dsquant/sandbox.py)."""
    specials = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items() if isinstance(v, str)}
    return render_chat_template(template, messages, specials, add_generation_prompt=add_generation_prompt,
                                source="the model's chat template (rendering calibration chats)")


def render(doc: Document, tokenizer) -> str:
    """Plain text as is; chat messages through the tokenizer's chat template (a plain fallback if none).

    A conversation ending in an assistant turn is rendered as the model sees it when it writes that
    turn: the messages before it with the generation prompt, then the assistant text verbatim. Rendering
    the whole conversation instead would let the template edit the reply as history (DeepSeek-R1
    distills' templates delete everything up to ``</think>``, so no reasoning would reach calibration).
    A generation prompt that already opens ``<think>`` is not repeated by the reply.
    """
    if isinstance(doc, str):
        return doc
    template = pick_template(getattr(tokenizer, "chat_template", None))
    if not template:
        return "".join(f"{m['role']}: {m['content']}\n" for m in doc)
    if doc[-1]["role"] != "assistant":
        return _apply_template(tokenizer, template, doc, add_generation_prompt=False)
    prompt = _apply_template(tokenizer, template, doc[:-1], add_generation_prompt=True)
    reply = doc[-1]["content"]
    if prompt.rstrip().endswith(_THINK) and reply.lstrip().startswith(_THINK):
        reply = reply.lstrip()[len(_THINK) :]
        tail = prompt[prompt.rstrip().rfind(_THINK) + len(_THINK) :]  # whitespace the prompt put after <think>
        reply = reply[len(tail) :] if reply.startswith(tail) else reply
    return prompt + reply


def token_stream(docs: list[Document], tokenizer) -> list[int]:
    """The documents rendered (:func:`render`), tokenized without special tokens, each followed by EOS."""
    eos = tokenizer.eos_token_id
    texts = [render(doc, tokenizer) for doc in docs]
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(row)
        if eos is not None:
            ids.append(int(eos))
    return ids


def _tokenizer_key(tokenizer) -> str | None:
    """A digest of everything that decides a token stream (vocabulary, merges, chat template, EOS), or
    None for a tokenizer with no serialisable backend (then streams are not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()


_STREAMS: dict[tuple[str, str, str | None], list[int]] = {}  # (tokenizer key, file sha256, kind) -> stream
_STREAMS_MAX = 32


def _cached_stream(path: Path, kind: str | None, tokenizer, tok_key: str | None) -> list[int]:
    """The token stream of one file, kept in memory per (tokenizer, file bytes): the default mix is ~2 MB
    of text, and one process (tests, ``dsq quantize`` then ``dsq eval``) asks for it repeatedly."""
    if tok_key is None:
        return token_stream(read_documents(path, kind), tokenizer)
    key = (tok_key, hashlib.sha256(path.read_bytes()).hexdigest(), kind)
    if key not in _STREAMS:
        if len(_STREAMS) >= _STREAMS_MAX:
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = token_stream(read_documents(path, kind), tokenizer)
    return _STREAMS[key]


def sample_windows(
    streams: list[list[int]], samples: int, seqlen: int, seed: int, source: str = "the calibration data"
) -> torch.Tensor:
    """[samples, seqlen] int64 windows drawn without replacement from the pooled streams.

    Stream ``i`` of length ``L`` gives ``max(1, L // seqlen)`` non-overlapping windows starting at a
    seeded phase (read cyclically, so the last may wrap through the stream's end); the windows of every
    stream are shuffled together by ``random.Random(seed)`` and taken in order. If ``samples`` is more
    than the windows there are, one warning line names ``source`` and the shortfall, and each further
    pass adds the same number of windows at new seeded phases. Raises InputError for ``samples < 1``,
    ``seqlen < 2`` or an empty stream."""
    if samples < 1 or seqlen < 2:
        raise InputError(f"--samples ({samples}) must be >= 1 and --seqlen ({seqlen}) >= 2")
    if not streams or any(not s for s in streams):
        raise InputError(f"{source}: a calibration source tokenizes to no tokens")
    rng = random.Random(seed)

    def one_pass() -> list[tuple[int, int]]:
        starts = []
        for i, s in enumerate(streams):
            phase = rng.randrange(len(s))
            starts += [(i, (phase + j * seqlen) % len(s)) for j in range(max(1, len(s) // seqlen))]
        rng.shuffle(starts)
        return starts

    chosen = one_pass()
    if samples > len(chosen):
        unique = sum(len(s) for s in streams)
        log.warning(
            "calibration: %d samples x %d tokens = %d tokens, but %s has %d unique tokens (%d windows of %d); "
            "windows will repeat text. Give more text (--calib FILE) or lower --samples/--seqlen",
            samples, seqlen, samples * seqlen, source, unique, len(chosen), seqlen,
        )
    while len(chosen) < samples:
        chosen += one_pass()
    out = torch.empty(samples, seqlen, dtype=torch.int64)
    for k, (i, start) in enumerate(chosen[:samples]):
        s = streams[i]
        out[k] = torch.tensor([s[(start + t) % len(s)] for t in range(seqlen)], dtype=torch.int64)
    return out


@dataclass(frozen=True)
class CalibBatch:
    ids: torch.Tensor  # [samples, seqlen] int64
    source: str
    parts: tuple[tuple[str, int], ...]  # (source name, stream tokens)
    seed: int

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "source": self.source,
            "samples": int(self.ids.shape[0]),
            "seqlen": int(self.ids.shape[1]),
            "seed": self.seed,
            "tokens": int(self.ids.numel()),
            "streams": {name: n for name, n in self.parts},
            "unique_tokens": sum(n for _, n in self.parts),
            "fingerprint": self.fingerprint,
        }


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the message says which
        raise InputError(f"{model_dir}: cannot load the tokenizer for calibration ({e})") from None


def calibration_batch(
    source: str, tokenizer, samples: int = 128, seqlen: int = 512, seed: int = 0
) -> CalibBatch:
    """``samples`` windows of ``seqlen`` tokens from ``source`` (see the module docstring for the sampling).

    Raises InputError for an unknown source, an unreadable or empty file, or bad sizes."""
    parts = source_files(source)
    tok_key = _tokenizer_key(tokenizer)
    streams = [_cached_stream(path, kind, tokenizer, tok_key) for _, path, kind in parts]
    ids = sample_windows(streams, samples, seqlen, seed, source=f"--calib {source}")
    return CalibBatch(ids, source, tuple((n, len(s)) for (n, _, _), s in zip(parts, streams, strict=True)), seed)
