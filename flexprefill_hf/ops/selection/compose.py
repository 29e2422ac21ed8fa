"""The selection's last step in PyTorch: compose each head's block mask and pack it (ops/README.md §5).

:class:`MaskParts` names what a mask is made of (the vertical and slash blocks of §3, the query-aware
estimate of §4, the dense rule and the sink of §5); :func:`compose_structure_torch` builds the bool
mask of a chunk of heads from them and packs it into the ``BlockStructure`` layout. On CUDA
``compose_triton.compose_structure_triton`` computes the same bits without storing the mask; this
function is its oracle (equal structures, exactly).
"""

from __future__ import annotations

import dataclasses

import torch

from ..block_structure import causal_pair_index, pack_block_mask
from ..grid import BlockGrid


@dataclasses.dataclass(frozen=True)
class MaskParts:
    """What the selection's block mask is made of, for all heads (ops/README.md §3-§5).

    vertical, slash: bool [B, Hq, nb] -- chosen key blocks, chosen offset blocks (slash[i - j]);
    query_aware: bool [B, Hq]; short: bool [B] -- the sequence runs dense; sink: int [B] -- key block
    of the first real key. With the query-aware estimate ``e`` (bool over the block-causal pairs),
    query block i computes key block j when

        sink <= j <= i  and  (short or vertical[j] or slash[i - j] or (query_aware and e[i, j])
                              or j == i or j == sink).
    """

    vertical: torch.Tensor
    slash: torch.Tensor
    query_aware: torch.Tensor
    short: torch.Tensor
    sink: torch.Tensor


def compose_structure_torch(
    parts: MaskParts, estimate: torch.Tensor, grid: BlockGrid, indices: torch.Tensor, counts: torch.Tensor,
    head_start: int = 0,
) -> None:
    """The block mask of query heads ``head_start .. head_start + hc`` (:class:`MaskParts`), packed.

    estimate: bool [B, hc, P], the query-aware coverage of those heads over the block-causal pairs
    (:func:`causal_pair_index`). Writes indices int32 [B, Hq, nqb, nb] and counts int32 [B, Hq, nqb]
    at those heads. The reference of ``compose_triton.compose_structure_triton``, which computes
    the same bits without storing the mask.
    """
    batch, chunk = estimate.shape[:2]
    h0, h1 = head_start, head_start + chunk
    device = estimate.device
    nb, nqb = grid.num_blocks, grid.num_query_blocks
    j = torch.arange(nb, device=device)
    i = torch.arange(grid.first_query_block, nb, device=device)
    sink = parts.sink
    allowed = (j[None, :] <= i[:, None])[None] & (j[None, None, :] >= sink[:, None, None])  # [B, nqb, nb]
    always = (j[None, :] == i[:, None])[None] | (j == sink[:, None])[:, None, :]
    offset = (i[:, None] - j[None, :]).clamp_min(0)  # [nqb, nb]
    estimate_mask = torch.zeros(batch, chunk, nqb * nb, dtype=torch.bool, device=device)
    estimate_mask.index_copy_(-1, causal_pair_index(grid, device), estimate)
    mask = parts.vertical[:, h0:h1, None, :] | parts.slash[:, h0:h1][:, :, offset]  # [B, hc, nqb, nb]
    mask |= estimate_mask.view(batch, chunk, nqb, nb) & parts.query_aware[:, h0:h1, None, None]
    mask = torch.where(parts.short[:, None, None, None], allowed[:, None], (mask | always[:, None]) & allowed[:, None])
    pack_block_mask(mask, indices[:, h0:h1], counts[:, h0:h1])
