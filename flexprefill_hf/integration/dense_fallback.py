"""Dense attention in transformers' layout, for the calls FlexPrefill cannot express.

The routing (``routing.py``) sends here: ``output_attentions=True`` (the weights are returned), attention
dropout, a 4-D mask, non-causal attention, an active sliding window, and calls that need gradients.
Plain torch (SDPA, or explicit weights when they are asked for); nothing from ``flexprefill_hf.ops``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def dense_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    *,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    is_causal: bool = True,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dense attention in transformers' layout, for what FlexPrefill cannot express.

    query [B, Hq, N, D], key/value [B, Hkv, K, D]; queries at the last N positions. ``attention_mask``:
    None, bool [B, K] padding, or a 4-D bool or additive mask used as given. Returns
    (out [B, N, Hq, D], weights [B, Hq, N, K] when ``output_attentions`` else None).
    Rows without any key give 0, as in the operator, so left padding never spreads NaN.
    """
    groups = query.shape[1] // key.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    # SDPA's is_causal covers the plain causal square; explicit weights always need the mask.
    mask = dense_mask(query, key, attention_mask, sliding_window, is_causal, allow_none=not output_attentions)
    if output_attentions:
        if groups > 1:  # explicit weights per query head: here (only) K/V are repeated
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        scores = (query @ key.transpose(-1, -2)).float() * scale  # [B, Hq, N, K]
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0).to(query.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return (weights @ value).transpose(1, 2).contiguous(), weights
    causal_flag = mask is None and is_causal and query.shape[2] == key.shape[2]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal_flag, scale=scale, enable_gqa=groups > 1
    )
    if mask is not None and mask.dtype == torch.bool:
        out = torch.where(mask.any(-1, keepdim=True), out, 0)
    return out.transpose(1, 2).contiguous(), None


def dense_mask(query, key, attention_mask, sliding_window, is_causal, allow_none) -> Optional[torch.Tensor]:
    """The mask of the dense fallback: the 4-D mask as given, else bool [B or 1, 1, N, K].

    None (when ``allow_none``) where SDPA needs no mask: no padding, no window, and either non-causal
    or causal over a square (SDPA's ``is_causal``).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    q_len, k_len = query.shape[2], key.shape[2]
    square_or_full = q_len == k_len or not is_causal
    if allow_none and attention_mask is None and sliding_window is None and square_or_full:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # [N, 1]
    k_pos = torch.arange(k_len, device=query.device)[None, :]  # [1, K]
    mask = (k_pos <= q_pos) if is_causal else torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    mask = mask[None, None]  # [1, 1, N, K]
    if attention_mask is not None:
        mask = mask & attention_mask.to(device=query.device, dtype=torch.bool)[:, None, None, :]
    return mask
