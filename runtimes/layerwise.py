"""Reference logits of a model too large for memory, one decoder layer at a time.

``dsq eval`` needs the bf16/fp16 reference's logits on every chunk of the text. A 7.6B model in
float32 is ~30 GB; even bf16 (15.2 GB) leaves no room on a 24 GB machine. Here the reference runs
like calibration does (dsquant/calib/pipeline.py ``Decoder``, transformers' own decoder-layer
classes): embed every chunk, then for each layer read only that layer's weights, run all chunks
through it, and free it; then the final norm and the output matrix. Peak memory is one layer in
float32 + the chunks' hidden states + the output matrix, whatever the depth: ~4 GB for
DeepSeek-R1-Distill-Qwen-7B (layer 0.9 GB, lm_head 2.2 GB, 16x256 tokens of hidden state 59 MB).
The weights are read once per evaluation instead of once per chunk, so it is also the faster way
when the model does not fit.

The logits equal the full model's up to float32 summation order (tests/test_eval_layerwise.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# Use layer-by-layer evaluation when the float32 model would take more than this share of available memory.
MEMORY_SHARE = 0.5


def float_model_bytes(path: Path) -> int:
    """Bytes of the checkpoint's parameters in float32 (from the safetensors headers; nothing is read)."""
    from dsq.dsquant.checkpoint import Checkpoint

    return sum(4 * int(np.prod(t.shape)) for t in Checkpoint(path).tensors)


def should_stream(path: Path, device: str) -> tuple[bool, str]:
    """(use layer-by-layer, why) for a float HF checkpoint evaluated on ``device``."""
    import psutil

    override = os.environ.get("DSQ_REF_LAYERWISE")
    if override in ("0", "1"):
        return override == "1", f"DSQ_REF_LAYERWISE={override}"
    if device != "cpu":
        return False, ""
    need = float_model_bytes(path)
    avail = psutil.virtual_memory().available
    if need > MEMORY_SHARE * avail:
        return True, f"the float32 model needs {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB is available"
    return False, ""


class LayerStream:
    """Logits of a float HF checkpoint computed layer by layer (see the module docstring)."""

    def __init__(self, path: Path, batch: int = 4):
        from dsq.dsquant.calib.pipeline import Decoder
        from dsq.dsquant.checkpoint import Checkpoint

        self.ckpt = Checkpoint(path)
        self.dec = Decoder(self.ckpt)
        self.batch = batch

    def _head(self):
        import torch

        from dsq.dsquant.archs import Role

        t = self.dec.others.get(Role.LM_HEAD) or self.dec.others.get(Role.EMBED)  # tied: the embedding
        return self.ckpt.load(t).to(torch.float32)

    def logits_batch(self, inputs: list[list[int]], log: Callable[[str], None] = lambda m: None) -> Iterator[np.ndarray]:
        """Logits ``[len(ids), vocab]`` float32 for each input, in order. Inputs of equal length are batched."""
        import torch

        groups: list[list[int]] = []  # indices of inputs, batched by equal length
        for i, ids in enumerate(inputs):
            if groups and len(groups[-1]) < self.batch and len(inputs[groups[-1][0]]) == len(ids):
                groups[-1].append(i)
            else:
                groups.append([i])
        with torch.inference_mode():
            xs = [self.dec.embed(torch.tensor([inputs[i] for i in g], dtype=torch.long)) for g in groups]
            n = self.dec.n_layers
            for layer_i in range(n):
                log(f"reference layer by layer: {layer_i + 1}/{n}")
                layer = self.dec.load_layer(layer_i)
                xs = [self.dec.forward(layer, x) for x in xs]
                del layer
            head = self._head()
            for x in xs:
                h = self.dec.final_norm(x)
                for row in h:
                    yield (row @ head.T).numpy()

    def logits(self, ids: list[int]) -> np.ndarray:
        return next(iter(self.logits_batch([ids])))
