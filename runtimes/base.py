"""The runtime interface every backend implements, and what they share: sampling and streaming text.

A backend is a subclass of :class:`Runtime`. Its class methods say whether it can run here
(``available``) and whether it reads a given model path (``accepts``); ``load`` returns an instance
bound to one model. An instance tokenizes, returns full-sequence logits (``logits``: ``[T, V]``
float32, used by ``dsq eval``), and keeps one KV-cached sequence for generation (``prefill`` then
``decode``), on top of which :meth:`Runtime.generate` streams text. Backends are found through the
``dsq.runtimes`` entry-point group (see :mod:`dsq.runtimes.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this machine; ``reason`` says why not and how to fix it."""

    ok: bool
    reason: str = ""
    devices: tuple[str, ...] = ()
    version: str = ""
    other_devices: str = ""  # devices this backend supports elsewhere, and what would enable them here


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature == 0`` is greedy (argmax), the default."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """Chooses the next token from a logits row, the same way in every backend."""

    def __init__(self, sampling: Sampling):
        self.s = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.s.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.s.temperature
        if 0 < self.s.top_k < z.size:
            kth = np.partition(z, -self.s.top_k)[-self.s.top_k]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.s.top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.s.top_p  # smallest prefix reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))


@dataclass
class GenerationStats:
    """Filled in by :meth:`Runtime.generate` as it runs (seconds, token counts)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # prefill + choosing the first token
    decode_s: float = 0.0
    stopped_by: str = ""  # "eos", "stop", "length"
    token_ids: list[int] = field(default_factory=list)


class Runtime(ABC):
    """One model loaded in one backend. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    pip_extra: ClassVar[str | None] = None  # `pip install 'dsq[<extra>]'` installs what it needs
    priority: ClassVar[int] = 50  # `--runtime auto` tries lower first: native runtimes before the torch reference
    model_kind: ClassVar[str] = ""  # what ``accepts`` takes, for messages ("a .gguf file")
    reads_format: ClassVar[str | None] = None  # "gguf" | "onnx" | "hf": the default ``accepts`` checks it

    # Set by load():
    path: Path
    device: str
    vocab_size: int
    eos_ids: frozenset[int] = frozenset()
    bos_id: int | None = None
    add_bos: bool = False  # the model expects BOS before the text (tokenizer config / GGUF metadata)
    chat_template: str | None = None
    special_tokens: dict[str, str] = {}  # bos_token, eos_token: strings the chat template refers to
    threads: int | None = None

    # -- class level ---------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def available(cls) -> Availability:
        """Can this backend run here (package importable), on which devices; if not, why and which extra."""

    @classmethod
    def accepts(cls, path: Path) -> str | None:
        """None if ``load(path)`` will read this model; otherwise a one-line reason naming the path.
        dsq's backends say which format they read in ``reads_format``; a plugin may override this."""
        if cls.reads_format is None:
            raise NotImplementedError(f"{cls.__name__} must set reads_format or override accepts()")
        return wrong_kind(path, cls.name, cls.reads_format)

    @classmethod
    @abstractmethod
    def load(cls, path: Path, device: str = "cpu", *, threads: int | None = None, n_ctx: int | None = None,
             dtype: str | None = None) -> Runtime:
        """Load the model at ``path`` on ``device``; ``n_ctx``: longest sequence the caller will pass."""

    # -- instance ------------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``, no BOS added; ``special``: parse special-token strings (chat prompts)."""

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""

    @abstractmethod
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of one sequence, ``[len(ids), vocab]`` float32 (no cache kept)."""

    @abstractmethod
    def prefill(self, ids: list[int]) -> np.ndarray:
        """Start a new cached sequence with ``ids``; the logits row after its last token, ``[vocab]``."""

    @abstractmethod
    def decode(self, token: int) -> np.ndarray:
        """Append one token to the cached sequence; the next logits row, ``[vocab]``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model (backends holding native memory override this)."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def description(self) -> str:
        return f"{self.name} on {self.device}"

    # -- shared --------------------------------------------------------------------------------------
    def encode_prompt(self, text: str, special: bool = True) -> list[int]:
        """Token ids the model should see for a prompt: BOS first when the model wants it."""
        ids = self.tokenize(text, special=special)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 256,
        sampling: Sampling | None = None,
        stop: tuple[str, ...] = (),
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Stream the continuation of ``prompt`` as text pieces, until EOS, a ``stop`` string or the limit."""
        import time

        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        st = stats if stats is not None else GenerationStats()
        st.prompt_tokens = len(ids)
        sample = Sampler(sampling or Sampling())
        stream = TextStream(self.detokenize)
        t0 = time.perf_counter()
        row = self.prefill(ids)
        st.prefill_s = time.perf_counter() - t0
        st.stopped_by = "length"
        emitted = ""
        for i in range(max_new_tokens):
            tok = sample(row)
            if i == 0:
                st.first_token_s = time.perf_counter() - t0
            if tok in self.eos_ids:
                st.stopped_by = "eos"
                break
            st.token_ids.append(tok)
            st.new_tokens += 1
            piece = stream.push(tok)
            if piece:
                emitted += piece
                hit = next((s for s in stop if s in emitted), None)
                if hit:
                    # Emit only up to the stop string; the model already produced it.
                    cut = emitted.index(hit)
                    rest = piece[: max(0, len(piece) - (len(emitted) - cut))]
                    if rest:
                        yield rest
                    st.stopped_by = "stop"
                    break
                yield piece
            if i + 1 < max_new_tokens:
                t1 = time.perf_counter()
                row = self.decode(tok)
                st.decode_s += time.perf_counter() - t1
        tail = stream.flush()
        if tail and st.stopped_by != "stop":
            yield tail


class TextStream:
    """Turns a stream of token ids into text pieces without splitting multi-byte characters.

    Decoding token by token breaks characters spread over several byte-level tokens, and
    SentencePiece drops the leading space of a lone token, so each step decodes a short window of
    the ids and emits what is new, holding back text that ends in an incomplete character (U+FFFD).
    """

    def __init__(self, detokenize):
        self.detokenize = detokenize
        self.ids: list[int] = []
        self.prefix = 0  # window start: ids before it are final
        self.read = 0  # ids[prefix:read] decode to the text already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.detokenize(self.ids[self.prefix : self.read])
        text = self.detokenize(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            piece = text[len(done) :]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        done = self.detokenize(self.ids[self.prefix : self.read])
        text = self.detokenize(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]


def file_size(path: Path) -> int:
    """Bytes of a model: the file, or every file under the directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# What a model path is, by its bytes and layout (not by the runtime asked for), for "wrong runtime" messages.
_KINDS = {"gguf": "a GGUF file (llama-cpp)", "onnx": "an ONNX model (onnxruntime)", "hf": "a Hugging Face directory (torch)",
          "mlx": "an MLX-LM folder (mlx)"}


def model_format(path: Path) -> str:
    """'gguf', 'onnx', 'mlx', 'hf' or 'unknown'."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return "onnx"
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            from .mlx_runtime import is_mlx_dir  # no mlx import: reads config.json and a safetensors header

            return "mlx" if is_mlx_dir(path) else "hf"
        if len(ggufs := list(path.glob("*.gguf"))) == 1:
            return model_format(ggufs[0])
        return "unknown"
    if not path.is_file():
        return "unknown"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if path.suffix == ".onnx":
        return "onnx"
    return "unknown"


def wrong_kind(path: Path, runtime: str, wants: str) -> str | None:
    """None if ``path`` is of kind ``wants``; else the message a runtime's ``accepts`` returns."""
    kind = model_format(path)
    if kind == wants:
        return None
    what = _KINDS.get(kind, "not a model dsq recognises (a .gguf, an .onnx or a HF directory)")
    return f"{path}: runtime {runtime} reads {_KINDS[wants].split(' (')[0]}, but this is {what}"
