"""Plain-PyTorch reference of every FlexPrefill stage: readable beside the paper, the oracle of the tests.

Everything here is written for one (batch, query head) at a time where that reads closer to the paper,
and computes in float64 by default. It materialises token-level masks and scores, so it is meant for
test sizes (a few thousand tokens), never for the prefill path. Section numbers (§N) refer to
``ops/README.md``; the grid (end-aligned blocks) is described in ``ops/grid.py``. Functions that are the
oracle of a package function carry the suffix ``_reference`` (``block_sparse_attention_reference`` is
the oracle of ``block_sparse_attention_triton`` and ``_torch``).
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
# ops/README.md §6: block-sparse attention given a block structure
# ---------------------------------------------------------------------------------------------


def masked_attention_reference(
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


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the selected key blocks only (ops/README.md §6).

    Query row r (position k_len - q_len + r) attends key t when t <= its position, t >= key_start[b],
    and t's block is in the structure's list for the row's query block. Shapes as in
    :func:`masked_attention_reference`. Returns (out, lse) in ``dtype``.
    """
    grid = structure.grid
    key_valid = key_positions_valid(grid.k_len, key_start, q.shape[0], q.device)
    token_mask = causal_token_mask(grid, key_valid)[:, None] & block_mask_to_token_mask(
        structure_to_block_mask(structure), grid
    )
    return masked_attention_reference(q, k, v, token_mask, softmax_scale, dtype)


def dense_attention_reference(
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
    return masked_attention_reference(q, k, v, causal_token_mask(grid, key_valid)[:, None], softmax_scale, dtype)


# ---------------------------------------------------------------------------------------------
# ops/README.md §1-§5: block selection, one (batch, query head) at a time
# ---------------------------------------------------------------------------------------------


def representative_attention(
    q_rep: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, key_valid: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """§1: Â = softmax(s · Q̂ Kᵀ), causal, over real keys.

    q_rep [r, D], k [n, D], q_positions int [r], key_valid bool [n] -> Â [r, n]. A row with no key is 0.
    """
    scores = (q_rep @ k.T) * softmax_scale
    allowed = (torch.arange(k.shape[0], device=k.device)[None, :] <= q_positions[:, None]) & key_valid[None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def vertical_scores(attn: torch.Tensor) -> torch.Tensor:
    """§3: a_v[j] = mean over the real rows of Â[:, j]. attn [r, n] -> [n]."""
    real_rows = (attn.sum(dim=-1) > 0).sum().clamp_min(1)
    return attn.sum(dim=0) / real_rows


def slash_scores(attn: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """§3: a_s[o] = (sum of Â[i, pos_i - o] over rows i) / rows, for offsets o in [0, n)."""
    r, n = attn.shape
    real_rows = (attn.sum(dim=-1) > 0).sum().clamp_min(1)
    a_s = torch.zeros(n, dtype=attn.dtype, device=attn.device)
    for i in range(r):
        keys = torch.arange(int(q_positions[i]) + 1, device=attn.device)  # keys 0..pos_i
        a_s.index_add_(0, q_positions[i] - keys, attn[i, keys])
    return a_s / real_rows


def pool_key_scores(scores: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Sum token scores [n] into key blocks [nb] of the end-aligned grid."""
    blocks = (torch.arange(grid.k_len, device=scores.device) + grid.pad) // grid.block_size
    return torch.zeros(grid.num_blocks, dtype=scores.dtype, device=scores.device).index_add_(0, blocks, scores)


def pool_offset_scores(scores: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Sum slash scores [n] (offset o) into offset blocks o // B: [nb]; offset block 0 is the diagonal block."""
    blocks = torch.arange(grid.k_len, device=scores.device) // grid.block_size
    return torch.zeros(grid.num_blocks, dtype=scores.dtype, device=scores.device).index_add_(0, blocks, scores)


def block_means(x: torch.Tensor, valid: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Mean of the real rows of x [n, D] in each grid block -> [nb, D] (0 for a block with none)."""
    blocks = (torch.arange(x.shape[0], device=x.device) + grid.pad) // grid.block_size
    sums = torch.zeros(grid.num_blocks, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, blocks, x * valid[:, None])
    counts = torch.zeros(grid.num_blocks, dtype=x.dtype, device=x.device).index_add_(0, blocks, valid.to(x.dtype))
    return sums / counts.clamp_min(1)[:, None]


def js_distance_reference(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """§2: sqrt(JSD(p, q)), natural log, with 0·log 0 = 0."""
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        terms = torch.where(a > 0, a * (torch.log(a) - torch.log(m)), torch.zeros_like(a))
        return terms.sum()

    return torch.sqrt((0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0))


def coverage_count(scores: torch.Tensor, gamma: float) -> int:
    """Fewest largest entries of ``scores`` whose sum reaches gamma (all of them if it never does)."""
    if gamma >= 1.0:  # all the attention, whatever the rounding of the running sum
        return scores.numel()
    ordered = torch.sort(scores, descending=True, stable=True).values
    before = torch.cumsum(ordered, dim=0) - ordered  # sum of the larger entries
    return int((before < gamma).sum())


def budget_blocks_reference(tokens: int, grid: BlockGrid, config) -> int:
    """§3: a token budget -> blocks: floor(tokens / B) + 1, clamped to [min blocks, nb] and max."""
    blocks = min(max(tokens // grid.block_size + 1, config.min_budget_blocks), grid.num_blocks)
    if config.max_budget_blocks is not None:
        blocks = min(blocks, config.max_budget_blocks)
    return blocks


def top_blocks_reference(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool [nb]: the ``count`` highest scores (ties go to the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[order[:count]] = True
    return chosen


def block_causal_mask(grid: BlockGrid, sink_block: int, device) -> torch.Tensor:
    """bool [nqb, nb]: query block i may compute key block j when sink_block <= j <= i."""
    i = torch.arange(grid.first_query_block, grid.num_blocks, device=device)[:, None]
    j = torch.arange(grid.num_blocks, device=device)[None, :]
    return (j <= i) & (j >= sink_block)


def expand_vertical_slash(vertical: torch.Tensor, slash: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """§3: bool [nqb, nb]: j is a chosen vertical block, or i - j a chosen slash offset block."""
    mask = torch.zeros(grid.num_query_blocks, grid.num_blocks, dtype=torch.bool, device=vertical.device)
    for t in range(grid.num_query_blocks):
        i = grid.first_query_block + t
        for j in range(i + 1):
            mask[t, j] = bool(vertical[j]) or bool(slash[i - j])
    return mask


def query_aware_mask(
    q_means: torch.Tensor, k_means: torch.Tensor, allowed: torch.Tensor, softmax_scale: float, gamma: float
) -> torch.Tensor:
    """§4: global coverage over (query block, key block) pairs of P = row-softmax(s · Q̄ K̄ᵀ).

    q_means [nqb, D], k_means [nb, D], allowed bool [nqb, nb] -> bool [nqb, nb].
    """
    scores = ((q_means @ k_means.T) * softmax_scale).masked_fill(~allowed, -math.inf)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0).flatten()
    probs = probs / probs.sum().clamp_min(torch.finfo(probs.dtype).tiny)
    keep = coverage_count(probs, gamma)
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    chosen[torch.sort(probs, descending=True, stable=True).indices[:keep]] = True
    return chosen.view(allowed.shape)


def select_head_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    key_start: int,
    grid: BlockGrid,
    config,
    softmax_scale: float,
) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """§1-§5 for one sequence and one query head.

    q [q_len, D] (this head's queries), k [k_len, D] (its KV head), key_start: first real key.
    Returns (block mask bool [nqb, nb], query_aware, js_distance).
    """
    n = grid.k_len
    key_valid = torch.arange(n, device=k.device) >= key_start
    q_positions = torch.arange(grid.q_len, device=q.device) + grid.cache_len
    sink = int(grid.sink_block(torch.tensor([key_start]))[0])
    allowed = block_causal_mask(grid, sink, q.device)
    diagonal = torch.zeros_like(allowed)
    diagonal[torch.arange(grid.num_query_blocks), torch.arange(grid.first_query_block, grid.num_blocks)] = True
    always = (diagonal | (torch.arange(grid.num_blocks, device=q.device) == sink)[None, :]) & allowed

    if n - key_start <= config.effective_dense_threshold:  # this sequence alone would run dense
        return allowed, False, torch.tensor(float("nan"), dtype=q.dtype)

    # ops/README.md §1: the representative queries are the last min(B, q_len) rows.
    r = grid.num_representative
    attn = representative_attention(q[-r:], k, q_positions[-r:], key_valid, softmax_scale)
    a_v = vertical_scores(attn)
    a_s = slash_scores(attn, q_positions[-r:])

    # ops/README.md §2: the pattern.
    true_dist = pool_key_scores(a_v, grid)
    k_means = block_means(k, key_valid, grid)
    real_block = torch.arange(grid.num_blocks, device=q.device) >= sink
    real_rep = (q_positions[-r:] >= key_start).to(q.dtype)
    q_rep_mean = (q[-r:] * real_rep[:, None]).sum(0) / real_rep.sum().clamp_min(1)
    est_logits = ((k_means @ q_rep_mean) * softmax_scale).masked_fill(~real_block, -math.inf)
    est_dist = torch.softmax(est_logits, dim=-1)
    distance = js_distance_reference(est_dist, true_dist)
    query_aware = bool(distance < config.tau)

    # ops/README.md §3: vertical-slash budget and blocks. Padding blocks are never candidates.
    vertical_pool = pool_key_scores(a_v, grid).masked_fill(~real_block, -1.0)
    slash_pool = pool_offset_scores(a_s, grid)
    min_blocks = min(config.min_budget_blocks, grid.num_blocks)
    if query_aware:
        kb_v = kb_s = min_blocks
    else:
        kb_v = budget_blocks_reference(coverage_count(a_v, config.gamma), grid, config)
        kb_s = budget_blocks_reference(coverage_count(a_s, config.gamma), grid, config)
    vertical = top_blocks_reference(vertical_pool, kb_v)
    slash = top_blocks_reference(slash_pool, kb_s)
    mask = expand_vertical_slash(vertical, slash, grid)

    # ops/README.md §4: query-aware heads add the global coverage of the block estimate.
    if query_aware:
        q_valid = q_positions >= key_start
        q_means_all = block_means(torch.cat([q.new_zeros(grid.cache_len, q.shape[1]), q]),
                                  torch.cat([q_valid.new_zeros(grid.cache_len), q_valid]), grid)
        q_means = q_means_all[grid.first_query_block:]
        mask = mask | query_aware_mask(q_means, k_means, allowed, softmax_scale, config.gamma)

    # ops/README.md §5: diagonal and sink always; block-causal and real blocks only.
    return (mask | always) & allowed, query_aware, distance


def select_blocks_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    config,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlexPrefill selection for every sequence and query head, one at a time.

    q [B, q_len, Hq, D], k [B, k_len, Hkv, D] -> (block mask bool [B, Hq, nqb, nb],
    query_aware bool [B, Hq], js_distance [B, Hq] in ``dtype``; NaN for sequences that run dense).
    """
    batch, q_len, q_heads, _ = q.shape
    groups = q_heads // k.shape[2]
    grid = BlockGrid(q_len, k.shape[1], config.block_size)
    masks, patterns, distances = [], [], []
    for b in range(batch):
        start = 0 if key_start is None else int(key_start[b])
        for h in range(q_heads):
            mask, query_aware, distance = select_head_reference(
                q[b, :, h].to(dtype), k[b, :, h // groups].to(dtype), start, grid, config, softmax_scale
            )
            masks.append(mask)
            patterns.append(query_aware)
            distances.append(distance)
    block_mask = torch.stack(masks).view(batch, q_heads, grid.num_query_blocks, grid.num_blocks)
    query_aware = torch.tensor(patterns, device=q.device).view(batch, q_heads)
    js = torch.stack(distances).to(dtype).view(batch, q_heads)
    return block_mask, query_aware, js
