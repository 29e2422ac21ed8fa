"""Dense causal attention in PyTorch: decode, short prompts, and the dtypes the Triton kernel does not take.

Layout: q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D], queries at the last q_len positions (bottom-right
causal), query head h reads KV head h // (Hq // Hkv). No validation here: the operator checks its inputs
with ``ops/validation.check_attention_inputs`` first.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from ..runtime import KERNEL_DTYPES
from .block_sparse_torch import masked_attention_torch


def _flash_attn_func():
    """flash-attn's function when the optional package is installed, else None (imported lazily)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    return flash_attn_func


def dense_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense causal attention -> [B, q_len, Hq, D] in q's dtype; rows with no real key are 0.

    key_start: optional int [B]; keys before key_start[b] are left padding. flash-attn when importable
    (CUDA, fp16/bf16, no padding), else torch SDPA with ``enable_gqa`` (bottom-right causal masks built per
    chunk of rows when q_len < k_len or with padding). NaN/Inf in the inputs propagate as in SDPA.
    """
    if key_start is None and q.is_cuda and q.dtype in KERNEL_DTYPES:
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q, k, v, softmax_scale=softmax_scale, causal=True)  # bottom-right aligned
    if key_start is None and q.shape[1] == k.shape[1]:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale, enable_gqa=True
        )
        return out.transpose(1, 2)
    return masked_attention_torch(q, k, v, softmax_scale, key_start, None)
