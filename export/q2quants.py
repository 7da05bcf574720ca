"""Q2_K (ggml-common.h ``block_q2_K``, 84 bytes per 256 weights): ``scales[16]`` (per sub-block of 16: a 4-bit
scale in the low nibble, a 4-bit min in the high one), ``qs[64]`` (2-bit codes), fp16 ``d``, fp16 ``dmin``;
w = d * sc_j * q - dmin * m_j, q in [0, 3]. The quantizer is ggml's, byte for byte (kq_types.py):
``quantize_row_q2_K_ref``, or ``quantize_row_q2_K_impl`` with an importance.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.kq_types import quantize_k

Q2_K_BYTES = 84


def quantize_q2_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (Q2_K bytes, the float32 values gguf-py reads back)."""
    return quantize_k("q2_k", rows, importance)
