"""The representative block's scores in PyTorch, and the block pooling they go through (ops/README.md §1-§4).

:func:`representative_scores` computes the vertical and slash scores of the last ``r`` queries (§1,
§3) a chunk of KV heads at a time, so the ``r x n`` probabilities never exist for all heads at once;
``scores_triton.representative_scores_triton`` is the same function in fused kernels (CUDA) and
never stores them at all. The pooling helpers sum token scores into the blocks of the end-aligned
grid (``ops/grid.py``); :func:`block_means` gives the mean query and key of each block (§2, §4).
Everything computes in :func:`compute_dtype`: float32, or float64 for float64 inputs, so that tests
can compare the selection with ``reference.py`` by exact equality.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..grid import BlockGrid

# Upper bound on the bytes of one chunk of representative scores (and its skewed copy).
_SCORE_CHUNK_BYTES = 1 << 29


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The selection's arithmetic dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def representative_scores(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, softmax_scale: float, key_valid: torch.Tensor,
    query_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Vertical and slash scores of the representative queries (ops/README.md §1, §3).

    q [B, q_len, Hq, D], k [B, n, Hkv, D] (any strides), key_valid bool [B, n]; query_start: optional int
    [B], key position of each sequence's first real query (rows before it are no queries: they see no key
    and are not counted); default: the first real key.
    Returns [2, B, Hq, n] in the compute dtype: a_v, a_s. a_v[j] is the mean attention of key j,
    a_s[o] the mean attention along diagonal offset o (query position minus key position); the
    mean is over the real representative rows, so each sums to 1.
    """
    batch, _, q_heads, _ = q.shape
    n, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    r = grid.num_representative
    dtype = compute_dtype(q.dtype)
    positions = torch.arange(n - r, n, device=q.device)  # [r]
    if query_start is None:
        query_start = (~key_valid).sum(-1)  # the first real key: key_valid is a left-padding mask
    row_valid = positions[None, :] >= query_start[:, None]  # [B, r]
    allowed = (torch.arange(n, device=q.device)[None, :] <= positions[:, None])[None] & key_valid[:, None, :]
    allowed = allowed & row_valid[:, :, None]  # [B, r, n]
    real_rows = row_valid.sum(-1).clamp_min(1)  # [B]

    bytes_per_kv_head = 2 * batch * groups * r * (n + r) * torch.finfo(dtype).bits // 8
    chunk = max(1, min(kv_heads, _SCORE_CHUNK_BYTES // max(bytes_per_kv_head, 1)))
    a_v, a_s = scores = torch.empty(2, batch, q_heads, n, dtype=dtype, device=q.device)
    q_rep = q[:, n - r - grid.cache_len :].unflatten(2, (kv_heads, groups))  # [B, r, Hkv, G, D]
    for h0 in range(0, kv_heads, chunk):
        h1 = min(h0 + chunk, kv_heads)
        qh = q_rep[:, :, h0:h1].permute(0, 2, 3, 1, 4).to(dtype).flatten(2, 3)  # [B, hc, G*r, D]
        kh = k[:, :, h0:h1].transpose(1, 2).to(dtype)  # [B, hc, n, D]
        logits = (qh @ kh.transpose(-1, -2)).unflatten(2, (groups, r)) * softmax_scale  # [B, hc, G, r, n]
        logits = logits.masked_fill(~allowed[:, None, None], -math.inf)
        attn = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        denom = real_rows.to(dtype)[:, None, None, None]
        a_v[:, h0 * groups : h1 * groups] = (attn.sum(dim=-2) / denom).flatten(1, 2)
        a_s[:, h0 * groups : h1 * groups] = (diagonal_sums(attn) / denom).flatten(1, 2)
    return scores


def diagonal_sums(attn: torch.Tensor) -> torch.Tensor:
    """attn [..., r, n] whose row i is query position n - r + i -> [..., n] sums over offsets o = pos - key."""
    r, n = attn.shape[-2:]
    # Row i reversed and shifted left by r-1-i puts offset o at column o; a strided view does the shift.
    padded = attn.new_zeros(attn.shape[:-1] + (n + r,))
    padded[..., :n] = attn.flip(-1)
    lead = padded.shape[:-2]
    lead_strides = padded.stride()[:-2]
    skewed = padded.as_strided(lead + (r, n), lead_strides + (n + r - 1, 1), padded.storage_offset() + r - 1)
    return skewed.sum(dim=-2)


def pool_key_blocks(x: torch.Tensor, grid: BlockGrid, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sum ``x`` over the key blocks of the end-aligned grid along ``dim`` (length n -> nb)."""
    dim = dim % x.dim()
    bs, first = grid.block_size, grid.block_size - grid.pad  # block 0 holds the first `first` tokens
    if first == bs:  # no partial block: one reduction
        return x.unflatten(dim, (grid.num_blocks, bs)).sum(dim + 1, dtype=dtype)
    head = x.narrow(dim, 0, first).sum(dim, keepdim=True, dtype=dtype)
    rest = x.narrow(dim, first, x.shape[dim] - first).unflatten(dim, (grid.num_blocks - 1, bs)).sum(dim + 1, dtype=dtype)
    return torch.cat([head, rest], dim=dim)


def pool_offset_blocks(x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Sum slash scores [..., n] over offset blocks o // B -> [..., nb] (offset block 0: the diagonal block)."""
    padded = F.pad(x, (0, grid.num_blocks * grid.block_size - x.shape[-1]))
    return padded.unflatten(-1, (grid.num_blocks, grid.block_size)).sum(-1)


def block_counts(valid: torch.Tensor, grid: BlockGrid, dtype: torch.dtype) -> torch.Tensor:
    """[B, blocks] in ``dtype``: real rows of each block of valid bool [B, L] laid on the grid from its end,
    at least 1 (the divisor of :func:`block_means`)."""
    sub = BlockGrid(valid.shape[1], valid.shape[1], grid.block_size)
    return pool_key_blocks(valid.to(dtype), sub, dim=1).clamp_min(1)


def block_means(
    x: torch.Tensor, valid: Optional[torch.Tensor], grid: BlockGrid, dtype: torch.dtype,
    counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block means [B, blocks, H, D] in ``dtype`` of x [B, L, H, D] laid on the grid from its end (L <= n).

    valid: bool [B, L] (rows that are not left padding) or None (all real). A block's mean is over its
    real rows (the partial block 0 over the tokens it holds); a block with none gets 0. counts: optional
    ``block_counts(valid, grid, dtype)``, for a caller that averages several tensors over the same rows.
    """
    # Lay the L rows on the last blocks of the grid: pad the front up to the block boundary.
    sub = BlockGrid(x.shape[1], x.shape[1], grid.block_size)
    if valid is None:
        sums = pool_key_blocks(x, sub, dim=1, dtype=dtype)  # [B, blocks, H, D]
        if sub.pad == 0:
            return sums / grid.block_size
        # Every block is full but the first: the counts are known without looking at the data.
        counts = torch.full((sub.num_blocks,), grid.block_size, dtype=dtype, device=x.device)
        counts[:1].fill_(grid.block_size - sub.pad)  # not counts[0] = ...: a host-to-device copy that syncs
        return sums / counts[:, None, None]
    sums = pool_key_blocks(x * valid[:, :, None, None], sub, dim=1, dtype=dtype)
    if counts is None:
        counts = block_counts(valid, grid, dtype)  # [B, blocks]
    return sums / counts[:, :, None, None]
