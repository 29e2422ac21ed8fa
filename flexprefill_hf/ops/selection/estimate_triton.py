"""Triton version of the §4 block estimate (ops/README.md §4; ``select._query_aware_coverage`` is the PyTorch
one and the oracle): the row-softmax of ``s · Q̄ K̄ᵀ`` over each query block's allowed key blocks, written
straight into the triangle layout of the block-causal pairs (``block_structure.causal_pair_index``).

One program per (query block, sequence x head): the logits of row t (grid block i = first_query_block + t)
against key blocks j <= i, masked to -inf before the sink and for rows holding no query, an online
softmax over them, then the probabilities at pair ``t * (first_query_block + 1) + t * (t - 1) / 2 + j``. A
row with no allowed block gets zeros (the PyTorch version's NaN -> 0). GQA by index: no K̄ is repeated.
The same function as the PyTorch version up to the rounding of exp and of the dot products' sums.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.block_sparse_triton import launch_device
from ..block_structure import causal_pair_count
from ..grid import BlockGrid
from ..runtime import interpreting, next_power_of_2
from .coverage_triton import _from_bits, float_bits, refuse_cuda_float64
from .pattern_triton import _div


@triton.jit
def _estimate_kernel(
    QMeans, KMeans, Sink, QueryRows, QueryAware, Out,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_heads, chunk_heads, head_start, num_kv_groups, num_query_blocks, first_query_block, num_pairs, scale_bits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, FP64: tl.constexpr,
    HAS_QUERY_ROWS: tl.constexpr, HAS_QUERY_AWARE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // chunk_heads
    off_hc = pid_bh % chunk_heads
    off_kvh = (head_start + off_hc) // num_kv_groups
    i = first_query_block + t
    dtype = tl.float64 if FP64 else tl.float32
    scale = _from_bits(scale_bits, FP64)
    sink = tl.load(Sink + off_b).to(tl.int64)
    # Rows without a query allow no block: an empty range of j.
    end = i + 1
    if HAS_QUERY_ROWS:
        end = tl.where(tl.load(QueryRows + off_b * num_query_blocks + t) != 0, i + 1, 0)
    # A vertical-slash head never reads its estimate: no loop step, nothing written.
    row_end = i + 1
    if HAS_QUERY_AWARE:
        row_end = tl.where(tl.load(QueryAware + off_b * num_heads + head_start + off_hc) != 0, i + 1, 0)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(QMeans + off_b * stride_qb + (head_start + off_hc) * stride_qh + t * stride_qm + offs_d * stride_qd,
                mask=offs_d < HEAD_DIM, other=0.0).to(dtype)  # [BD]
    k_base = KMeans + off_b * stride_kb + off_kvh * stride_kh
    out = Out + pid_bh * num_pairs + t * (first_query_block + 1) + t * (t - 1) // 2

    m_i = tl.full([], float("-inf"), dtype)
    l_i = tl.zeros([], dtype)
    for start in range(0, row_end, BLOCK_N):
        j = start + offs_n
        k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(j <= i)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(dtype)  # [BN, BD]
        logits = tl.where((j < end) & (j >= sink), tl.sum(k * q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk with nothing allowed: no NaN
        l_i = l_i * tl.exp(m_i - m_sub) + tl.sum(tl.exp(logits - m_sub), 0)
        m_i = m_new
    m_sub = tl.where(m_i == float("-inf"), 0.0, m_i)
    denom = tl.where(l_i > 0, l_i, 1.0)
    for start in range(0, row_end, BLOCK_N):
        j = start + offs_n
        k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(j <= i)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(dtype)
        logits = tl.where((j < end) & (j >= sink), tl.sum(k * q[None, :], 1) * scale, float("-inf"))
        p = _div(tl.exp(logits - m_sub), denom, FP64)  # 0 where not allowed
        tl.store(out + j, p, mask=j <= i)


def block_estimate_triton(
    q_means: torch.Tensor, k_means: torch.Tensor, sink: torch.Tensor, query_rows: Optional[torch.Tensor],
    grid: BlockGrid, softmax_scale: float, head_start: int, chunk_heads: int, block_n: Optional[int] = None,
    query_aware: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Row-softmax probabilities of the block estimate over the block-causal pairs: [B, hc, P] in k_means's dtype.

    q_means: [B, Hq, nqb, D] (all query heads; the chunk is ``head_start .. head_start + chunk_heads``),
    k_means: [B, Hkv, nb, D], both float32/float64, any strides; sink: int64 [B] (key blocks before it are
    padding); query_rows: bool [B, nqb] (query blocks holding a query; the others get zeros) or None.
    block_n: key blocks per loop step (a power of two; default nb rounded up, at most 8192 / D rounded up).
    query_aware: optional bool [B, Hq] (contiguous): heads where it is False are not computed (their rows
    stay uninitialised; only query-aware heads read the estimate).
    """
    batch, q_heads, nqb, head_dim = q_means.shape
    kv_heads = k_means.shape[1]
    refuse_cuda_float64("k_means", k_means)
    pairs = causal_pair_count(grid)
    out = torch.empty(batch, chunk_heads, pairs, dtype=k_means.dtype, device=k_means.device)
    block_d = next_power_of_2(head_dim)
    if block_n is None:
        block_n = min(max(16, next_power_of_2(grid.num_blocks)), max(16, 8192 // block_d))
    if query_rows is not None:
        query_rows = query_rows.contiguous()
    with launch_device(k_means):
        _estimate_kernel[(nqb, batch * chunk_heads)](
            q_means, k_means, sink, sink if query_rows is None else query_rows,
            sink if query_aware is None else query_aware, out, *q_means.stride(), *k_means.stride(), q_heads,
            chunk_heads, head_start, q_heads // kv_heads, nqb, grid.first_query_block, pairs,
            float_bits(softmax_scale, k_means.dtype), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
            FP64=k_means.dtype == torch.float64, HAS_QUERY_ROWS=query_rows is not None,
            HAS_QUERY_AWARE=query_aware is not None, num_warps=1 if interpreting() else 4,
        )
    return out
