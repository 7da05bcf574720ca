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

from pathlib import Path

from gguf import GGUFWriter, TokenType

from dsq.dsquant.errors import UnsupportedError
from dsq.dsquant.tokenizer_facts import resolve_tokenizer

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


# llama.cpp's llama-vocab.cpp marks these token texts end-of-generation by name, whatever the GGUF says.
LLAMA_CPP_EOG_NAMES = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
    "<|end_of_text|>", "<end_of_utterance>", "</s>",
})


def add_tokenizer(w: GGUFWriter, model_dir: Path, vocab_size: int) -> dict:
    """Write vocab, merges, token types, special ids, end-of-generation ids and the chat template.

    Every fact comes from :func:`resolve_tokenizer` (as transformers resolves it); returns a summary for the
    report, with ``notes`` on what llama.cpp cannot reproduce (a normalizer, an end-of-generation list longer
    than its EOS/EOT/EOM slots, a post-processor adding more than the BOS/EOS).
    """
    path = model_dir / "tokenizer.json"
    facts = resolve_tokenizer(model_dir)
    tok = facts.effective_tokenizer
    if tok is None:
        raise UnsupportedError(
            f"{model_dir}: no tokenizer.json; dsq writes byte-level BPE tokenizers from tokenizer.json only"
        )
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedError(
            f"{path}: field `model.type` is {model.get('type')!r}"
            f"{' with byte_fallback' if model.get('byte_fallback') else ''}; dsq writes byte-level BPE (gpt2) only"
        )
    pre = pre_tokenizer_name(tok, str(path))
    vocab = facts.vocab
    added = {t.id: t for t in facts.added}
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
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    notes: list[str] = []
    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = facts.ids[kind]
        if facts.tokens[kind] is not None and tid is None:
            raise UnsupportedError(
                f"{model_dir / facts.sources.get(kind + '_token', 'tokenizer_config.json')}: field `{kind}_token` = "
                f"{facts.tokens[kind]!r} is not in the vocabulary"
            )
        if tid is not None:
            special[kind] = tid
    # Without a tokenizer EOS, the first generation EOS (config/generation_config) is the EOS llama.cpp needs:
    # with none at all it falls back to id 11, an ordinary token in a byte-level vocabulary.
    if "eos" not in special and facts.eog_ids:
        special["eos"] = facts.eog_ids[0]
    for kind, tid in special.items():
        getattr(w, f"add_{kind}_token_id")(tid)
    # llama.cpp's end-of-generation set: EOS, EOT, EOM, and tokens it knows by name.
    rest = [i for i in facts.eog_ids if i != special.get("eos") and by_id.get(i) not in LLAMA_CPP_EOG_NAMES]
    if facts.template_end is not None and vocab.get(facts.template_end) in rest:
        rest.remove(vocab[facts.template_end])
        rest.insert(0, vocab[facts.template_end])  # the chat turn's end is llama.cpp's EOT
    slots = {}
    for kind, tid in zip(("eot", "eom"), rest, strict=False):
        getattr(w, f"add_{kind}_token_id")(tid)
        slots[kind] = tid
    if len(rest) > 2:
        notes.append(f"end-of-generation ids {rest[2:]} do not fit llama.cpp's EOS/EOT/EOM slots: llama.cpp will not stop there")
    w.add_add_bos_token(facts.add_bos)
    w.add_add_eos_token(facts.add_eos)
    if facts.prefix_ids and not facts.add_bos:
        notes.append(f"the tokenizer adds {list(facts.prefix_ids)} before the text; llama.cpp can add only the BOS")
    if facts.suffix_ids and not facts.add_eos:
        notes.append(f"the tokenizer adds {list(facts.suffix_ids)} after the text; llama.cpp can add only the EOS")
    if facts.normalizer_names:
        notes.append(f"tokenizer normalizer {'+'.join(facts.normalizer_names)}: llama.cpp does not apply it, so text "
                     "that it would change tokenizes differently")
    templates = facts.chat_templates
    if list(templates) == ["default"]:
        w.add_chat_template(templates["default"])
    elif templates:
        w.add_chat_template([{"name": n, "template": t} for n, t in templates.items()])
    return {"pre_tokenizer": pre, "tokens": len(tokens), "merges": len(merges), "special": {**special, **slots},
            "add_bos": facts.add_bos, "eog_ids": list(facts.eog_ids), "chat_template": bool(templates),
            "notes": notes}
