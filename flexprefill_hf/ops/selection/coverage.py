"""Small rules on score vectors, shared by the selection steps (ops/README.md §2-§4).

The γ-coverage rule (§3 budgets, §4 the global estimate), top-k blocks with ties to the lower index
(§3), token budgets turned into block counts (§3, the one place), and the JS distance (§2). Each
works on the last dim of a batch of rows; none synchronises with the host.
"""

from __future__ import annotations

import torch

from ...config import FlexPrefillConfig
from ..grid import BlockGrid


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
    # order is a permutation of each row: the scatter writes every entry, so no zero fill is needed.
    return torch.empty_like(scores, dtype=torch.bool).scatter_(-1, order, keep)


def top_blocks(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool [..., nb]: the ``counts[...]`` highest scores of each row (ties go to the lower index)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(scores.shape[-1], device=scores.device)
    # order is a permutation of each row: the scatter writes every entry, so no zero fill is needed.
    return torch.empty_like(scores, dtype=torch.bool).scatter_(-1, order, rank < counts[..., None])


def budget_limits(grid: BlockGrid, config: FlexPrefillConfig) -> tuple[int, int]:
    """(least, most) blocks of a budget: the min budget's blocks, and nb or the max budget's blocks if fewer."""
    most = grid.num_blocks if config.max_budget_blocks is None else min(grid.num_blocks, config.max_budget_blocks)
    return config.min_budget_blocks, most


def budget_blocks(tokens: torch.Tensor, grid: BlockGrid, config: FlexPrefillConfig) -> torch.Tensor:
    """Token budget -> blocks: floor(tokens / B) + 1 clamped to [min blocks, nb], then to max blocks
    (``coverage_triton.vertical_slash_blocks_triton`` does the same arithmetic in its kernel)."""
    least, most = budget_limits(grid, config)
    # One clamp: when min > max, torch.clamp gives max, as clamping to min and then to max does.
    return (tokens // grid.block_size + 1).clamp(min=least, max=most)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt(JSD(p, q)) over the last dim, natural log, 0·log 0 = 0."""
    log_m = torch.log((p + q) / 2)
    # KL(p||m) and KL(q||m) by the same kernels: stacked, so log m is computed once.
    both = torch.stack([p, q])
    kl = torch.where(both > 0, both * (torch.log(both) - log_m), 0.0).sum(-1)  # [2, ...]
    return torch.sqrt((kl.sum(0) * 0.5).clamp_min(0))
