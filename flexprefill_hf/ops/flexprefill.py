"""The public FlexPrefill operator (work in progress: being written now; API below is fixed)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..config import FlexPrefillConfig


@dataclasses.dataclass(frozen=True)
class FlexPrefillStats:
    """What one call chose, per (batch, query head). All tensors on the input's device.

    query_aware: bool [B, Hq] -- True where the head used the query-aware pattern.
    js_distance: float32 [B, Hq] -- sqrt(JSD) between estimated and true block distributions.
    computed_blocks: int32 [B, Hq] -- key blocks computed, summed over the query blocks.
    computed_fraction: float32 [B, Hq] -- computed_blocks / blocks of the causal block triangle.
    dense: bool -- True when the call took the dense path (then query_aware is False, js_distance NaN,
        the fraction 1).
    """

    query_aware: torch.Tensor
    js_distance: torch.Tensor
    computed_blocks: torch.Tensor
    computed_fraction: torch.Tensor
    dense: bool


def flexprefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: Optional[FlexPrefillConfig] = None,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """FlexPrefill causal attention. q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D] -> out [B, q_len, Hq, D].

    key_start: optional int [B] first real key per sequence (left padding).
    """
    return flexprefill_attention_with_stats(q, k, v, config, softmax_scale=softmax_scale, key_start=key_start)[0]


def flexprefill_attention_with_stats(q, k, v, config=None, *, softmax_scale=None, key_start=None):
    """Same as :func:`flexprefill_attention`; returns (out, FlexPrefillStats)."""
    raise NotImplementedError("being written")
