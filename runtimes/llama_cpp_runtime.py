"""llama.cpp backend through llama-cpp-python: GGUF files, CPU, with GPU layer offload when the build has it.

The tokenizer is the GGUF's own (llama.cpp's), so ``dsq eval`` checks it against the reference's.
Full-sequence logits use llama-cpp-python's batch and context objects directly (``Llama._batch``,
``Llama._ctx``, present since 0.3.0) so every position's logits come back from one ``llama_decode``
per batch, without the ``logits_all`` buffer of ``n_ctx x n_vocab`` floats that generation does not need.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dsq.dsquant.errors import CorruptFileError, InputError

from .base import Availability, Runtime

_GPU_DEVICES = ("cuda", "metal", "vulkan")  # llama.cpp offloads to whichever GPU backend it was built with


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs model loading to fd 2 from C; keep the terminal clean unless DSQ_VERBOSE is set."""
    if os.environ.get("DSQ_VERBOSE"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaCppRuntime(Runtime):
    name = "llama-cpp"
    priority = 10
    pip_extra = "llama-cpp"
    model_kind = "a .gguf file"
    reads_format = "gguf"

    @classmethod
    def available(cls) -> Availability:
        try:
            import llama_cpp
        except ImportError:
            return Availability(False, "llama-cpp-python is not installed: pip install 'dsq[llama-cpp]'")
        devices = ["cpu"]
        note = ""
        if llama_cpp.llama_supports_gpu_offload():
            devices.extend(_gpu_kinds(llama_cpp))
        else:
            note = ("GPU offload: not in this build; reinstall with CMAKE_ARGS=\"-DGGML_CUDA=on\" (or -DGGML_METAL=on, "
                    "-DGGML_VULKAN=on) pip install --force-reinstall --no-cache-dir llama-cpp-python")
        return Availability(True, "", tuple(devices), f"llama-cpp-python {llama_cpp.__version__}", note)

    @classmethod
    def load(cls, path: Path, device: str = "cpu", *, threads: int | None = None, n_ctx: int | None = None,
             dtype: str | None = None) -> LlamaCppRuntime:
        from llama_cpp import Llama

        path = Path(path)
        if path.is_dir():
            path = next(path.glob("*.gguf"), None)
            if path is None:
                raise InputError(f"{path}: no .gguf file in the folder")
        check_gguf(path)  # before llama.cpp sees it: its asserts abort the process (SIGABRT), not raise
        self = cls()
        self.path, self.device = path, device
        self.threads = threads or max(1, os.cpu_count() or 1)
        n_ctx = n_ctx or 2048
        with _quiet_stderr():
            try:
                self.llm = Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=self.threads,
                    n_threads_batch=self.threads, n_gpu_layers=0 if device == "cpu" else -1, verbose=False,
                )
            except ValueError as e:  # llama-cpp-python raises ValueError("Failed to load model from file")
                raise InputError(f"{path}: llama.cpp cannot load this GGUF ({e}); run with DSQ_VERBOSE=1 for its log") from None
            except Exception as e:  # e.g. jinja2's TemplateSyntaxError from its chat-template compile
                raise InputError(
                    f"{path}: llama-cpp-python cannot load this GGUF ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                ) from None
        self.n_ctx = self.llm.n_ctx()
        self.vocab_size = self.llm.n_vocab()
        meta = self.llm.metadata
        self.bos_id = self.llm.token_bos() if self.llm.token_bos() >= 0 else None
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true" and self.bos_id is not None
        vocab = self.llm._model.vocab
        import llama_cpp

        # Every end-of-generation token (EOS, EOT, <|im_end|>...), as llama.cpp itself decides.
        self.eos_ids = frozenset(t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t))
        self.chat_template = meta.get("tokenizer.chat_template")
        self.special_tokens = {}
        for key, tid in (("bos_token", self.bos_id), ("eos_token", self.llm.token_eos())):
            if tid is not None and tid >= 0:
                self.special_tokens[key] = self.llm.detokenize([tid], special=True).decode("utf-8", "replace")
        return self

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def _check_len(self, n: int) -> None:
        if n > self.n_ctx:
            raise InputError(f"{n} tokens do not fit the llama.cpp context of {self.n_ctx} (loaded with n_ctx={self.n_ctx})")

    def _run(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Decode ``ids`` at positions ``start...``; logits of every position, or of the last only."""
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, start, -1)
        rows = []
        for i in range(0, len(ids), llm.n_batch):
            batch = ids[i : i + llm.n_batch]
            llm._batch.set_batch(batch=batch, n_past=start + i, logits_all=all_logits)
            llm._ctx.decode(llm._batch)
            n = len(batch) if all_logits else 1
            out = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n * self.vocab_size,))
            rows.append(out.reshape(n, self.vocab_size).copy())
        llm.n_tokens = start + len(ids)
        return np.concatenate(rows) if all_logits else rows[-1][-1]

    def logits(self, ids: list[int]) -> np.ndarray:
        self._check_len(len(ids))
        return self._run(ids, 0, True)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self._check_len(len(ids))
        self._pos = len(ids)
        return self._run(ids, 0, False)

    def decode(self, token: int) -> np.ndarray:
        self._check_len(self._pos + 1)
        row = self._run([token], self._pos, False)
        self._pos += 1
        return row

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


# Bounds for GGUF hyperparameters (the same reasoning as dsquant.schema: far above released models).
_GGUF_LIMITS = {"block_count": 2048, "embedding_length": 1 << 20, "attention.head_count": 16384,
                "attention.head_count_kv": 16384, "feed_forward_length": 1 << 22, "context_length": 1 << 27,
                "expert_count": 65536, "expert_used_count": 65536}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def check_gguf(path: Path) -> None:
    """Refuse a GGUF whose hyperparameters are absurd or disagree with its tensors, before llama.cpp loads it.

    llama.cpp sizes its buffers from ``ARCH.block_count`` and friends and GGML_ASSERTs (aborting the whole
    process) when they disagree with the tensors; dsq's own bounded GGUF parser (dsquant.inspect) reads the
    header instead. Also parses the embedded chat template, which llama-cpp-python compiles on load.
    Raises InputError/CorruptFileError naming the file and key.
    """
    from dsq.dsquant.inspect import describe_gguf
    from dsq.dsquant.paths import require_regular_file

    desc = describe_gguf(require_regular_file(path))
    meta = desc.facts
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CorruptFileError(f"{path}: no `general.architecture` string; not a model GGUF")
    for key, limit in _GGUF_LIMITS.items():
        v = meta.get(f"{arch}.{key}")
        if isinstance(v, str) and v.startswith("["):
            continue  # a long per-layer array, summarized by the parser (llama.cpp checks its length)
        values = v if isinstance(v, list) else [v]  # head_count_kv may be per layer
        for x in values:
            if x is None:
                continue
            zero_ok = key == "attention.head_count_kv"  # attention-free layers (hybrid models)
            in_range = isinstance(x, int) and not isinstance(x, bool) and (0 < x <= limit or (zero_ok and x == 0))
            if not in_range:
                raise CorruptFileError(f"{path}: `{arch}.{key}` = {x!r} is out of range (1..{limit})")
    blocks = meta.get(f"{arch}.block_count")
    if blocks is None:
        raise CorruptFileError(f"{path}: no `{arch}.block_count`; not a model GGUF")
    present = {int(m.group(1)) for name, *_ in desc.tensors if (m := _BLOCK.match(name))}
    split = meta.get("split.count", 1)
    # A split GGUF (gguf-split, --split-max-size) holds only some blocks per file: checked by range only.
    if present and split in (0, 1) and (max(present) + 1 != blocks or len(present) != blocks):
        raise CorruptFileError(
            f"{path}: `{arch}.block_count` = {blocks} but the tensors have {len(present)} blocks "
            f"(blk.0..blk.{max(present)}); the header disagrees with the weights"
        )
    heads, width = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.embedding_length")
    if isinstance(heads, int) and isinstance(width, int) and heads and width % heads and \
            f"{arch}.attention.key_length" not in meta:
        raise CorruptFileError(f"{path}: `{arch}.embedding_length` {width} is not a multiple of head_count {heads}")
    # llama-cpp-python compiles every tokenizer.chat_template[.NAME] on load; a syntax error there escapes as
    # jinja2's exception, so parse them first (parsing runs nothing).
    import jinja2

    from dsq.dsquant.sandbox import BoundedEnvironment

    for key, template in meta.items():
        if not key.startswith("tokenizer.chat_template") or not isinstance(template, str):
            continue
        try:
            BoundedEnvironment().parse(template)
        except jinja2.TemplateError as e:
            raise CorruptFileError(f"{path}: `{key}` is not a valid Jinja template ({e})") from None
        except RecursionError:
            raise CorruptFileError(f"{path}: `{key}` nests too deeply") from None


def _gpu_kinds(llama_cpp) -> list[str]:
    """Which GPU backends this llama.cpp build registered (ggml backend registry names)."""
    names = []
    try:
        for i in range(llama_cpp.ggml_backend_reg_count()):
            names.append(llama_cpp.ggml_backend_reg_name(llama_cpp.ggml_backend_reg_get(i)).decode().lower())
    except AttributeError:  # older bindings without the registry: offload works, kind unknown
        return ["gpu"]
    return [d for d in _GPU_DEVICES if any(d in n for n in names)] or ["gpu"]
