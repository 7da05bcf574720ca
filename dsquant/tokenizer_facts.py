"""The tokenizer facts of a model folder, resolved the way transformers resolves them.

One resolver (:func:`resolve_tokenizer`) for everything that must behave like the source model: the
GGUF writer, the ONNX/genai writer, the runtimes' tokenizer and ``dsq check``. It reads the side files
(each through :func:`dsq.dsquant.paths.resolve_model_file`, so a link out of the folder is refused)
and follows transformers 5's ``AutoTokenizer.from_pretrained`` / ``TokenizersBackend`` rules
(``tokenization_utils_base._from_pretrained``, ``tokenization_utils_tokenizers``, ``tokenization_auto``):

* **special tokens**: ``tokenizer_config.json``'s ``bos/eos/pad/unk_token``; when that file has no
  ``added_tokens_decoder`` (the legacy layout) ``special_tokens_map.json`` is read too and wins.
  Named special tokens are special (a control token) whatever ``tokenizer.json`` says.
* **add_bos / add_eos**: with a ``tokenizer.json``, transformers drops ``add_bos_token`` /
  ``add_eos_token`` from ``tokenizer_config.json`` and keeps ``tokenizer.json``'s post-processor, so
  what is added is the post-processor's (a ``TemplateProcessing`` around ``$A``); no post-processor
  adds nothing. Without a ``tokenizer.json`` the config keys apply.
* **tokenizer class**: ``model_type: qwen2`` (or ``tokenizer_class: Qwen2Tokenizer``) loads
  ``Qwen2Tokenizer``, which replaces the normalizer with NFC and the pre-tokenizer with Qwen2's split
  regex, and defaults unk/eos/pad to ``<|endoftext|>``; ``effective_tokenizer`` is the tokenizer.json
  transformers actually runs.
* **chat template**: ``chat_template.jinja`` (and ``chat_templates/*.jinja``) over
  ``tokenizer_config.json``'s ``chat_template``, which is a string or a list of named templates; the
  one used is ``default``.
* **end of generation**: ``generation_config.json``'s and ``config.json``'s ``eos_token_id`` (int or
  list), the tokenizer's EOS, and the token the chat template closes an assistant turn with
  (``<|im_end|>``, ``<|eot_id|>``), found by rendering a probe conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .archs import ARCHITECTURES
from .errors import CorruptFileError
from .paths import resolve_model_file

KINDS = ("bos", "eos", "pad", "unk")
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# transformers' registered tokenizer class per model type (tokenization_auto): dsq's architectures carry theirs in
# their record (hf_tokenizer, hf_tokenizer_forced); this lists the related types dsq reads tokenizers of only.
_REGISTERED_OTHER = {"qwen2_moe": "Qwen2Tokenizer"}
_PROBE_USER, _PROBE_REPLY = "dsq-probe-user", "dsq-probe-reply"


def read_json(model_dir: str | Path, name: str) -> dict | None:
    """A JSON side file of the model folder as a dict, None when absent. Raises CorruptFileError / InputError."""
    path = resolve_model_file(model_dir, name)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{Path(model_dir) / name}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{Path(model_dir) / name}: expected a JSON object, found {type(data).__name__}")
    return data


def read_text(model_dir: str | Path, name: str) -> str | None:
    path = resolve_model_file(model_dir, name)
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{Path(model_dir) / name}: not UTF-8 text ({e})") from None


def _text(value) -> str | None:
    """tokenizer_config stores a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [int(x) for x in items if isinstance(x, int) and not isinstance(x, bool)]


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool


@dataclass(frozen=True)
class TokenizerFacts:
    """What a model's tokenizer does, as transformers would do it. Ids are token ids of the vocabulary."""

    model_dir: Path
    tokenizer_class: str  # the class transformers loads: TokenizersBackend, Qwen2Tokenizer, ...
    effective_tokenizer: dict | None  # tokenizer.json as transformers runs it (None: no tokenizer.json)
    vocab: dict[str, int]  # base vocabulary + added tokens
    tokens: dict[str, str | None]  # bos/eos/pad/unk -> token text
    ids: dict[str, int | None]  # bos/eos/pad/unk -> id
    prefix_ids: tuple[int, ...]  # what encode(add_special_tokens=True) puts before the text
    suffix_ids: tuple[int, ...]  # ... and after it
    chat_templates: dict[str, str]  # name -> template ("default" is the one used)
    template_end: str | None  # the token the chat template closes an assistant turn with
    generation_eos: tuple[int, ...]  # generation_config.json / config.json eos_token_id
    eog_ids: tuple[int, ...]  # every id generation should stop at, the primary EOS first
    added: tuple[AddedToken, ...]
    sources: dict[str, str] = field(default_factory=dict)  # fact -> the file it came from
    notes: tuple[str, ...] = ()

    @property
    def bos_id(self) -> int | None:
        return self.ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.ids["eos"]

    @property
    def pad_id(self) -> int | None:
        return self.ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self.ids["unk"]

    @property
    def add_bos(self) -> bool:
        """The tokenizer puts exactly the BOS before the text (the one thing llama.cpp/genai can express)."""
        return self.bos_id is not None and self.prefix_ids == (self.bos_id,)

    @property
    def add_eos(self) -> bool:
        return self.eos_id is not None and self.suffix_ids == (self.eos_id,)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def normalizer(self) -> dict | None:
        return (self.effective_tokenizer or {}).get("normalizer")

    @property
    def normalizer_names(self) -> tuple[str, ...]:
        """Types of the normalizer steps (``NFC``, ``Lowercase``...), () when there is none."""
        n = self.normalizer
        if not n:
            return ()
        steps = n.get("normalizers", []) if n.get("type") == "Sequence" else [n]
        return tuple(str(s.get("type")) for s in steps)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(t.id for t in self.added if t.special)

    @property
    def special_tokens(self) -> dict[str, str]:
        """``bos_token``/``eos_token``/... -> text, as a chat template sees them."""
        return {f"{k}_token": v for k, v in self.tokens.items() if v is not None}

    def summary(self) -> dict:
        """JSON-able facts for reports."""
        return {
            "tokenizer_class": self.tokenizer_class,
            "ids": dict(self.ids),
            "tokens": dict(self.tokens),
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "prefix_ids": list(self.prefix_ids),
            "suffix_ids": list(self.suffix_ids),
            "eog_ids": list(self.eog_ids),
            "template_end": self.template_end,
            "chat_templates": sorted(self.chat_templates),
            "normalizer": list(self.normalizer_names),
            "sources": dict(self.sources),
            "notes": list(self.notes),
        }


def _tokenizer_class(tcfg: dict, cfg: dict) -> str:
    """The class AutoTokenizer picks, among those that change behaviour for dsq's architectures."""
    model_type = str(cfg.get("model_type"))
    declared = str(tcfg.get("tokenizer_class") or cfg.get("tokenizer_class") or "").removesuffix("Fast")
    rec = ARCHITECTURES.get(model_type)
    registered = rec.hf_tokenizer if rec is not None else _REGISTERED_OTHER.get(model_type)
    if not declared:
        chosen = registered or "TokenizersBackend"
    elif registered and declared != registered and rec is not None and rec.hf_tokenizer_forced:
        chosen = registered
    else:
        chosen = declared
    # Every other class (PreTrainedTokenizerFast, LlamaTokenizer over a byte-level tokenizer.json...) runs
    # tokenizer.json as it is.
    return chosen if chosen == "Qwen2Tokenizer" else "TokenizersBackend"


def _apply_class(tj: dict, cls: str) -> dict:
    """tokenizer.json with what the tokenizer class's __init__ rebuilds (normalizer, pre-tokenizer)."""
    if cls != "Qwen2Tokenizer":
        return tj
    out = dict(tj)
    out["normalizer"] = {"type": "NFC"}
    out["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    }
    return out


def _template_processing(pp: dict | None) -> dict | None:
    if not pp:
        return None
    if pp.get("type") == "TemplateProcessing":
        return pp
    if pp.get("type") == "Sequence":
        for p in pp.get("processors", []):
            if p.get("type") == "TemplateProcessing":
                return p
    return None


def _around(pp: dict | None, vocab: dict[str, int], where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids before, ids after) the single sequence $A, for the post-processors transformers keeps."""
    if not pp:
        return (), ()
    kind = pp.get("type")
    if kind in ("RobertaProcessing", "BertProcessing"):
        return (int(pp["cls"][1]),), (int(pp["sep"][1]),)
    tp = _template_processing(pp)
    if tp is None:
        return (), ()
    specials = tp.get("special_tokens") or {}
    before: list[int] = []
    after: list[int] = []
    seen_a = False
    for item in tp.get("single") or []:
        if "Sequence" in item:
            seen_a = True
            continue
        name = (item.get("SpecialToken") or {}).get("id")
        ids = (specials.get(name) or {}).get("ids")
        if ids is None:
            if name not in vocab:
                raise CorruptFileError(f"{where}: post_processor adds {name!r}, which is not in the vocabulary")
            ids = [vocab[name]]
        (after if seen_a else before).extend(int(i) for i in ids)
    return tuple(before), tuple(after)


def _templates(model_dir: Path, tcfg: dict) -> tuple[dict[str, str], str]:
    """Named chat templates with transformers' precedence, and the file they came from."""
    found: dict[str, str] = {}
    jinja = read_text(model_dir, "chat_template.jinja")
    if jinja is not None:
        found["default"] = jinja
    tdir = model_dir / "chat_templates"
    if tdir.is_dir():
        for f in sorted(tdir.glob("*.jinja")):
            text = read_text(model_dir, f"chat_templates/{f.name}")
            if text is not None:
                found[f.name.removesuffix(".jinja")] = text
    if found:
        return found, "chat_template.jinja" if "default" in found else "chat_templates/"
    ct = tcfg.get("chat_template")
    if isinstance(ct, str):
        return {"default": ct}, "tokenizer_config.json"
    if isinstance(ct, list):
        named = {}
        for t in ct:
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)):
                raise CorruptFileError(
                    f"{model_dir / 'tokenizer_config.json'}: field `chat_template` is a list whose items must be "
                    "{\"name\": ..., \"template\": ...}"
                )
            named[t["name"]] = t["template"]
        return named, "tokenizer_config.json"
    return {}, ""


def _end_token(template: str | None, specials: dict[str, str], added: list[str]) -> str | None:
    """The added token a chat template writes right after an assistant reply (rendered on a probe)."""
    if not template:
        return None
    from .errors import DsqError
    from .sandbox import render_chat_template

    msgs = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:  # the model's template is untrusted: dsq's bounded sandbox (time, integers, sizes)
        text = render_chat_template(template, msgs, specials, add_generation_prompt=False)
    except DsqError:  # a template that cannot render a plain turn has no end token to find
        return None
    i = text.rfind(_PROBE_REPLY)
    if i < 0:
        return None
    rest = text[i + len(_PROBE_REPLY) :]
    hits = [t for t in added if rest.startswith(t)]
    return max(hits, key=len) if hits else None


def resolve_tokenizer(model_dir: str | Path) -> TokenizerFacts:
    """The tokenizer facts of ``model_dir`` (an HF-style folder or an export that carries its side files).

    A folder without tokenizer files gets facts from config.json / generation_config.json alone
    (``tokenizer_class`` "none", empty vocabulary). Raises :class:`CorruptFileError` for a side file that is
    not valid JSON, and :class:`InputError` (from :func:`resolve_model_file`) for one linking out of the folder.
    """
    model_dir = Path(model_dir)
    tj = read_json(model_dir, "tokenizer.json")
    tcfg = read_json(model_dir, "tokenizer_config.json")
    tcfg = tcfg or {}
    cfg = read_json(model_dir, "config.json") or {}
    gen = read_json(model_dir, "generation_config.json")
    stm = read_json(model_dir, "special_tokens_map.json")
    sources: dict[str, str] = {}
    notes: list[str] = []

    cls = _tokenizer_class(tcfg, cfg) if tj is not None else ("SentencePiece" if tcfg else "none")
    effective = _apply_class(tj, cls) if tj is not None else None
    vocab: dict[str, int] = {}
    added_raw: list[dict] = []
    if tj is not None:
        v = (tj.get("model") or {}).get("vocab") or {}
        if isinstance(v, dict):
            vocab.update({str(k): int(i) for k, i in v.items()})
        elif isinstance(v, list):  # Unigram: [[piece, score], ...]
            vocab.update({str(p[0]): i for i, p in enumerate(v)})
        added_raw = [t for t in tj.get("added_tokens") or [] if isinstance(t, dict) and "content" in t]
        vocab.update({t["content"]: int(t["id"]) for t in added_raw})
    else:
        legacy = read_json(model_dir, "added_tokens.json") or {}
        added_raw = [{"id": int(i), "content": c, "special": False} for c, i in legacy.items()]
        vocab.update({c: int(i) for c, i in legacy.items()})
        for i, t in (tcfg.get("added_tokens_decoder") or {}).items():
            if isinstance(t, dict) and "content" in t:
                added_raw.append({"id": int(i), "content": t["content"], "special": bool(t.get("special"))})
                vocab[t["content"]] = int(i)

    # Special tokens: tokenizer_config; the legacy special_tokens_map.json wins when read at all.
    kw = {k: tcfg[f"{k}_token"] for k in KINDS if f"{k}_token" in tcfg}
    src = dict.fromkeys(kw, "tokenizer_config.json")
    if "added_tokens_decoder" not in tcfg and stm:
        for k in KINDS:
            if f"{k}_token" in stm:
                kw[k] = stm[f"{k}_token"]
                src[k] = "special_tokens_map.json"
    if cls == "Qwen2Tokenizer":
        for k in ("unk", "eos", "pad"):
            if k not in kw:
                kw[k], src[k] = "<|endoftext|>", "Qwen2Tokenizer default"
    tokens = {k: _text(kw.get(k)) for k in KINDS}
    ids: dict[str, int | None] = {}
    for k in KINDS:
        t = tokens[k]
        ids[k] = vocab.get(t) if t is not None else None
        if t is not None and ids[k] is None:
            notes.append(f"{k}_token {t!r} ({src.get(k)}) is not in the vocabulary")
        if t is not None:
            sources[f"{k}_token"] = src.get(k, "")
    extra = tcfg.get("additional_special_tokens") or tcfg.get("extra_special_tokens") or []
    named = {t for t in tokens.values() if t} | {s for s in (_text(x) for x in extra) if s}
    added = tuple(
        AddedToken(int(t["id"]), t["content"], bool(t.get("special")) or t["content"] in named) for t in added_raw
    )

    # What encode(add_special_tokens=True) adds.
    if tj is not None:
        before, after = _around(tj.get("post_processor"), vocab, str(model_dir / "tokenizer.json"))
        sources["add_bos"] = "tokenizer.json post_processor" if tj.get("post_processor") else "none (no post_processor)"
        if "add_bos_token" in tcfg or "add_eos_token" in tcfg:
            notes.append("tokenizer_config.json add_bos_token/add_eos_token are ignored by transformers when "
                         "tokenizer.json exists; its post_processor decides")
    else:
        before = (ids["bos"],) if tcfg.get("add_bos_token") and ids["bos"] is not None else ()
        after = (ids["eos"],) if tcfg.get("add_eos_token") and ids["eos"] is not None else ()
        sources["add_bos"] = "tokenizer_config.json"

    templates, tsrc = _templates(model_dir, tcfg)
    if tsrc:
        sources["chat_template"] = tsrc
    end = _end_token(templates.get("default"), {f"{k}_token": v for k, v in tokens.items() if v},
                     [t.content for t in added])

    # End of generation: generation_config, config, the tokenizer's EOS, the template's turn end.
    gen_eos = _id_list((gen or {}).get("eos_token_id")) or _id_list(cfg.get("eos_token_id"))
    sources["generation_eos"] = "generation_config.json" if _id_list((gen or {}).get("eos_token_id")) else "config.json"
    eog: list[int] = []
    primary = ids["eos"] if ids["eos"] is not None else (gen_eos[0] if gen_eos else None)
    for i in [primary, *gen_eos, *_id_list(cfg.get("eos_token_id")),
              vocab.get(end) if end is not None else None]:
        if i is not None and i not in eog:
            eog.append(i)
    return TokenizerFacts(
        model_dir=model_dir, tokenizer_class=cls, effective_tokenizer=effective, vocab=vocab, tokens=tokens, ids=ids,
        prefix_ids=before, suffix_ids=after, chat_templates=templates, template_end=end,
        generation_eos=tuple(gen_eos), eog_ids=tuple(eog), added=added, sources=sources, notes=tuple(notes),
    )
