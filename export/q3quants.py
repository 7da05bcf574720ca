"""Q3_K (ggml-common.h ``block_q3_K``, 110 bytes per 256 weights): ``hmask[32]``, ``qs[64]``, ``scales[12]``,
fp16 ``d``; 16 sub-blocks of 16 weights with a 6-bit signed scale s_j in [-32, 31]; w = d * s_j * (q - 4). The
quantizer is ggml's, byte for byte (kq_types.py): ``quantize_row_q3_K_ref`` (``make_q3_quants``), or
``quantize_row_q3_K_impl`` (``make_qx_quants`` weighted by the importance) with one.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.kq_types import quantize_k

Q3_K_BYTES = 110


def quantize_q3_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (Q3_K bytes, the float32 values gguf-py reads back)."""
    return quantize_k("q3_k", rows, importance)
