"""The tokenizer in GGUF: a byte-level BPE (``tokenizer.ggml.model = gpt2``) from tokenizer.json.

llama.cpp does not run the pre-tokenizer described in tokenizer.json; it picks a built-in one by the
name in ``tokenizer.ggml.pre``. dsq names it from the pre-tokenizer's structure (``PRE_TOKENIZERS``:
the regexes are those llama.cpp's ``llama-vocab.cpp`` quotes as "original regex from tokenizer.json"),
instead of llama.cpp's converter's hash of token ids for a probe text. A plain ``ByteLevel`` with its
built-in regex (GPT-2's, what dsq's test tokenizer and many small BPEs use) is ``gpt-2``: llama.cpp's
GPT2 pre-type splits with that same regex. An unknown pre-tokenizer is an error naming the field, since
a wrong name silently changes token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFWriter, TokenType

from dsq.dsquant.errors import CorruptFileError, UnsupportedError

_BL = "ByteLevel(regex)"  # ByteLevel with its own GPT-2 regex
_BN = "ByteLevel"  # ByteLevel that only maps bytes (a Split before it does the splitting)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DSV3 = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)

#: pre-tokenizer signature -> llama.cpp's ``tokenizer.ggml.pre`` name.
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (_BL,): "gpt-2",
    ("Digits(individual)", _BL): "smollm",
    ("Split:" + _QWEN2, _BN): "qwen2",
    ("Split:" + _LLAMA3, _BN): "llama-bpe",
    ("Split:\\p{N}{1,3}", "Split:[一-龥぀-ゟ゠-ヿ]+", "Split:" + _DSV3, _BN): "deepseek-v3",
}


def _signature_part(p: dict) -> str:
    kind = p.get("type")
    if kind == "ByteLevel":
        return _BL if p.get("use_regex", True) else _BN
    if kind == "Digits":
        return "Digits(individual)" if p.get("individual_digits") else "Digits"
    if kind == "Split":
        pat = p.get("pattern") or {}
        return "Split:" + str(pat.get("Regex", pat.get("String", "")))
    return str(kind)


def pre_tokenizer_name(tok: dict, where: str) -> str:
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = tuple(_signature_part(p) for p in parts or [])
    try:
        return PRE_TOKENIZERS[sig]
    except KeyError:
        raise UnsupportedError(
            f"{where}: field `pre_tokenizer` ({' + '.join(s[:40] for s in sig) or 'none'}) matches no pre-tokenizer "
            f"llama.cpp has built in (known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))})"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def add_tokenizer(w: GGUFWriter, model_dir: Path, vocab_size: int) -> dict:
    """Write vocab, merges, token types, special ids and the chat template. Returns a summary."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedError(
            f"{model_dir}: no tokenizer.json; dsq writes byte-level BPE tokenizers from tokenizer.json only"
        )
    tok = _read_json(path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedError(
            f"{path}: field `model.type` is {model.get('type')!r}"
            f"{' with byte_fallback' if model.get('byte_fallback') else ''}; dsq writes byte-level BPE (gpt2) only"
        )
    pre = pre_tokenizer_name(tok, str(path))
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in tok.get("added_tokens") or []}
    for i, t in added.items():
        vocab[t["content"]] = i
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        raise UnsupportedError(f"{path}: token id {top} does not fit config.json vocab_size {vocab_size}")
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # rows of the embedding no token uses (llama.cpp's converter does the same)
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    cfg_path = model_dir / "tokenizer_config.json"
    tcfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        text = _token_text(tcfg.get(f"{kind}_token"))
        if text is None:
            continue
        if text not in vocab:
            raise UnsupportedError(f"{cfg_path}: field `{kind}_token` = {text!r} is not in the vocabulary")
        special[kind] = vocab[text]
        getattr(w, f"add_{kind}_token_id")(vocab[text])
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)) and "bos" in special)
    w.add_add_eos_token(bool(tcfg.get("add_eos_token", False)))
    template = tcfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template:
        w.add_chat_template(template)
    return {"pre_tokenizer": pre, "tokens": len(tokens), "merges": len(merges), "special": special,
            "chat_template": bool(template)}
