"""Triton kernel for the selection's last stage: compose each head's block mask and pack it (ops/README.md §5).

``compose.compose_structure_torch`` builds the bool block mask of a chunk of heads
(``[B, hc, nqb, nb]``) from its ``MaskParts`` and packs it with a prefix sum; here one program per
(batch, head, query block) computes the same bits on the fly from the small inputs and compacts
them with ``tl.cumsum`` and a running offset, so no nb x nb mask is ever stored. Bits of row ``t``
(grid block ``i = first_query_block + t``) at key block ``j``:

    allowed  = sink <= j <= i
    selected = vertical[j] | slash[i - j] | (query_aware & estimate[t, j]) | j == i | j == sink
    bit      = allowed & (short | selected)

``estimate`` is read in the triangle layout of ``block_structure.causal_pair_index``: the
block-causal pairs (j <= i) in row-major order, so row ``t`` starts at pair
``t * (first_query_block + 1) + t * (t - 1) / 2``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.block_sparse_triton import launch_device
from ..block_structure import causal_pair_count
from ..grid import BlockGrid
from .compose import MaskParts
from ..runtime import next_power_of_2


@triton.jit
def _compose_pack_kernel(
    Vertical, Slash, Estimate, QueryAware, Short, Sink, Indices, Counts,
    num_heads, head_start, chunk_heads, num_blocks, num_query_blocks, first_query_block, num_pairs,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16, "BLOCK_N must be at least 16 (tl.arange and cumsum tiles)")
    # Longest rows first: the last query blocks have the most key blocks.
    t = num_query_blocks - 1 - tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // chunk_heads
    off_hc = pid_bh % chunk_heads
    off_h = head_start + off_hc
    i = first_query_block + t
    sink = tl.load(Sink + off_b).to(tl.int64)
    short = tl.load(Short + off_b) != 0
    query_aware = tl.load(QueryAware + off_b * num_heads + off_h) != 0
    # Vertical-slash heads never read their estimate: an empty range.
    estimate_end = tl.where(query_aware, i + 1, 0)
    vertical = Vertical + (off_b * num_heads + off_h) * num_blocks
    slash = Slash + (off_b * num_heads + off_h) * num_blocks
    estimate = Estimate + (off_b * chunk_heads + off_hc) * num_pairs + t * (first_query_block + 1) + t * (t - 1) // 2
    row = (off_b * num_heads + off_h) * num_query_blocks + t
    out = Indices + row * num_blocks

    offs_n = tl.arange(0, BLOCK_N)
    count = tl.zeros([], dtype=tl.int32)
    for start in range(0, i + 1, BLOCK_N):
        j = start + offs_n  # [BLOCK_N]
        in_row = j <= i
        bit = (tl.load(vertical + j, mask=in_row, other=0) != 0) | (tl.load(slash + (i - j), mask=in_row, other=0) != 0)
        bit |= tl.load(estimate + j, mask=j < estimate_end, other=0) != 0
        bit = (bit | (j == i) | (j == sink) | short) & in_row & (j >= sink)
        bit = bit.to(tl.int32)
        # Selected block j goes to slot count + (selected blocks before it): ascending, no sort.
        slot = count + tl.cumsum(bit, 0) - 1
        tl.store(out + slot, j.to(tl.int32), mask=bit != 0)
        count += tl.sum(bit, 0)
    tl.store(Counts + row, count)
    # -1 padding after the last selected block.
    for start in range((count // BLOCK_N) * BLOCK_N, num_blocks, BLOCK_N):
        pos = start + offs_n
        tl.store(out + pos, tl.full([BLOCK_N], -1, tl.int32), mask=(pos >= count) & (pos < num_blocks))


def compose_structure_triton(
    parts: MaskParts, estimate: torch.Tensor, grid: BlockGrid, indices: torch.Tensor, counts: torch.Tensor,
    head_start: int = 0, block_n: Optional[int] = None,
) -> None:
    """``compose.compose_structure_torch`` in one kernel: the structure of query heads
    ``head_start .. head_start + hc`` from :class:`MaskParts` and their estimate, bool [B, hc, P].

    Writes indices int32 [B, Hq, nqb, nb] (ascending, -1 padded) and counts int32 [B, Hq, nqb] at
    those heads; every tensor must be contiguous. block_n: key blocks per loop step (a power of
    two; default nb rounded up, at most 1024).
    """
    vertical, slash, query_aware, short, sink = parts.vertical, parts.slash, parts.query_aware, parts.short, parts.sink
    batch, num_heads, num_blocks = vertical.shape
    chunk_heads = estimate.shape[1]
    nqb = grid.num_query_blocks
    pairs = causal_pair_count(grid)
    assert num_blocks == grid.num_blocks and slash.shape == vertical.shape, "vertical/slash must be [B, Hq, nb]"
    assert estimate.shape == (batch, chunk_heads, pairs), f"estimate must be [B, hc, {pairs}]"
    assert indices.shape == (batch, num_heads, nqb, num_blocks) and indices.dtype == torch.int32
    assert counts.shape == (batch, num_heads, nqb) and counts.dtype == torch.int32
    assert 0 <= head_start and head_start + chunk_heads <= num_heads
    for t in (vertical, slash, estimate, query_aware, short, sink, indices, counts):
        assert t.is_contiguous(), "compose_structure_triton takes contiguous tensors"
    if block_n is None:
        block_n = min(1024, max(16, next_power_of_2(num_blocks)))
    with launch_device(indices):  # the tensors' device, not the current one
        _compose_pack_kernel[(nqb, batch * chunk_heads)](
            vertical, slash, estimate, query_aware, short, sink, indices, counts,
            num_heads, head_start, chunk_heads, num_blocks, nqb, grid.first_query_block, pairs,
            BLOCK_N=block_n, num_warps=4 if block_n >= 256 else 1,
        )
