"""The public FlexPrefill operator: validate, route (dense or sparse), select blocks, attend."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ..config import FlexPrefillConfig
from .grid import BlockGrid, causal_block_counts
from .selection import select_blocks
from .torch_attention import block_sparse_attention as torch_block_sparse_attention
from .torch_attention import dense_attention

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class FlexPrefillStats:
    """What one call chose, per (batch, query head); tensors on the input's device.

    query_aware: bool [B, Hq] -- True where the head used the query-aware pattern.
    js_distance: float32 [B, Hq] -- sqrt(JSD) between the estimated and the true block distribution
        (NaN where the sequence ran dense).
    computed_blocks: int32 [B, Hq] -- (query block, key block) pairs computed.
    computed_fraction: float32 [B, Hq] -- computed_blocks over the pairs of the causal block triangle.
    dense: True when the whole call took the dense path.
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
    """FlexPrefill causal attention for one layer.

    Args:
        q: [B, q_len, Hq, D] queries; the last q_len positions of the keys (bottom-right causal), so a
            prefill on top of a cache of k_len - q_len tokens is expressed by q_len < k_len.
        k, v: [B, k_len, Hkv, D] with Hq = G * Hkv; query head h reads KV head h // G. Any strides
            (Hugging Face's transposed [B, H, N, D] views are used without a copy).
        config: hyper-parameters (default ``FlexPrefillConfig()``).
        softmax_scale: default 1 / sqrt(D).
        key_start: optional integer tensor [B]: keys before key_start[b] are left padding. A padded
            sequence gets exactly the blocks it would get alone (the block grid is end-aligned).
    Returns:
        [B, q_len, Hq, D] in q's dtype. Rows with no real key (padding queries) are 0.

    fp16/bf16 CUDA tensors run the Triton kernels; CPU tensors the same function in PyTorch. Dense:
    decode (q_len == 1), prompts of at most ``config.effective_dense_threshold`` keys, fp32 CUDA
    tensors, and CUDA prompts of fewer than ``config.cuda_dense_below`` keys (where dense is faster).
    """
    return flexprefill_attention_with_stats(q, k, v, config, softmax_scale=softmax_scale, key_start=key_start)[0]


def flexprefill_attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: Optional[FlexPrefillConfig] = None,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, FlexPrefillStats]:
    """:func:`flexprefill_attention` that also returns what it chose, as :class:`FlexPrefillStats`."""
    _validate(q, k, v, config, softmax_scale, key_start)
    config = FlexPrefillConfig() if config is None else config
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    q_len, k_len = q.shape[1], k.shape[1]
    takes_sparse = not q.is_cuda or (q.dtype in KERNEL_DTYPES and k_len >= config.cuda_dense_below)
    if q_len == 1 or k_len <= config.effective_dense_threshold or not takes_sparse:
        out = dense_attention(q, k, v, scale, key_start)
        return out, _dense_stats(q, k, config, key_start)

    selection = select_blocks(q, k, config, scale, key_start)
    if q.is_cuda:
        from .block_sparse_attention import block_sparse_attention

        out = block_sparse_attention(q, k, v, selection.structure, softmax_scale=scale, key_start=key_start)
    else:
        out = torch_block_sparse_attention(q, k, v, selection.structure, scale, key_start)
    computed = selection.structure.counts.sum(-1, dtype=torch.int32)  # [B, Hq]
    stats = FlexPrefillStats(
        query_aware=selection.query_aware,
        js_distance=selection.js_distance.float(),
        computed_blocks=computed,
        computed_fraction=computed.float() / selection.causal_blocks.clamp_min(1)[:, None].float(),
        dense=False,
    )
    return out, stats


def _dense_stats(q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig, key_start) -> FlexPrefillStats:
    batch, q_len, q_heads, _ = q.shape
    grid = BlockGrid(q_len, k.shape[1], config.block_size)
    starts = torch.zeros(batch, dtype=torch.long, device=q.device) if key_start is None else key_start.long()
    sink = (starts.clamp(max=k.shape[1] - 1) + grid.pad) // grid.block_size  # [B]
    causal = causal_block_counts(grid, sink)  # [B]
    return FlexPrefillStats(
        query_aware=torch.zeros(batch, q_heads, dtype=torch.bool, device=q.device),
        js_distance=torch.full((batch, q_heads), math.nan, device=q.device),
        computed_blocks=causal[:, None].expand(batch, q_heads).contiguous(),
        computed_fraction=torch.ones(batch, q_heads, device=q.device),
        dense=True,
    )


def _validate(q, k, v, config, softmax_scale, key_start) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims [batch, seq, heads, head_dim]")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of {SUPPORTED_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); expected one device")
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; expected equal shapes")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has {k.shape[0]}; expected equal batch sizes")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q has head_dim {q.shape[3]} but k has {k.shape[3]}; expected equal head dims")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q has {q.shape[2]} heads and k has {k.shape[2]}; expected the query heads to be a multiple of the KV heads"
        )
    if not 1 <= q.shape[1] <= k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} tokens and k has {k.shape[1]}; expected 1 <= q_len <= k_len")
    if config is not None and not isinstance(config, FlexPrefillConfig):
        raise TypeError(f"config has type {type(config).__name__}; expected FlexPrefillConfig or None")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))):
        raise TypeError(f"softmax_scale={softmax_scale!r}; expected a float or None")
    if key_start is not None:
        if not isinstance(key_start, torch.Tensor) or key_start.dtype.is_floating_point or key_start.dtype == torch.bool:
            raise TypeError(f"key_start must be an integer tensor of shape [batch]; got {key_start!r:.80}")
        if key_start.shape != (q.shape[0],):
            raise ValueError(f"key_start has shape {tuple(key_start.shape)}; expected ({q.shape[0]},)")
        if key_start.device != q.device:
            raise ValueError(f"key_start is on {key_start.device}; expected q's device {q.device}")
