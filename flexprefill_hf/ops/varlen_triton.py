"""Block means of packed sequences in one Triton launch: ``segment_block_means_triton``.

The Triton version of ``varlen._block_means`` (its PyTorch version, one ``index_add_`` segment sum over the
packed rows). On the H200 that segment sum and the float32 copies it needs took 16-26 % of a varlen call
(``index_add_``'s atomics over ~10^8 float32 elements per call, RESULTS.md, 2026-12-02 second session); here
each program reads its block's rows once, in the input dtype, and sums them in float32 in registers.

Layout as ``varlen._block_means``: sequence b's rows ``cu_seqlens[b] : cu_seqlens[b] + lens[b]`` of x
[total, H, D] are the last ``lens[b]`` positions of the padded view of ``grid.k_len`` rows; block ``j`` of the
grid covers view positions ``[j * block - pad, (j + 1) * block - pad)``. One program per (sequence, block,
head), each summing at most ``block_size`` rows of D values. The CUDA default (``varlen.SEGMENT_MEANS_TRITON``;
timed on the H200 against ``index_add_``: whole varlen calls 0.77-0.84x the time, the same output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention.block_sparse_triton import launch_device
from .grid import BlockGrid
from .runtime import next_power_of_2


@triton.jit
def _segment_means_kernel(
    X, CuSeqlens, Out, stride_xt, stride_xh, stride_xd, num_heads, blocks, first_block, view_len, pad,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (sequence, block)
    head = tl.program_id(1).to(tl.int64)
    seq = pid // blocks
    block = pid % blocks + first_block
    row0 = tl.load(CuSeqlens + seq).to(tl.int64)
    length = tl.load(CuSeqlens + seq + 1).to(tl.int64) - row0
    start = view_len - length  # view position of the sequence's first row
    lo = tl.maximum(block * BLOCK_SIZE - pad, start)
    hi = tl.minimum((block + 1) * BLOCK_SIZE - pad, view_len)
    count = tl.maximum(hi - lo, 0)
    offs_r = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    rows = row0 + lo - start + offs_r  # packed rows of view positions lo, lo + 1, ...
    ptrs = X + rows[:, None] * stride_xt + head * stride_xh + offs_d[None, :] * stride_xd
    x = tl.load(ptrs, mask=(offs_r < count)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(x.to(tl.float32), 0)  # [BLOCK_D]
    mean = total / tl.maximum(count, 1).to(tl.float32)  # a block without rows: 0
    out = Out + ((seq * num_heads + head) * blocks + pid % blocks) * HEAD_DIM + offs_d
    tl.store(out, mean, mask=offs_d < HEAD_DIM)


def segment_block_means_triton(
    x: torch.Tensor, cu_seqlens: torch.Tensor, grid: BlockGrid, first_block: int
) -> torch.Tensor:
    """float32 [B, H, nb - first_block, D]: the mean of each block ``first_block .. nb - 1`` of the padded grid
    over the packed rows of x [total, H, D] (fp16/bf16/fp32, any strides) of its sequence that fall in it,
    0 where none do. cu_seqlens: int32 [B + 1] on x's device (sequence b: rows ``cu_seqlens[b] :
    cu_seqlens[b+1]``, the last positions of its view of ``grid.k_len`` rows). Same function as
    ``varlen._block_means`` (float32 sums in another order)."""
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype  # float64 keeps index_add_
    batch, blocks = cu_seqlens.shape[0] - 1, grid.num_blocks - first_block
    heads, head_dim = x.shape[1], x.shape[2]
    out = torch.empty(batch, heads, blocks, head_dim, dtype=torch.float32, device=x.device)
    if batch == 0 or blocks == 0:
        return out
    with launch_device(x):
        _segment_means_kernel[(batch * blocks, heads)](
            x, cu_seqlens, out, *x.stride(), heads, blocks, first_block, grid.k_len, grid.pad,
            HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK_SIZE=grid.block_size, num_warps=4,
        )
    return out
