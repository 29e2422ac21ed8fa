"""Dense causal attention in plain PyTorch (SDPA), without any optional kernel package.

Layout: q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D], queries at the last q_len positions (bottom-right
causal), query head h reads KV head h // (Hq // Hkv). No validation here: the operator checks its inputs
with ``ops/validation.check_attention_inputs`` first.

The operator does not call this directly: its dense route goes through ``ops/backends.dense_attention``,
which picks flash-attn-4 or an SDPA backend per case. This function is the torch-only part of that choice
(what runs when no optional package is installed), kept as a public, separately tested entry point.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .block_sparse_torch import masked_attention_torch


def dense_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense causal attention -> [B, q_len, Hq, D] in q's dtype; rows with no real key are 0.

    key_start: optional int [B]; keys before key_start[b] are left padding. Without padding, one query row
    (decode: it sees every key, so no mask) and q_len == k_len (``is_causal``) are one SDPA call with
    ``enable_gqa``; every other case builds bottom-right causal (and padding) masks per chunk of rows.
    NaN/Inf in the inputs propagate as in SDPA.
    """
    q_len = q.shape[1]
    if key_start is None and (q_len == 1 or q_len == k.shape[1]):
        # A Python bool, not q_len > 1: under torch.compile with dynamic shapes that would be a SymBool.
        causal = False if q_len == 1 else True
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2)
    return masked_attention_torch(q, k, v, softmax_scale, key_start, None)
