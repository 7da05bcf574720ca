"""dsquant/source.py, the one reader the exporters use: a quantized checkpoint comes back as the QuantizedTensors
it was written from, and a float checkpoint with a recipe as exactly what `dsq quantize` writes for it."""

from __future__ import annotations

import pytest
import torch

from dsq.dsquant.errors import InputError
from dsq.dsquant.formats import QuantizedTensor
from dsq.dsquant.quantized import QuantizedCheckpoint
from dsq.dsquant.source import Source


def _same(a, b) -> bool:
    if isinstance(a, QuantizedTensor) or isinstance(b, QuantizedTensor):
        return (type(a) is type(b) and a.format == b.format and tuple(a.shape) == tuple(b.shape)
                and torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8))
                and torch.equal(a.scale, b.scale) and (a.zero is None) == (b.zero is None)
                and (a.zero is None or torch.equal(a.zero, b.zero)))
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("arch,recipe", [("llama", "int4"), ("deepseek_v3", "int8"), ("deepseek_v3-fp8", "fp8")])
def test_recipe_source_holds_what_quantize_writes(arch, recipe, model_dir, quantized_dir):
    """Every weight of Source(float model, recipe) equals the one read back from `dsq quantize -r recipe`
    (codes, scales and zeros; floats bit for bit). The FP8 source keeps its stored FP8 codes (passthrough)."""
    direct = Source(model_dir(arch), recipe)
    stored = Source(quantized_dir(arch, recipe))
    assert direct.quantized and stored.quantized
    assert list(direct.entries) == list(stored.entries)  # same names, same (file) order
    n_quantized = 0
    for (name, a), (_, b) in zip(direct.iter_weights(), stored.iter_weights(), strict=True):
        if isinstance(b, torch.Tensor) and not isinstance(a, QuantizedTensor):
            a = a.to(b.dtype)  # a kept tensor: block-FP8 sources are read dequantized, written in bf16
        assert _same(a, b), name
        assert direct.entries[name].format == stored.entries[name].format, name
        n_quantized += isinstance(a, QuantizedTensor)
    assert n_quantized >= 10


def test_recipe_on_a_quantized_checkpoint_is_refused(quantized_dir):
    with pytest.raises(InputError, match="already quantized; --recipe applies to float checkpoints only"):
        Source(quantized_dir("qwen3", "int4"), "int8")


def test_quantized_checkpoint_iter_weights_is_the_source(quantized_dir):
    """QuantizedCheckpoint.iter_weights is the reader's, not a second copy: same names, order and values."""
    q = quantized_dir("qwen2", "int4")
    ours = list(Source(q).iter_weights())
    theirs = list(QuantizedCheckpoint(q).iter_weights())
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    assert all(_same(a, b) for (_, a), (_, b) in zip(ours, theirs, strict=True))
