"""The fixed-shape block structure: which key blocks each (batch, query head, query block) computes.

Layout (see ``ops/README.md``):
    indices: int32 ``[batch, q_heads, num_query_blocks, num_blocks]`` -- ascending key-block indices
             of each present query block, padded at the end with -1.
    counts:  int32 ``[batch, q_heads, num_query_blocks]`` -- how many leading entries are valid.
Query block row ``t`` is grid block ``grid.first_query_block + t`` (see ``ops/grid.py``).
Built from a boolean block mask by a prefix sum, without host synchronisation. ``indices`` may be a
view with a row stride of nb + 1: consumers use its strides.
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
    num_blocks = block_mask.shape[-1]
    column = torch.arange(num_blocks, device=block_mask.device, dtype=torch.int32).expand_as(block_mask)
    # Compaction by prefix sum: selected block j goes to slot (number selected before it); the others
    # go to a spare last slot that is dropped. Ascending order comes for free.
    slot = torch.cumsum(block_mask, dim=-1, dtype=torch.int32) - 1
    slot = torch.where(block_mask, slot, num_blocks)
    packed = torch.full(block_mask.shape[:-1] + (num_blocks + 1,), -1, dtype=torch.int32, device=block_mask.device)
    packed.scatter_(-1, slot.long(), column)
    indices = packed[..., :num_blocks]
    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    return BlockStructure(indices=indices, counts=counts, grid=grid)


def structure_to_block_mask(structure: BlockStructure) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_structure`: bool ``[B, Hq, nqb, nb]``."""
    indices = structure.indices.long()
    num_blocks = indices.shape[-1]
    mask = torch.zeros(indices.shape[:-1] + (num_blocks + 1,), dtype=torch.bool, device=indices.device)
    # -1 padding lands in the extra last column, which is dropped.
    mask.scatter_(-1, torch.where(indices >= 0, indices, num_blocks), True)
    return mask[..., :num_blocks]
