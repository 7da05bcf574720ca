"""Q4_K (ggml-common.h ``block_q4_K``, 144 bytes per 256 weights): the name the rest of dsq imports.

Layout: fp16 ``d``, fp16 ``dmin``, ``scales[12]`` holding a 6-bit scale ls_j and a 6-bit min lm_j for each of 8
sub-blocks of 32 (``get_scale_min_k4``), ``qs[128]`` 4-bit codes (each 64 weights take 32 bytes, weight l in the
low nibble of byte l and weight l+32 in the high nibble); w = d * ls_j * q - dmin * lm_j.

The quantizer is ggml's, byte for byte, in kq_types.py: ``quantize_row_q4_K_ref`` without importance, and
with a per-column importance (llama.cpp imatrix) ``quantize_row_q4_K_impl``, as ``ggml_quantize_chunk`` picks.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.kq_types import QK_K, quantize_k

Q4_K_BYTES = 144
__all__ = ["QK_K", "Q4_K_BYTES", "quantize_q4_k"]


def quantize_q4_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] float rows (k a multiple of 256) -> (Q4_K bytes, the float32 values gguf-py reads back).

    ``importance``: optional [k] non-negative weight per column (llama.cpp imatrix convention, mean x^2 of that
    input feature over calibration tokens): ggml's imatrix path. Raises UnsupportedError for other shapes."""
    return quantize_k("q4_k", rows, importance)
