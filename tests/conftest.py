"""Shared fixtures: tiny checkpoints (built once per session) and their quantized outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import ARCHS, make_checkpoint, make_fp8_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread is ~10x faster than two fighting over a loaded 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch) -> a tiny bf16 sharded checkpoint of that architecture (cached per session)."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            if arch.endswith("-fp8"):
                cache[arch] = make_fp8_checkpoint(arch[:-4], tmp_path_factory.mktemp(arch) / "model")
            else:
                cache[arch] = make_checkpoint(arch, tmp_path_factory.mktemp(arch) / "model")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def quantized_dir(tmp_path_factory, model_dir):
    """quantized_dir(arch, recipe) -> dsq quantize output of that fixture (cached per session)."""
    from dsq.dsquant.quantize import quantize_checkpoint

    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, recipe: str) -> Path:
        key = (arch, recipe)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{Path(recipe).stem}") / "out"
            quantize_checkpoint(model_dir(arch), out, recipe)
            cache[key] = out
        return cache[key]

    return get


__all__ = ["ARCHS"]
