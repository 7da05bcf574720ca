"""Q5_0 and Q5_1 packers (ggml's ``quantize_row_q5_0_ref`` / ``quantize_row_q5_1_ref``), bit-exact.

Block layouts (ggml-common.h ``block_q5_0`` / ``block_q5_1``), 32 weights per block:

* ``Q5_0``, 22 bytes: fp16 ``d``, ``qh[4]`` (bit j of the little-endian uint32 is bit 4 of weight j's code),
  ``qs[16]`` (byte j: weight j's low nibble, weight j+16's low nibble << 4); w = (q - 16) * d, q in [0, 31].
  d = m / -16 where m is the block's element of largest magnitude (sign kept, first on ties), so m itself
  maps to code 0; codes are trunc(x / d + 16.5) clamped to 31.
* ``Q5_1``, 24 bytes: fp16 ``d``, fp16 ``m``, then ``qh`` and ``qs`` as Q5_0; w = q * d + m. m = the block
  minimum, d = (max - min) / 31, codes trunc((x - min) / d + 0.5) clamped to 31.

Both divide by the float32 ``d`` (1/d, as ggml does), not by its fp16 rounding, so the codes are ggml's; the
values returned are what gguf-py's dequantizer reads back (fp16 d and m times the codes, in its order of
operations). llama.cpp uses them as the fallbacks for Q4_K and Q5_K when rows are not whole 256-blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from dsq.dsquant.errors import BadWeightsError

QK = 32
Q5_0_BYTES = 22
Q5_1_BYTES = 24


def _blocks(rows: torch.Tensor) -> torch.Tensor:
    n, k = rows.shape
    if k % QK:
        raise ValueError(f"rows of {k} are not whole blocks of {QK}")  # encode() checks this before calling
    return rows.to(torch.float32).reshape(-1, QK)


def _codes_bytes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [nb, 32] in 0..31 -> (qh [nb, 4] bytes, qs [nb, 16] bytes) in ggml's order."""
    q = q.to(torch.uint8)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    bits = (q >> 4).to(torch.int64)  # [nb, 32], bit j of qh
    qh32 = (bits << torch.arange(QK, dtype=torch.int64)).sum(-1)  # fits in 32 bits
    qh = torch.stack([(qh32 >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)
    return qh, qs


def _fp16(x: torch.Tensor, what: str, name: str) -> torch.Tensor:
    h = x.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        i = int((~torch.isfinite(h)).nonzero()[0][0])
        raise BadWeightsError(
            f"{name}: block {i} needs a {what} of {float(x.reshape(-1)[i]):.4g}, beyond fp16's range; "
            "the weights are too large for this GGUF type: choose q8_0 or f16 for it"
        )
    return h


def quantize_q5_0(rows: torch.Tensor, name: str = "tensor") -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 32) -> (Q5_0 bytes, the float32 values gguf-py reads back).

    Raises BadWeightsError when a block's scale overflows fp16.
    """
    n, k = rows.shape
    x = _blocks(rows)
    m = torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))  # signed max, first on ties
    d = m / -16.0
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = torch.trunc(x * inv + 16.5).clamp(0, 31)
    dh = _fp16(d[:, 0], "scale", name)
    values = (dh.to(torch.float32)[:, None] * (q - 16)).reshape(n, k)
    qh, qs = _codes_bytes(q)
    out = torch.empty(x.shape[0], Q5_0_BYTES, dtype=torch.uint8)
    out[:, 0:2] = dh.reshape(-1, 1).view(torch.uint8)
    out[:, 2:6] = qh
    out[:, 6:] = qs
    return out.reshape(-1).numpy(), values


def quantize_q5_1(rows: torch.Tensor, name: str = "tensor") -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 32) -> (Q5_1 bytes, the float32 values gguf-py reads back).

    Raises BadWeightsError when a block's step or minimum overflows fp16.
    """
    n, k = rows.shape
    x = _blocks(rows)
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    d = (hi - lo) / 31.0
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = torch.trunc((x - lo) * inv + 0.5).clamp(0, 31)
    dh = _fp16(d[:, 0], "step", name)
    mh = _fp16(lo[:, 0], "minimum", name)
    values = (dh.to(torch.float32)[:, None] * q + mh.to(torch.float32)[:, None]).reshape(n, k)
    qh, qs = _codes_bytes(q)
    out = torch.empty(x.shape[0], Q5_1_BYTES, dtype=torch.uint8)
    out[:, 0:2] = dh.reshape(-1, 1).view(torch.uint8)
    out[:, 2:4] = mh.reshape(-1, 1).view(torch.uint8)
    out[:, 4:8] = qh
    out[:, 8:] = qs
    return out.reshape(-1).numpy(), values


def quantize_q4_1(rows: torch.Tensor, name: str = "tensor") -> tuple[np.ndarray, torch.Tensor]:
    """ggml's ``quantize_row_q4_1_ref``: [n, k] finite float rows (k a multiple of 32) -> (Q4_1 bytes, the float32
    values gguf-py reads back). Q5_1's rule with 15 levels: m = the block minimum, d = (max - min) / 15, codes
    trunc((x - min) / d + 0.5) clamped to 15; ``block_q4_1`` is fp16 d, fp16 m, then 16 bytes of nibble pairs
    (byte j: weight j low, weight j+16 high). Raises BadWeightsError when d or m overflows fp16."""
    n, k = rows.shape
    x = _blocks(rows)
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    d = (hi - lo) / 15.0
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = torch.trunc((x - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
    dh = _fp16(d[:, 0], "step", name)
    mh = _fp16(lo[:, 0], "minimum", name)
    values = (dh.to(torch.float32)[:, None] * q.to(torch.float32) + mh.to(torch.float32)[:, None]).reshape(n, k)
    out = torch.empty(x.shape[0], 20, dtype=torch.uint8)
    out[:, 0:2] = dh.reshape(-1, 1).view(torch.uint8)
    out[:, 2:4] = mh.reshape(-1, 1).view(torch.uint8)
    out[:, 4:] = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    return out.reshape(-1).numpy(), values


# Q5_K (ggml-common.h ``block_q5_K``, 176 bytes per 256 weights): fp16 ``d``, fp16 ``dmin``, ``scales[12]`` (6-bit
# scale and min per sub-block of 32, packed as Q4_K's), ``qh[32]``, ``qs[128]``; w = d * ls_j * q - dmin * lm_j with
# q in [0, 31]. The quantizer is ggml's, byte for byte (kq_types.py).
Q5_K_BYTES = 176


def quantize_q5_k(rows: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """[n, k] finite float rows (k a multiple of 256) -> (Q5_K bytes, the float32 values gguf-py reads back)."""
    from dsq.dsquant.kq_types import quantize_k

    return quantize_k("q5_k", rows, importance)
