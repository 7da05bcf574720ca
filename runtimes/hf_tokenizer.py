"""The tokenizer and generation settings of a Hugging Face style model directory.

Shared by the torch and onnxruntime backends (an ONNX export carries the same tokenizer files).
``tokenizer.json`` is read with the ``tokenizers`` library directly (no torch import); directories
with only a SentencePiece ``tokenizer.model`` go through ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from dsq.dsquant.errors import CorruptFileError, InputError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None


def _token_str(v) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _ids(v) -> set[int]:
    if v is None:
        return set()
    return {int(x) for x in v} if isinstance(v, list) else {int(v)}


class HFTokenizer:
    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        tj = self.dir / "tokenizer.json"
        self.config = _read_json(self.dir / "tokenizer_config.json")
        if tj.is_file():
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_file(str(tj))
            except Exception as e:
                raise CorruptFileError(f"{tj}: cannot be read as a tokenizer ({e})") from None
            self._fast = True
        elif (self.dir / "tokenizer.model").is_file():
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self.dir))
            self._fast = False
        else:
            raise InputError(f"{self.dir}: no tokenizer.json or tokenizer.model next to the model")

        self.special_tokens = {k: s for k in ("bos_token", "eos_token") if (s := _token_str(self.config.get(k)))}
        self.bos_id = self.token_id(self.special_tokens.get("bos_token"))
        model_cfg = _read_json(self.dir / "config.json")
        gen_cfg = _read_json(self.dir / "generation_config.json")
        eos = _ids(gen_cfg.get("eos_token_id")) | _ids(model_cfg.get("eos_token_id"))
        if (e := self.token_id(self.special_tokens.get("eos_token"))) is not None:
            eos.add(e)
        self.eos_ids = frozenset(eos)
        if self.bos_id is None and model_cfg.get("bos_token_id") is not None:
            self.bos_id = int(model_cfg["bos_token_id"])
        self.add_bos = self._wants_bos()
        tmpl_file = self.dir / "chat_template.jinja"
        self.chat_template: str | None = tmpl_file.read_text() if tmpl_file.is_file() else None
        if self.chat_template is None and isinstance(self.config.get("chat_template"), str):
            self.chat_template = self.config["chat_template"]

    def token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        tid = self._tok.token_to_id(token) if self._fast else self._tok.convert_tokens_to_ids(token)
        return None if tid is None or (not self._fast and tid == self._tok.unk_token_id) else int(tid)

    def _wants_bos(self) -> bool:
        """tokenizer_config's add_bos_token if set; otherwise whether the post-processor adds the BOS."""
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"]) and self.bos_id is not None
        if self.bos_id is None:
            return False
        if self._fast:
            with_special = self._tok.encode("a", add_special_tokens=True).ids
        else:
            with_special = self._tok.encode("a", add_special_tokens=True)
        return bool(with_special) and with_special[0] == self.bos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if self._fast else len(self._tok)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        if self._fast:
            # encode_special_tokens=True makes "<|im_end|>" in plain text ordinary characters, as
            # llama.cpp does with special=False; chat prompts need them parsed.
            self._tok.encode_special_tokens = not special
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=not special))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_to(self, rt) -> None:
        """Copy tokenizer facts onto a Runtime instance."""
        rt.eos_ids, rt.bos_id, rt.add_bos = self.eos_ids, self.bos_id, self.add_bos
        rt.chat_template, rt.special_tokens = self.chat_template, dict(self.special_tokens)
