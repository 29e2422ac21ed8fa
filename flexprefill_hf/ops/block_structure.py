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
    packed = torch.empty(block_mask.shape[:-1] + (num_blocks + 1,), dtype=torch.int32, device=block_mask.device)
    counts = torch.empty(block_mask.shape[:-1], dtype=torch.int32, device=block_mask.device)
    pack_block_mask(block_mask, packed, counts)
    return BlockStructure(indices=packed[..., :num_blocks], counts=counts, grid=grid)


def pack_block_mask(block_mask: torch.Tensor, packed: torch.Tensor, counts: torch.Tensor) -> None:
    """Write the structure of ``block_mask [..., nb]`` into ``packed [..., nb + 1]`` and ``counts [...]``.

    Compaction by prefix sum: selected block j goes to slot (number selected before it), the others
    to the spare last slot, which callers drop. Ascending order comes for free; no sort, no host sync.
    """
    num_blocks = block_mask.shape[-1]
    column = torch.arange(num_blocks, device=block_mask.device, dtype=torch.int32).expand_as(block_mask)
    slot = torch.cumsum(block_mask, dim=-1, dtype=torch.int32) - 1
    slot = torch.where(block_mask, slot, num_blocks)
    packed.fill_(-1)
    packed.scatter_(-1, slot.long(), column)
    counts.copy_(block_mask.sum(dim=-1, dtype=torch.int32))


def structure_to_block_mask(structure: BlockStructure) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_structure`: bool ``[B, Hq, nqb, nb]``."""
    indices = structure.indices.long()
    num_blocks = indices.shape[-1]
    mask = torch.zeros(indices.shape[:-1] + (num_blocks + 1,), dtype=torch.bool, device=indices.device)
    # -1 padding lands in the extra last column, which is dropped.
    mask.scatter_(-1, torch.where(indices >= 0, indices, num_blocks), True)
    return mask[..., :num_blocks]
