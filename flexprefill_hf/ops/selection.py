"""FlexPrefill block selection for all sequences and query heads at once (ALGORITHM.md sections 1-5).

PyTorch (with two Triton stages on CUDA: the representative scores, ``selection_kernels.py``, and
the packed block structure, ``structure_kernels.py``), fixed shapes, no host synchronisation, no
Python loop over batch or heads: the only loops are over chunks of heads, sized from the shapes so
that the representative block's scores (``r x n`` per query head) and the ``nqb x nb`` block
estimates never exist for all heads at once. Computes in float32 (float64 for
float64 inputs, so that tests can compare with ``reference.select_blocks`` by exact equality).
The grid is the end-aligned one of ``grid.py``; the output layout is ``block_structure.py``'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import FlexPrefillConfig
from .block_structure import BlockStructure, MaskParts, causal_pair_index, compose_structure_torch
from .grid import BlockGrid, causal_block_counts

# Upper bound on the bytes of one chunk of representative scores (and its skewed copy).
_SCORE_CHUNK_BYTES = 1 << 29
# Upper bound on the temporaries of one chunk of block masks, and their bytes per (query block, key
# block) pair and head: logits, probabilities, their sorted copy, int64 order, prefix sums, and the
# torch composition's masks and slots (the Triton composition needs none of the latter).
_MASK_CHUNK_BYTES = 1 << 32
_MASK_BYTES_PER_PAIR = 48


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Result of :func:`select_blocks`.

    structure: the selected key blocks (``BlockStructure``).
    query_aware: bool [B, Hq] -- pattern chosen per head.
    js_distance: [B, Hq] in the compute dtype -- sqrt(JSD); NaN for sequences short enough to run dense.
    causal_blocks: int32 [B] -- blocks of the causal block triangle of each sequence (for fractions).
    """

    structure: BlockStructure
    query_aware: torch.Tensor
    js_distance: torch.Tensor
    causal_blocks: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def representative_scores(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, softmax_scale: float, key_valid: torch.Tensor
) -> torch.Tensor:
    """Vertical and slash scores of the representative queries (sections 1 and 3).

    q [B, q_len, Hq, D], k [B, n, Hkv, D], key_valid bool [B, n].
    Returns [2, B, Hq, n] in the compute dtype: a_v, a_s. a_v[j] is the mean attention of key j,
    a_s[o] the mean attention along diagonal offset o (query position minus key position).
    """
    batch, _, q_heads, head_dim = q.shape
    n, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    r = grid.num_representative
    dtype = compute_dtype(q.dtype)
    positions = torch.arange(n - r, n, device=q.device)  # [r]
    allowed = (torch.arange(n, device=q.device)[None, :] <= positions[:, None])[None] & key_valid[:, None, :]
    real_rows = (positions[None, :] >= (~key_valid).sum(-1, keepdim=True)).sum(-1).clamp_min(1)  # [B]

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
        a_s[:, h0 * groups : h1 * groups] = (_diagonal_sums(attn) / denom).flatten(1, 2)
    return scores


def _diagonal_sums(attn: torch.Tensor) -> torch.Tensor:
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
    """Sum slash scores [..., n] over offset blocks o // B -> [..., nb]."""
    padded = F.pad(x, (0, grid.num_blocks * grid.block_size - x.shape[-1]))
    return padded.unflatten(-1, (grid.num_blocks, grid.block_size)).sum(-1)


def coverage_counts(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """int64 [...]: fewest largest entries of scores [..., L] that sum to >= gamma (L if they never do)."""
    if gamma >= 1.0:  # all the attention: every entry, whatever the rounding of the running sum
        return torch.full(scores.shape[:-1], scores.shape[-1], dtype=torch.long, device=scores.device)
    ordered = torch.sort(scores, dim=-1, descending=True, stable=True).values
    before = torch.cumsum(ordered, dim=-1) - ordered
    return (before < gamma).sum(-1)


def coverage_mask(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """bool [..., L]: the fewest largest entries of each row that sum to >= gamma (one sort)."""
    if gamma >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    ordered, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    keep = (torch.cumsum(ordered, dim=-1) - ordered) < gamma
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, keep)


def top_blocks(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool [..., nb]: the ``counts[...]`` highest scores of each row (ties go to the lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(scores.shape[-1], device=scores.device)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank < counts[..., None])


def budget_blocks(tokens: torch.Tensor, grid: BlockGrid, config: FlexPrefillConfig) -> torch.Tensor:
    """Token budget -> blocks: floor(tokens / B) + 1 clamped to [min blocks, nb], then to max blocks."""
    most = grid.num_blocks if config.max_budget_blocks is None else min(grid.num_blocks, config.max_budget_blocks)
    # One clamp: when min > max, torch.clamp gives max, as clamping to min and then to max does.
    return (tokens // grid.block_size + 1).clamp(min=config.min_budget_blocks, max=most)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt(JSD(p, q)) over the last dim, natural log, 0·log 0 = 0."""
    log_m = torch.log((p + q) / 2)
    # KL(p||m) and KL(q||m) by the same kernels: stacked, so log m is computed once.
    both = torch.stack([p, q])
    kl = torch.where(both > 0, both * (torch.log(both) - log_m), 0.0).sum(-1)  # [2, ...]
    return torch.sqrt((kl.sum(0) * 0.5).clamp_min(0))


def _masked_means(x: torch.Tensor, valid: Optional[torch.Tensor], grid: BlockGrid, dtype: torch.dtype) -> torch.Tensor:
    """Block means [B, blocks, H, D] of x [B, L, H, D] laid on the grid from its end (L <= n)."""
    # Lay the L rows on the last blocks of the grid: pad the front up to the block boundary.
    sub = BlockGrid(x.shape[1], x.shape[1], grid.block_size)
    if valid is None:
        sums = pool_key_blocks(x, sub, dim=1, dtype=dtype)  # [B, blocks, H, D]
        if sub.pad == 0:
            return sums / grid.block_size
        # Every block is full but the first: the counts are known without looking at the data.
        counts = torch.full((sub.num_blocks,), grid.block_size, dtype=dtype, device=x.device)
        counts[0] = grid.block_size - sub.pad
        return sums / counts[:, None, None]
    sums = pool_key_blocks(x * valid[:, :, None, None], sub, dim=1, dtype=dtype)
    counts = pool_key_blocks(valid.to(dtype), sub, dim=1)  # [B, blocks]
    return sums / counts.clamp_min(1)[:, :, None, None]


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    config: FlexPrefillConfig,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    *,
    scores_backend: Optional[str] = None,
    structure_backend: Optional[str] = None,
) -> BlockSelection:
    """Choose, per sequence and query head, the key blocks each query block computes.

    Args:
        q: [B, q_len, Hq, D]; k: [B, n, Hkv, D] (n >= q_len, queries are the last positions); any strides.
        config: hyper-parameters; softmax_scale: the attention scale.
        key_start: optional int [B], first real key of each sequence (left padding).
        scores_backend: "triton" (fused kernels of ``selection_kernels.py``) or "torch" for the
            representative scores; default: triton for fp16/bf16 CUDA tensors, torch otherwise.
        structure_backend: "triton" (``structure_kernels.py``: mask composed and packed in one
            kernel) or "torch" (:func:`compose_structure_torch`); default: triton for CUDA tensors.
            Both give the same structure exactly.
    Returns:
        BlockSelection with the structure int32 [B, Hq, nqb, nb] / counts [B, Hq, nqb].
    """
    batch, q_len, q_heads, head_dim = q.shape
    n, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    grid = BlockGrid(q_len, n, config.block_size)
    nb, nqb, bs = grid.num_blocks, grid.num_query_blocks, grid.block_size
    dtype = compute_dtype(q.dtype)
    device = q.device

    # Small per-sequence values, once. Without left padding the sink is block 0 (the grid's pad < B).
    j = torch.arange(nb, device=device)
    i = torch.arange(grid.first_query_block, nb, device=device)
    blocked = (j[None, :] > i[:, None])[None]  # [1 or B, nqb, nb]: outside the block-causal triangle
    if key_start is None:
        starts = sink = torch.zeros(batch, dtype=torch.long, device=device)
        key_valid = padding_block = None
    else:
        starts = key_start.to(device, torch.long)
        sink = (starts.clamp(max=n - 1) + grid.pad) // bs  # [B]
        key_valid = torch.arange(n, device=device)[None, :] >= starts[:, None]  # [B, n]
        padding_block = (j < sink[:, None])[:, None, :]  # [B, 1, nb]: blocks of padding only
        blocked = blocked | padding_block
    short = starts >= n - config.effective_dense_threshold  # [B]: real length at or below the threshold

    # Sections 1 and 3: scores of the representative queries.
    if scores_backend is None:
        scores_backend = "triton" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else "torch"
    if scores_backend == "triton":
        from .selection_kernels import representative_scores_triton

        rep_scores = representative_scores_triton(q, k, grid, softmax_scale, key_start)
    elif scores_backend == "torch":
        valid = torch.ones(batch, n, dtype=torch.bool, device=device) if key_valid is None else key_valid
        rep_scores = representative_scores(q, k, grid, softmax_scale, valid)
    else:
        raise ValueError(f"scores_backend={scores_backend!r} is not supported; expected 'triton', 'torch' or None")
    a_v, a_s = rep_scores  # [B, Hq, n] each
    if structure_backend is None:
        structure_backend = "triton" if q.is_cuda else "torch"
    if structure_backend == "triton":
        from .structure_kernels import compose_structure_triton as compose
    elif structure_backend == "torch":
        compose = compose_structure_torch
    else:
        raise ValueError(f"structure_backend={structure_backend!r} is not supported; expected 'triton', 'torch' or None")

    # Section 2: the pattern, from the true and the estimated block distributions.
    if grid.pad == 0:  # key blocks and offset blocks coincide: pool a_v and a_s by one reduction
        pooled = rep_scores.unflatten(-1, (nb, bs)).sum(-1)  # [2, B, Hq, nb]
        true_dist = pooled[0]
    else:
        true_dist = pool_key_blocks(a_v, grid)  # [B, Hq, nb]
    k_means = _masked_means(k, key_valid, grid, dtype).permute(0, 2, 1, 3)  # [B, Hkv, nb, D]
    r = grid.num_representative
    q_rep = q[:, q_len - r :].to(dtype)
    if key_start is None and r & (r - 1) == 0:  # dividing by a power of two is exact, however it is done
        q_rep_mean = q_rep.sum(1) / r  # [B, Hq, D]
    else:
        rep_valid = (torch.arange(n - r, n, device=device)[None, :] >= starts[:, None]).to(dtype)  # [B, r]
        q_rep_mean = (q_rep * rep_valid[:, :, None, None]).sum(1) / rep_valid.sum(1).clamp_min(1)[:, None, None]
    est_logits = (q_rep_mean.unflatten(1, (kv_heads, groups)) @ k_means.transpose(-1, -2)).flatten(1, 2)
    est_logits = est_logits * softmax_scale
    if padding_block is not None:
        est_logits = est_logits.masked_fill(padding_block, -math.inf)
    est_dist = torch.softmax(est_logits, dim=-1)
    distance = js_distance(est_dist, true_dist)  # [B, Hq]
    query_aware = distance < config.tau

    # Section 3: vertical-slash budgets (query-aware heads keep the minimum) and blocks.
    min_blocks = min(config.min_budget_blocks, nb)
    token_budget = budget_blocks(coverage_counts(rep_scores, config.gamma), grid, config)  # [2, B, Hq]
    block_budget = torch.where(query_aware, min_blocks, token_budget)  # [2, B, Hq]
    # Vertical and slash blocks by one sort: rows are independent. Padding blocks are never candidates.
    if grid.pad == 0:
        block_scores = pooled
        if padding_block is not None:
            block_scores[0].masked_fill_(padding_block, -1.0)  # true_dist is not needed any more
    else:
        vertical_scores = true_dist if padding_block is None else true_dist.masked_fill(padding_block, -1.0)
        block_scores = torch.stack([vertical_scores, pool_offset_blocks(a_s, grid)])
    vertical, slash = top_blocks(block_scores, block_budget).unbind(0)  # [B, Hq, nb] each

    # Section 4 needs the query-block means.
    q_valid = None if key_valid is None else key_valid[:, n - q_len :]
    q_means = _masked_means(q, q_valid, grid, dtype).permute(0, 2, 1, 3)[:, :, -nqb:]  # [B, Hq, nqb, D]
    # Each query head's KV-head means, by one copy.
    k_means = k_means[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)  # [B, Hq, nb, D]

    # The block masks are nb x nb per head: build them a chunk of query heads at a time.
    pair_index = causal_pair_index(grid, device)  # [P]: the block-causal pairs, row-major
    indices = torch.empty(batch, q_heads, nqb, nb, dtype=torch.int32, device=device)
    counts = torch.empty(batch, q_heads, nqb, dtype=torch.int32, device=device)
    chunk = max(1, min(q_heads, _MASK_CHUNK_BYTES // (_MASK_BYTES_PER_PAIR * batch * nqb * nb)))
    parts = MaskParts(vertical=vertical, slash=slash, query_aware=query_aware, short=short, sink=sink)
    for h0 in range(0, q_heads, chunk):
        h1 = min(h0 + chunk, q_heads)
        # Section 4: global coverage of the block estimate over the block-causal pairs (the others
        # have probability 0 and are never kept): a gather keeps their row-major order, hence ties.
        block_logits = q_means[:, h0:h1] @ k_means[:, h0:h1].transpose(-1, -2)  # [B, hc, nqb, nb]
        block_probs = torch.softmax(block_logits.mul_(softmax_scale).masked_fill_(blocked[:, None], -math.inf), dim=-1)
        pair_probs = torch.nan_to_num_(block_probs.flatten(2).index_select(-1, pair_index), nan=0.0)  # [B, hc, P]
        pair_probs = pair_probs.div_(pair_probs.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny))
        estimate = coverage_mask(pair_probs, config.gamma)
        compose(parts, estimate, grid, indices, counts, h0)

    query_aware = torch.where(short[:, None], False, query_aware)
    distance = distance.masked_fill(short[:, None], math.nan)
    causal_blocks = causal_block_counts(grid, sink)
    structure = BlockStructure(indices=indices, counts=counts, grid=grid)
    return BlockSelection(structure, query_aware, distance, causal_blocks)
