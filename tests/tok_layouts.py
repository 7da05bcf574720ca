"""Tokenizer file layouts found in the wild, built small for tests (issue 11).

Each layout writes tokenizer.json (a byte-level BPE trained on tests/data/tiny_corpus.txt, at most
``VOCAB`` ids so it fits the tiny fixture models) and the side files around it. ``LAYOUTS`` names them;
``write_layout(name, folder)`` adds them to a folder that may already hold a model's config/weights.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from fixtures import VOCAB

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# DeepSeek-R1-Distill's template: history assistant turns lose everything up to </think>; the generation
# prompt opens <think>.
R1 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
      "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
      "{% set c = c.split('</think>')[-1] %}{% endif %}<|Assistant|>{{ c }}<|end_of_sentence|>{% endif %}"
      "{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@cache
def _bpe(specials: tuple[str, ...], size: int = VOCAB - 24):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer)
    return tok.to_str()


def _tokenizer(specials: list[str], plain: tuple[str, ...] = ()):
    """A byte-level BPE whose ``specials`` get ids 0.. (special added tokens); ``plain``: non-special added tokens."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(_bpe(tuple(specials)))
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tok


def _save(folder: Path, tok, tcfg: dict | None = None, stm: dict | None = None, gen: dict | None = None,
          cfg: dict | None = None, files: dict[str, str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    if tcfg is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    if stm is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(stm))
    if gen is not None:
        (folder / "generation_config.json").write_text(json.dumps(gen))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {"model_type": "llama"}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(key, None)
    config.update(cfg or {})
    config_path.write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)


def llama3_post_processor(folder: Path) -> None:
    """1. Llama-3: the post-processor adds <|begin_of_text|>; tokenizer_config has no add_bos_token."""
    from tokenizers import processors

    tok = _tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 0)]),
    ])
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                        "eos_token": "<|eot_id|>", "chat_template": LLAMA3},
          gen={"bos_token_id": 0, "eos_token_id": [1, 2]}, cfg={"bos_token_id": 0, "eos_token_id": 1})


def special_tokens_map_only(folder: Path) -> None:
    """2. tokenizer_config names no bos/eos/pad (and has no added_tokens_decoder); special_tokens_map.json does."""
    tok = _tokenizer(["<s>", "<pad>", "</s>"])
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256},
          stm={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
          gen={"eos_token_id": 2}, cfg={"eos_token_id": 2})


def generation_eos_list(folder: Path, end: str = "<|im_end|>") -> None:
    """3. config.json eos 1, generation_config.json eos [0, 1] (0 is the chat end token, as in Qwen chat models)."""
    tok = _tokenizer([end, "<|endoftext|>", "<|im_start|>"])
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                        "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHATML.replace("<|im_end|>", end)},
          gen={"eos_token_id": [0, 1]}, cfg={"eos_token_id": 1})


def chat_template_list(folder: Path) -> None:
    """chat_template as a list of named templates: transformers uses the one named 'default'."""
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                        "chat_template": [{"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"},
                                          {"name": "default", "template": CHATML}]},
          cfg={"eos_token_id": 0})


def chat_template_file_wins(folder: Path) -> None:
    """chat_template.jinja next to a tokenizer_config chat_template: the file wins."""
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                        "chat_template": "OLD {% for m in messages %}{{ m['content'] }}{% endfor %}"},
          cfg={"eos_token_id": 0}, files={"chat_template.jinja": CHATML})


def add_eos_token(folder: Path) -> None:
    """add_bos_token/add_eos_token in tokenizer_config beside a tokenizer.json without a post-processor."""
    tok = _tokenizer(["<s>", "</s>", "<unk>"])
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": True},
          cfg={"bos_token_id": 0, "eos_token_id": 1})


def legacy_added_tokens(folder: Path) -> None:
    """Legacy tokenizer_config (no added_tokens_decoder): the named EOS is a non-special added token in
    tokenizer.json (transformers makes it special), and <tool> is an ordinary added token."""
    tok = _tokenizer(["<|endoftext|>"], plain=("<|eos|>", "<tool>"))
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>",
                        "pad_token": "<|endoftext|>"},
          cfg={"eos_token_id": tok.token_to_id("<|eos|>")})


def ordinary_named_end(folder: Path) -> None:
    """ChatML whose vocabulary also has ``</s>`` as an ordinary (non-special) token, as DeepSeek-R1-Distill-Qwen's
    does: llama.cpp makes tokens with that name end-of-generation whatever the GGUF says."""
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=("</s>",))
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                        "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHATML},
          cfg={"eos_token_id": 2})


def qwen2_nfc(folder: Path) -> None:
    """Qwen2: an NFC normalizer and Qwen2's split regex (llama.cpp does not normalize)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    _save(folder, tok, {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                        "bos_token": None, "chat_template": CHATML},
          gen={"eos_token_id": [2, 0]}, cfg={"eos_token_id": 2})


def r1_distill(folder: Path) -> None:
    """DeepSeek-R1-Distill: its template strips reasoning from assistant history turns."""
    tok = _tokenizer(["<|begin_of_sentence|>", "<|end_of_sentence|>", "<|User|>", "<|Assistant|>"])
    _save(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_sentence|>",
                        "eos_token": "<|end_of_sentence|>", "chat_template": R1},
          cfg={"bos_token_id": 0, "eos_token_id": 1})


LAYOUTS = {
    "llama3_post_processor": llama3_post_processor,
    "special_tokens_map_only": special_tokens_map_only,
    "generation_eos_list": generation_eos_list,
    "chat_template_list": chat_template_list,
    "chat_template_file_wins": chat_template_file_wins,
    "add_eos_token": add_eos_token,
    "legacy_added_tokens": legacy_added_tokens,
    "qwen2_nfc": qwen2_nfc,
    "r1_distill": r1_distill,
    "ordinary_named_end": ordinary_named_end,
}


def write_layout(name: str, folder: Path) -> Path:
    LAYOUTS[name](folder)
    return folder
