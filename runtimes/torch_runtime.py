"""Reference backend: transformers on torch, fp32/bf16/fp16 on CPU, CUDA or Apple (mps).

Reads a Hugging Face directory. dsq's own quantized output (compressed-tensors int4/int8, block FP8)
is loaded as its dequantized model: every weight is ``QuantizedTensor.dequantize()`` of the stored
codes, so the model computes with exactly the values dsq wrote, without needing a quantization kernel.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .base import Availability, Runtime
from .hf_tokenizer import HFTokenizer

# dsq device name -> torch device type
_DEVICES = {"cpu": "cpu", "cuda": "cuda", "metal": "mps"}
_DTYPES = ("float32", "bfloat16", "float16")


class TorchRuntime(Runtime):
    name = "torch"
    priority = 90
    pip_extra = None  # torch and transformers are core dependencies
    model_kind = "a Hugging Face directory"
    reads_format = "hf"
    _caching = False

    @classmethod
    def available(cls) -> Availability:
        try:
            import torch
            import transformers
        except ImportError as e:
            return Availability(False, f"{e.name} is not installed (pip install 'dsq' installs torch + transformers)")
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices.append("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("metal")
        missing = [d for d in _DEVICES if d not in devices]
        note = f"{', '.join(missing)}: not seen by this torch build ({torch.__version__})" if missing else ""
        return Availability(True, "", tuple(devices), f"torch {torch.__version__}, transformers {transformers.__version__}",
                            note)

    @classmethod
    def load(cls, path: Path, device: str = "cpu", *, threads: int | None = None, n_ctx: int | None = None,
             dtype: str | None = None, layerwise: bool | None = None, log=None) -> TorchRuntime:
        """Load ``path``; ``layerwise`` (None: when the float32 model would not fit, see runtimes/layerwise.py)
        computes logits one decoder layer at a time and cannot generate."""
        import torch

        self = cls()
        self.path, self.device = Path(path), device
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
        if dtype not in _DTYPES:
            from dsq.dsquant.errors import InputError

            raise InputError(f"--dtype {dtype}: torch runtime computes in one of {', '.join(_DTYPES)}")
        self.dtype = dtype
        self._dev = torch.device(_DEVICES[device])
        self._stream = None
        quantized = bool(json.loads((self.path / "config.json").read_text()).get("quantization_config"))
        if layerwise is None and not quantized:
            from .layerwise import should_stream

            layerwise, why = should_stream(self.path, device)
            if layerwise and log:
                log(f"{self.path.name}: logits layer by layer ({why})")
        if layerwise:
            from .layerwise import LayerStream

            if quantized or device != "cpu":
                from dsq.dsquant.errors import InputError

                raise InputError(f"{self.path}: layer-by-layer logits need a float checkpoint on cpu")
            self._stream = LayerStream(self.path)
            self.model = None
            self.dtype = "float32"
            self.tok = HFTokenizer(self.path)
            self.tok.apply_to(self)
            self.vocab_size = int(self._stream.dec.config.get_text_config().vocab_size)
            self._past = None
            self._cache_arg = "past_key_values"
            return self
        self.model = _load_model(self.path, getattr(torch, dtype)).to(self._dev).eval()
        self.tok = HFTokenizer(self.path)
        self.tok.apply_to(self)
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        self._past = None
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        return self

    @property
    def description(self) -> str:
        return f"torch {self.dtype} on {self.device}" + (", layer by layer" if self._stream is not None else "")

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tok.tokenize(text, special)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tok.detokenize(ids)

    @property
    def layerwise(self) -> bool:
        return self._stream is not None

    def logits_batch(self, inputs: list[list[int]], log=lambda m: None):
        """Logits of each input in order; a layer-by-layer model reads its weights once for all of them."""
        if self._stream is not None:
            yield from self._stream.logits_batch(inputs, log)
            return
        for ids in inputs:
            yield self.logits(ids)

    def _forward(self, ids: list[int], past=None):
        import torch

        if self._stream is not None:
            from dsq.dsquant.errors import InputError

            raise InputError(f"{self.path}: loaded layer by layer for its logits (too large for memory); "
                             "generation needs the whole model (set DSQ_REF_LAYERWISE=0 to force loading it)")

        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self._dev)
            # transformers >= 5.24 renamed the KV-cache argument to `cache` (`past_key_values` warns): use
            # whichever this model's forward takes, so dsq's own calls raise no deprecation warning.
            return self.model(input_ids=x, **{self._cache_arg: past}, use_cache=past is not None or self._caching)

    def logits(self, ids: list[int]) -> np.ndarray:
        if self._stream is not None:
            return self._stream.logits(ids)
        self._caching = False
        out = self._forward(ids)
        return out.logits[0].float().cpu().numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self._caching = True
        out = self._forward(ids)
        self._past = _cache_of(out)
        return out.logits[0, -1].float().cpu().numpy()

    def decode(self, token: int) -> np.ndarray:
        out = self._forward([token], self._past)
        self._past = _cache_of(out)
        return out.logits[0, -1].float().cpu().numpy()

    def close(self) -> None:
        self.model = None
        self._past = None


def _cache_of(out):
    """The KV cache of a forward's output: ``cache`` in transformers >= 5.24, ``past_key_values`` before."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.(mlp\.experts\.\d+\.(?:gate|up|down)_proj\.weight)$")


def _fuse_experts(model, state: dict) -> dict:
    """Per-expert checkpoint tensors (how dsq and DeepSeek write MoE layers) -> the fused ``gate_up_proj`` /
    ``down_proj`` parameters transformers' MoE modules hold, layer by layer (calibration's own rule)."""
    from dsq.dsquant.calib.moe_coverage import fuse_experts

    by_layer: dict[int, dict] = {}
    for key in [k for k in state if _EXPERT_KEY.match(k)]:
        m = _EXPERT_KEY.match(key)
        by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = state.pop(key)
    for i, experts in by_layer.items():
        fused = fuse_experts(model.model.layers[i], experts)
        state.update({f"model.layers.{i}.{k}": v for k, v in fused.items()})
    return state


def _load_model(path: Path, dtype):
    """A transformers model for ``path``; a quantized checkpoint comes back dequantized to ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with dsq's own output
    raw = json.loads((path / "config.json").read_text())
    if not raw.get("quantization_config"):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    from dsq.dsquant.errors import CorruptFileError
    from dsq.dsquant.quantized import QuantizedCheckpoint

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _fuse_experts(model, QuantizedCheckpoint(path).dequantized_state_dict(dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [m for m in missing if m not in tied and not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CorruptFileError(
            f"{path}: weights do not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model
