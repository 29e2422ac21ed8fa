"""Plain-PyTorch reference of every FlexPrefill stage: readable beside the paper, the oracle of the tests.

Everything here is written for one (batch, query head) at a time where that reads closer to the paper,
and computes in float64 by default. It materialises token-level masks and scores, so it is meant for
test sizes (a few thousand tokens), never for the prefill path. Section numbers refer to
``shared/ALGORITHM.md``; the grid (end-aligned blocks) is described in ``ops/grid.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .block_structure import BlockStructure, structure_to_block_mask
from .grid import BlockGrid

# ---------------------------------------------------------------------------------------------
# Token-level masks
# ---------------------------------------------------------------------------------------------


def key_positions_valid(k_len: int, key_start: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    """bool [batch, k_len]: key t of sequence b is real (t >= key_start[b]); all True without padding."""
    positions = torch.arange(k_len, device=device)
    if key_start is None:
        return torch.ones(batch, k_len, dtype=torch.bool, device=device)
    return positions[None, :] >= key_start.to(device).long()[:, None]


def causal_token_mask(grid: BlockGrid, key_valid: torch.Tensor) -> torch.Tensor:
    """bool [batch, q_len, k_len]: bottom-right causal and not padding."""
    q_pos = torch.arange(grid.q_len, device=key_valid.device) + grid.cache_len
    k_pos = torch.arange(grid.k_len, device=key_valid.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    return causal[None] & key_valid[:, None, :]


def block_mask_to_token_mask(block_mask: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Expand a bool block mask [B, H, nqb, nb] to bool [B, H, q_len, k_len] (no causality applied)."""
    q_block = (torch.arange(grid.q_len, device=block_mask.device) + grid.cache_len + grid.pad) // grid.block_size
    k_block = (torch.arange(grid.k_len, device=block_mask.device) + grid.pad) // grid.block_size
    rows = block_mask[:, :, q_block - grid.first_query_block, :]  # [B, H, q_len, nb]
    return rows[..., k_block]


# ---------------------------------------------------------------------------------------------
# Section 6: block-sparse attention given a block structure
# ---------------------------------------------------------------------------------------------


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor,
    softmax_scale: float,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention under an explicit mask, in ``dtype``.

    Args:
        q: [B, q_len, Hq, D]; k, v: [B, k_len, Hkv, D]; query head h reads KV head h // (Hq // Hkv).
        token_mask: bool [B, Hq or 1, q_len, k_len], True where the key is attended.
    Returns:
        out [B, q_len, Hq, D] in ``dtype`` (rows with no key are 0) and lse [B, Hq, q_len] (-inf there).
    """
    groups = q.shape[2] // k.shape[2]
    qh = q.to(dtype).transpose(1, 2)
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.to(dtype).transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~token_mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, q_len]
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(dtype).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    return (probs @ vh).transpose(1, 2), lse


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the selected key blocks only (ALGORITHM.md section 6).

    Query row r (position k_len - q_len + r) attends key t when t <= its position, t >= key_start[b],
    and t's block is in the structure's list for the row's query block. Shapes as in
    :func:`masked_attention`. Returns (out, lse) in ``dtype``.
    """
    grid = structure.grid
    key_valid = key_positions_valid(grid.k_len, key_start, q.shape[0], q.device)
    token_mask = causal_token_mask(grid, key_valid)[:, None] & block_mask_to_token_mask(
        structure_to_block_mask(structure), grid
    )
    return masked_attention(q, k, v, token_mask, softmax_scale, dtype)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bottom-right causal attention with left padding, in ``dtype``. Returns (out, lse)."""
    grid = BlockGrid(q.shape[1], k.shape[1], 64)
    key_valid = key_positions_valid(grid.k_len, key_start, q.shape[0], q.device)
    return masked_attention(q, k, v, causal_token_mask(grid, key_valid)[:, None], softmax_scale, dtype)
