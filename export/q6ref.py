"""Q6_K as llama.cpp writes it (ggml-common.h ``block_q6_K``, 210 bytes per 256 weights): ``ql[128]`` low 4 bits,
``qh[64]`` high 2 bits, ``scales[16]`` int8 (one per sub-block of 16), fp16 ``d``; w = d * scale_j * (q - 32).
The quantizer is ggml's, byte for byte (kq_types.py): ``quantize_row_q6_K_ref``, or ``quantize_row_q6_K_impl``
(``make_qx_quants`` weighted by the raw importance) with one.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.kq_types import quantize_k


def quantize_q6_k_ref(rows: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (Q6_K bytes as llama.cpp writes them, the float32 values
    gguf-py reads back)."""
    return quantize_k("q6_k", rows, importance)
