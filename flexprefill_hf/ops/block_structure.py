"""The fixed-shape block structure: which key blocks each (batch, query head, query block) computes.

Layout (see ``ops/README.md``):
    indices: int32 ``[batch, q_heads, num_query_blocks, num_blocks]`` -- ascending key-block indices
             of each present query block, padded at the end with -1.
    counts:  int32 ``[batch, q_heads, num_query_blocks]`` -- how many leading entries are valid.
Query block row ``t`` is grid block ``grid.first_query_block + t`` (see ``ops/grid.py``).
Built from a boolean block mask by a prefix sum, without host synchronisation. Which blocks the
selection puts in the mask is the selection's business (``ops/selection/compose.py``); this file
holds only the layout and its conversions.

The block-causal pairs ``(t, j)`` with ``j <= first_query_block + t`` are also given a flat
"triangle" layout (:func:`causal_pair_index`): the selection's query-aware estimate lives there.
"""

from __future__ import annotations

import dataclasses

import torch

from .grid import BlockGrid


@dataclasses.dataclass(frozen=True)
class BlockStructure:
    """Selected key blocks, fixed shape. ``indices`` int32 [B, Hq, nqb, nb]; ``counts`` int32 [B, Hq, nqb]."""

    indices: torch.Tensor
    counts: torch.Tensor
    grid: BlockGrid


def block_mask_to_structure(block_mask: torch.Tensor, grid: BlockGrid) -> BlockStructure:
    """Turn a bool block mask ``[B, Hq, nqb, nb]`` into ascending, -1-padded indices and counts."""
    indices = torch.empty(block_mask.shape, dtype=torch.int32, device=block_mask.device)
    counts = torch.empty(block_mask.shape[:-1], dtype=torch.int32, device=block_mask.device)
    pack_block_mask(block_mask, indices, counts)
    return BlockStructure(indices=indices, counts=counts, grid=grid)


def pack_block_mask(block_mask: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
    """Write the structure of ``block_mask [..., nb]`` into ``indices [..., nb]`` and ``counts [...]``.

    Compaction by prefix sum, as a permutation: selected block j goes to slot (selected before it),
    the c-th unselected one to slot count + c with value -1, so every slot is written once. Ascending
    order comes for free; no sort, no host sync.
    """
    num_blocks = block_mask.shape[-1]
    column = torch.arange(num_blocks, device=block_mask.device, dtype=torch.int32)
    selected = torch.cumsum(block_mask, dim=-1, dtype=torch.int32)  # inclusive
    total = selected[..., -1:]
    slot = torch.where(block_mask, selected - 1, total + column - selected)
    indices.scatter_(-1, slot.long(), torch.where(block_mask, column, -1))
    counts.copy_(total[..., 0])


def causal_pair_count(grid: BlockGrid) -> int:
    """P: block-causal (query block row t, key block j <= first_query_block + t) pairs of the grid."""
    nqb, first = grid.num_query_blocks, grid.first_query_block
    return nqb * (first + 1) + nqb * (nqb - 1) // 2


def causal_pair_index(grid: BlockGrid, device) -> torch.Tensor:
    """int64 [P]: flat index ``t * nb + j`` of each block-causal pair, in row-major order.

    Row t's pairs start at ``t * (first_query_block + 1) + t * (t - 1) // 2``.
    """
    rows, cols = torch.tril_indices(grid.num_query_blocks, grid.num_blocks, offset=grid.first_query_block, device=device)
    return rows * grid.num_blocks + cols


def structure_to_block_mask(structure: BlockStructure) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_structure`: bool ``[B, Hq, nqb, nb]``."""
    indices = structure.indices.long()
    num_blocks = indices.shape[-1]
    mask = torch.zeros(indices.shape[:-1] + (num_blocks + 1,), dtype=torch.bool, device=indices.device)
    # -1 padding lands in the extra last column, which is dropped.
    mask.scatter_(-1, torch.where(indices >= 0, indices, num_blocks), True)
    return mask[..., :num_blocks]
