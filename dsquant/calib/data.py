"""Calibration data: the shipped sets (``calib_data/MANIFEST.json``), user files, and seeded sampling.

A calibration *source* is a shipped set name (``prose``, ``code``, ``reasoning``), a mix of them
(``mixed``), or a user file: ``.txt`` (one text) or ``.jsonl`` (one document a line, either
``{"text": ...}`` or ``{"messages": [{"role", "content"}, ...]}``). Chat documents are rendered
through the model's own chat template, so a reasoning distill is calibrated on ``<think>`` turns in
the exact shape it writes them (see :func:`render`: the reply is never passed through the template).

Sampling: each source becomes one token stream (documents joined as the tokenizer renders them,
separated by EOS); sample ``k`` takes a window of ``seqlen`` tokens at a random offset of source
``k mod n_sources``. Offsets come from ``random.Random(seed)``, so the batch is a pure function of
(source files, tokenizer, samples, seqlen, seed). A stream shorter than ``seqlen`` is read
cyclically (it wraps around through an EOS) instead of padded, so no attention mask is needed.
"""

from __future__ import annotations

import hashlib
import json
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
        return hashlib.sha256(self.file.read_bytes()).hexdigest()


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
                "description": "equal share of samples from: " + ", ".join(parts),
                "source": "see its parts",
                "licence": ", ".join(sorted({s.licence for s in sets})),
                "file": "",
                "sha256": "",
            }
        )
    return rows


def read_documents(path: Path, kind: str | None = None) -> list[Document]:
    """The documents of one file: a .txt is one document; a .jsonl has one per line."""
    if not path.is_file():
        raise InputError(f"{path}: calibration file not found")
    kind = kind or ("chat" if path.suffix == ".jsonl" else "text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: calibration text is not UTF-8 ({e})") from None
    if path.suffix != ".jsonl":
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


def resolve_source(spec: str) -> list[tuple[str, list[Document]]]:
    """``spec`` (set name, mix name or file path) -> [(source name, documents)]."""
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
                "give a .txt or .jsonl file"
            )
        if path.suffix not in (".txt", ".jsonl"):
            raise InputError(f"--calib {path}: calibration files must be .txt or .jsonl")
        return [(path.name, read_documents(path))]
    return [(n, read_documents(sets[n].file, sets[n].kind)) for n in names]


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
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(render(doc, tokenizer), add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return ids


def sample_windows(streams: list[list[int]], samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[samples, seqlen] int64: sample k is a window of stream k mod len(streams) at a seeded offset."""
    if samples < 1 or seqlen < 2:
        raise InputError(f"--samples ({samples}) must be >= 1 and --seqlen ({seqlen}) >= 2")
    rng = random.Random(seed)
    out = torch.empty(samples, seqlen, dtype=torch.int64)
    for k in range(samples):
        stream = streams[k % len(streams)]
        if not stream:
            raise InputError("a calibration source tokenizes to no tokens")
        start = rng.randrange(len(stream))
        idx = [(start + i) % len(stream) for i in range(seqlen)]
        out[k] = torch.tensor([stream[i] for i in idx], dtype=torch.int64)
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
    parts = resolve_source(source)
    streams = [token_stream(docs, tokenizer) for _, docs in parts]
    ids = sample_windows(streams, samples, seqlen, seed)
    return CalibBatch(ids, source, tuple((n, len(s)) for (n, _), s in zip(parts, streams, strict=True)), seed)
