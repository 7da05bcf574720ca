"""onnxruntime backend: the decoder graph dsq's ONNX exporter writes, on the execution providers present.

The graph's contract (the same as Hugging Face Optimum / onnxruntime-genai decoders):
inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq], ``position_ids`` [batch, seq],
``past_key_values.N.key|value`` [batch, kv_heads, past, head_dim]; outputs ``logits`` [batch, seq, vocab]
and ``present.N.key|value`` [batch, kv_heads, past+seq, head_dim]. A first call passes a zero-length past.
Tokenizer and generation settings come from the files next to ``model.onnx``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dsq.dsquant.errors import CorruptFileError, InputError
from dsq.export.onnx_guard import check_onnx_file

from .base import Availability, Runtime
from .hf_tokenizer import HFTokenizer

# dsq device name -> onnxruntime execution provider
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
# Where the other execution providers come from (onnxruntime's install docs).
_EP_PACKAGE = {
    "cpu": "every onnxruntime build",
    "cuda": "pip install onnxruntime-gpu (NVIDIA)",
    "coreml": "the macOS onnxruntime wheel",
    "dml": "pip install onnxruntime-directml (Windows)",
}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    priority = 20
    pip_extra = "onnx"
    model_kind = "model.onnx (or its directory)"
    reads_format = "onnx"

    @classmethod
    def available(cls) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError:
            return Availability(False, "onnxruntime is not installed: pip install 'dsq[onnx]'")
        present = set(ort.get_available_providers())
        devices = tuple(d for d, p in PROVIDERS.items() if p in present)
        note = "; ".join(f"{d}: {_EP_PACKAGE[d]}" for d in PROVIDERS if d not in devices)
        return Availability(True, "", devices, f"onnxruntime {ort.__version__}", note)

    @classmethod
    def load(cls, path: Path, device: str = "cpu", *, threads: int | None = None, n_ctx: int | None = None,
             dtype: str | None = None) -> OnnxRuntime:
        import onnxruntime as ort

        path = Path(path)
        model = path / "model.onnx" if path.is_dir() else path
        self = cls()
        self.path, self.device = path, device
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # the fusions the graph is written for
        if threads:
            opts.intra_op_num_threads = threads
        self.threads = threads or 0  # 0: onnxruntime's default (physical cores)
        self.n_ctx = n_ctx
        providers = [PROVIDERS[device]] + (["CPUExecutionProvider"] if device != "cpu" else [])
        # dsq's own external-data guard on every load: older onnxruntime follows `../x`, absolute paths
        # and symlinks out of the folder (CVE-2022-25882, CVE-2024-27318, CVE-2025-51480).
        model = check_onnx_file(model)
        try:
            self.sess = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
        except Exception as e:
            raise CorruptFileError(f"{model}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        self._layout()
        self._shared = device == "cpu" and _shares_buffer(model.parent)
        self.tok = HFTokenizer(model.parent)
        self.tok.apply_to(self)
        return self

    def _layout(self) -> None:
        """Read the past-KV inputs (count, shapes, dtype) and the vocabulary size from the graph."""
        ins = {i.name: i for i in self.sess.get_inputs()}
        outs = {o.name: o for o in self.sess.get_outputs()}
        for need in ("input_ids", "attention_mask"):
            if need not in ins:
                raise CorruptFileError(f"{self.path}: ONNX graph has no `{need}` input; not a dsq/Optimum decoder export")
        if "logits" not in outs:
            raise CorruptFileError(f"{self.path}: ONNX graph has no `logits` output")
        self._past: list[tuple[str, str, tuple[int, int], type]] = []  # (input, output, (heads, dim), dtype)
        for name, arg in ins.items():
            m = _PAST.match(name)
            if m:
                heads, dim = arg.shape[1], arg.shape[3]
                if not (isinstance(heads, int) and isinstance(dim, int)):
                    raise CorruptFileError(f"{self.path}: input {name} needs fixed heads/head_dim, has {arg.shape}")
                out = f"present.{m.group(1)}.{m.group(2)}"
                if out not in outs:
                    raise CorruptFileError(f"{self.path}: input {name} has no matching output {out}")
                self._past.append((name, out, (heads, dim), _ORT_TYPES.get(arg.type, np.float32)))
        self._has_pos = "position_ids" in ins
        v = outs["logits"].shape[-1]
        self._out_names = ["logits"] + [p[1] for p in self._past]
        self._cache: dict[str, np.ndarray] | None = None
        self._kv: dict[str, np.ndarray] | None = None  # the shared past/present buffers (GroupQueryAttention graphs)
        self._bind = None  # the IOBinding holding them
        self._logits1 = self._logits1_value = None  # a decode step's logits buffer
        self._logits_type = _ORT_TYPES.get(outs["logits"].type, np.float32)
        self._kv_cap = 0
        self._shared = False
        self._pos = 0
        self.vocab_size = v if isinstance(v, int) else self.logits([0]).shape[-1]  # symbolic: run one token

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tok.tokenize(text, special)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tok.detokenize(ids)

    def _run_shared(self, ids: list[int], start: int) -> np.ndarray:
        """One step on a GroupQueryAttention graph with past and present bound to one preallocated buffer per
        cache tensor (as onnxruntime-genai's past_present_share_buffer): the op appends the new positions in
        place, so a decode step copies nothing of the cache. The buffers grow (doubling) past their capacity."""
        import onnxruntime as ort

        n = len(ids)
        total = start + n
        if self._kv is None or total > self._kv_cap:
            cap = max(total, 2 * self._kv_cap if self._kv is not None else self.n_ctx or 256)
            new = {name: np.zeros((1, heads, cap, dim), dt) for name, _, (heads, dim), dt in self._past}
            if start and self._kv is not None:
                for name in new:
                    new[name][:, :, :start] = self._kv[name][:, :, :start]
            self._kv, self._kv_cap = new, cap
            # One binding per buffer generation: the cache tensors (2 per layer) are bound once here, not re-wrapped
            # and re-bound every step (which cost Python time per token); each step rebinds only its inputs.
            bind = self.sess.io_binding()
            bind.bind_output("logits")  # first: get_outputs() lists outputs in binding order
            for name, out, _, _ in self._past:
                value = ort.OrtValue.ortvalue_from_numpy(self._kv[name])  # shares the numpy buffer
                bind.bind_ortvalue_input(name, value)
                bind.bind_ortvalue_output(out, value)
            self._bind = bind
        bind = self._bind
        if n == 1:  # a decode step: logits into one preallocated [1, 1, vocab] buffer
            if self._logits1 is None:
                self._logits1 = np.empty((1, 1, self.vocab_size), self._logits_type)
                self._logits1_value = ort.OrtValue.ortvalue_from_numpy(self._logits1)
            bind.bind_ortvalue_output("logits", self._logits1_value)
        else:
            bind.bind_output("logits")  # (rebinding keeps its place: get_outputs()[0])
        bind.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        bind.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if self._has_pos:
            bind.bind_cpu_input("position_ids", np.arange(start, total, dtype=np.int64)[None])
        self.sess.run_with_iobinding(bind)
        self._cache = self._kv  # decode() may follow
        raw = self._logits1 if n == 1 else bind.get_outputs()[0].numpy()
        logits = raw[0].astype(np.float32)  # a copy: the decode buffer is overwritten by the next step
        self.vocab_size = logits.shape[-1]
        return logits

    def _run(self, ids: list[int], past: dict[str, np.ndarray] | None, start: int) -> np.ndarray:
        if self._shared:
            return self._run_shared(ids, start)
        n = len(ids)
        feed = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
        }
        if self._has_pos:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        for name, _, (heads, dim), dt in self._past:
            feed[name] = past[name] if past else np.zeros((1, heads, 0, dim), dtype=dt)
        out = self.sess.run(self._out_names, feed)
        self._cache = {p[0]: o for p, o in zip(self._past, out[1:], strict=True)}
        logits = out[0][0].astype(np.float32, copy=False)
        self.vocab_size = logits.shape[-1]
        return logits

    def logits(self, ids: list[int]) -> np.ndarray:
        out = self._run(ids, None, 0)
        self._cache = None  # not a generation: do not hold the KV arrays
        return out

    def prefill(self, ids: list[int]) -> np.ndarray:
        self._pos = len(ids)
        return self._run(ids, None, 0)[-1]

    def decode(self, token: int) -> np.ndarray:
        if self._cache is None:
            raise InputError("decode() before prefill()")
        row = self._run([token], self._cache, self._pos)[-1]
        self._pos += 1
        return row

    def close(self) -> None:
        self.sess = None
        self._cache = self._kv = self._bind = None


def _shares_buffer(folder: Path) -> bool:
    """Whether the export says its graph appends to a shared past/present buffer (genai_config.json's
    ``search.past_present_share_buffer``, written for GroupQueryAttention graphs). Unreadable: no."""
    import json

    try:
        cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        return cfg["search"]["past_present_share_buffer"] is True
    except (OSError, ValueError, KeyError, TypeError):
        return False
