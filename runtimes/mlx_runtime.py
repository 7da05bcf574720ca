"""MLX backend: MLX-LM model folders (``dsq export --to mlx``, or any mlx_lm-saved model) through ``mlx_lm``.

The model is built by ``mlx_lm.utils.load_model`` (the loader behind ``mlx_lm.load``: quantized linears
become ``nn.QuantizedLinear`` from the folder's ``scales``/``biases``); the KV cache is mlx_lm's own
(``make_prompt_cache``). Tokenizer and generation settings come from the files next to the weights, read
by dsq's tokenizer like the other backends, so every runtime tokenizes alike. MLX runs on Apple Silicon's
GPU (Metal) and, with the ``mlx[cpu]`` wheel, on Linux CPUs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dsq.dsquant.errors import CorruptFileError, InputError

from .base import Availability, Runtime
from .hf_tokenizer import HFTokenizer

_DTYPES = ("float16", "bfloat16", "float32")


def is_mlx_dir(path: Path) -> bool:
    """An MLX-LM folder: config.json with MLX's ``quantization`` key, or weights whose safetensors metadata
    says ``format: mlx`` (what mlx_lm and dsq write, quantized or not)."""
    path = Path(path)
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        if isinstance(json.loads(cfg.read_text()).get("quantization"), dict):
            return True
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    from dsq.dsquant.safetensors_io import read_header

    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        return False
    try:
        _, meta = read_header(shards[0])
    except Exception:  # an unreadable file is not an MLX folder; the loader would name the damage
        return False
    return (meta or {}).get("format") == "mlx"


class MlxRuntime(Runtime):
    name = "mlx"
    priority = 30  # native; after onnxruntime (20), before the torch reference (90)
    pip_extra = "mlx"
    model_kind = "an MLX-LM folder (dsq export --to mlx)"
    reads_format = "mlx"  # base.model_format tells MLX folders (is_mlx_dir) from Hugging Face ones

    @classmethod
    def available(cls) -> Availability:
        try:
            import mlx.core as mx
            import mlx_lm
        except ImportError as e:
            return Availability(False, f"{e.name} is not installed: pip install 'dsq[mlx]'")
        devices = ["cpu"]
        if mx.metal.is_available():
            devices.append("metal")
        note = "" if "metal" in devices else "metal: Apple Silicon (the macOS mlx wheel)"
        return Availability(True, "", tuple(devices), f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}", note)

    @classmethod
    def load(cls, path: Path, device: str = "cpu", *, threads: int | None = None, n_ctx: int | None = None,
             dtype: str | None = None) -> MlxRuntime:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self = cls()
        self.path, self.device = Path(path), device
        mx.set_default_device(mx.gpu if device == "metal" else mx.cpu)
        self.threads = threads  # MLX sizes its CPU thread pool itself
        try:
            self.model, _ = load_model(self.path)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise CorruptFileError(f"{self.path}: mlx_lm cannot load it ({str(e).splitlines()[0]})") from None
        # MLX's CPU kernels are slow in float16 (measured 29x the CPU time of float32 on SmolLM2-135M int4, and
        # further from the reference): on CPU compute in float32 unless asked. Quantized weights stay packed;
        # scales, biases and float tensors take the dtype (float16/bfloat16 -> float32 is exact).
        dtype = dtype or ("float32" if device == "cpu" else None)
        if dtype is not None:
            if dtype not in _DTYPES:
                raise InputError(f"--dtype {dtype}: the mlx runtime computes in one of {', '.join(_DTYPES)}")
            self.model.set_dtype(getattr(mx, dtype))
        self.dtype = dtype
        self.tok = HFTokenizer(self.path)
        self.tok.apply_to(self)
        self.vocab_size = int(self.model.args.vocab_size) if hasattr(self.model, "args") else self.logits([0]).shape[-1]
        self._cache = None
        return self

    @property
    def description(self) -> str:
        return f"mlx on {self.device}" + (f" ({self.dtype})" if self.dtype else "")

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tok.tokenize(text, special)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tok.detokenize(ids)

    def _forward(self, ids: list[int], cache) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array([ids], dtype=mx.int32), cache=cache)
        return np.array(out[0].astype(mx.float32))

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._forward(ids, None)

    def prefill(self, ids: list[int]) -> np.ndarray:
        from mlx_lm.models.cache import make_prompt_cache

        self._cache = make_prompt_cache(self.model)
        return self._forward(ids, self._cache)[-1]

    def decode(self, token: int) -> np.ndarray:
        if self._cache is None:
            raise InputError("decode() before prefill()")
        return self._forward([token], self._cache)[-1]

    def close(self) -> None:
        self.model = None
        self._cache = None
