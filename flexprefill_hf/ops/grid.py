"""Where the blocks lie: the block grid shared by selection, kernels and references.

The grid is aligned to the *end* of the keys. With ``n`` keys and block size ``B`` there are
``nb = ceil(n / B)`` blocks; think of the sequence as left-padded by ``pad = nb * B - n`` virtual
tokens, so key position ``t`` (0-based, tensor coordinates) lies in block ``(t + pad) // B`` and
only block 0 can be partial. Real left padding of a batch (``key_start[b]`` masked tokens) only
adds to the virtual padding, so a left-padded sequence gets exactly the blocks it would get alone.

Queries are the last ``q_len`` key positions (bottom-right causal alignment): query row ``r`` sits
at position ``k_len - q_len + r``. Query blocks use the same grid; only the blocks that hold at
least one query are "present": ``first_query_block .. nb - 1``. The last ``min(B, q_len)`` queries
(the representative block of FlexPrefill) are then exactly the rows of the last query block when
``q_len >= B``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Geometry of one prefill: ``q_len`` new queries over ``k_len`` keys in blocks of ``block_size``."""

    q_len: int
    k_len: int
    block_size: int

    @property
    def num_blocks(self) -> int:
        """nb = ceil(k_len / block_size): key blocks, also the index range of query blocks."""
        return -(-self.k_len // self.block_size)

    @property
    def pad(self) -> int:
        """Virtual left padding that aligns the grid to the end of the keys."""
        return self.num_blocks * self.block_size - self.k_len

    @property
    def cache_len(self) -> int:
        """Keys before the first query (a prefix cache)."""
        return self.k_len - self.q_len

    @property
    def first_query_block(self) -> int:
        """Index of the first block that holds a query."""
        return (self.cache_len + self.pad) // self.block_size

    @property
    def num_query_blocks(self) -> int:
        """Present query blocks: rows of the block structure."""
        return self.num_blocks - self.first_query_block

    @property
    def num_representative(self) -> int:
        """Rows of the representative query block: the last min(block_size, q_len) queries."""
        return min(self.block_size, self.q_len)

    def block_of_key(self, position: int) -> int:
        """Block index of key position ``position`` (tensor coordinates)."""
        return (position + self.pad) // self.block_size

    def sink_block(self, key_start):
        """The sink of each sequence: the block holding its first real key.

        ``key_start``: int tensor [B] (any int dtype) -> int64 [B]; or a Python int -> int (the
        references' per-sequence form). A start past the last key is clamped to it (key_start == k_len, a
        sequence of padding only, is valid; the clamp keeps the index inside the grid). The one place this formula is written.
        """
        if isinstance(key_start, torch.Tensor):
            return (key_start.long().clamp(max=self.k_len - 1) + self.pad) // self.block_size
        return self.block_of_key(min(int(key_start), self.k_len - 1))


def causal_block_counts(
    grid: BlockGrid, sink: torch.Tensor, first_block: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """int32 [B]: (query block, key block) pairs with ``sink[b] <= key block <= query block`` over the present
    query blocks -- the causal block triangle of each sequence (``sink``: int [B], its first real block).
    first_block: optional int [B], each sequence's first query block (a packed sequence laid into a padded
    view, ``ops/varlen.py``); query blocks before it are not counted."""
    i = torch.arange(grid.first_query_block, grid.num_blocks, device=sink.device)
    pairs = (i[None, :] - sink[:, None] + 1).clamp_min(0)
    if first_block is not None:
        pairs = pairs * (i[None, :] >= first_block[:, None])
    return pairs.sum(-1).to(torch.int32)
