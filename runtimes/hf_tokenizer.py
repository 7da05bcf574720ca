"""The tokenizer and generation settings of a Hugging Face style model directory.

Shared by the torch and onnxruntime backends (an ONNX export carries the same tokenizer files). Every
fact (BOS/EOS/end-of-generation ids, whether BOS is added, the chat template, the normalizer and
pre-tokenizer transformers really runs) comes from :func:`dsq.dsquant.tokenizer_facts.resolve_tokenizer`,
the resolver the exporters use too. ``tokenizer.json`` is run with the ``tokenizers`` library directly
(no torch import), as transformers' tokenizer class would run it; directories with only a SentencePiece
``tokenizer.model`` go through ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from dsq.dsquant.errors import CorruptFileError, InputError
from dsq.dsquant.paths import resolve_model_file
from dsq.dsquant.tokenizer_facts import resolve_tokenizer


class HFTokenizer:
    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if resolve_model_file(self.dir, "tokenizer.json") is None and resolve_model_file(self.dir, "tokenizer.model") is None:
            raise InputError(f"{self.dir}: no tokenizer.json or tokenizer.model next to the model")
        self.facts = resolve_tokenizer(self.dir)
        if self.facts.effective_tokenizer is not None:
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_str(json.dumps(self.facts.effective_tokenizer))
            except Exception as e:
                raise CorruptFileError(f"{self.dir / 'tokenizer.json'}: cannot be read as a tokenizer ({e})") from None
            self._fast = True
        else:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self.dir))
            self._fast = False
        f = self.facts
        self.bos_id = f.bos_id
        self.eos_ids = frozenset(f.eog_ids)
        self.add_bos = f.add_bos
        self.chat_template = f.chat_template
        self.special_tokens = f.special_tokens

    def token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        tid = self._tok.token_to_id(token) if self._fast else self._tok.convert_tokens_to_ids(token)
        return None if tid is None or (not self._fast and tid == self._tok.unk_token_id) else int(tid)

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
