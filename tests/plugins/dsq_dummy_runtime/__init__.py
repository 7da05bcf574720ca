"""A third-party runtime plugin for tests: registered only through a ``dsq.runtimes`` entry point.

It "runs" ``*.dummy`` files: a byte-level model whose next token is always the byte after the
current one, so generation is predictable ("a" continues "bcd...").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dsq.runtimes.base import Availability, Runtime


class DummyRuntime(Runtime):
    name = "dummy"
    pip_extra = None
    model_kind = "a .dummy file"

    @classmethod
    def available(cls) -> Availability:
        return Availability(True, "", ("cpu",), "dummy 0.1")

    @classmethod
    def accepts(cls, path: Path) -> str | None:
        return None if Path(path).suffix == ".dummy" else f"{path}: runtime dummy reads .dummy files"

    @classmethod
    def load(cls, path, device="cpu", *, threads=None, n_ctx=None, dtype=None) -> DummyRuntime:
        self = cls()
        self.path, self.device, self.vocab_size = Path(path), device, 256
        self.eos_ids = frozenset({ord("z")})
        return self

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def _row(self, token: int) -> np.ndarray:
        row = np.zeros(256, dtype=np.float32)
        row[(token + 1) % 256] = 10.0
        return row

    def logits(self, ids: list[int]) -> np.ndarray:
        return np.stack([self._row(t) for t in ids])

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._row(ids[-1])

    def decode(self, token: int) -> np.ndarray:
        return self._row(token)
