"""Triton version of the §4 block estimate (ops/README.md §4; ``select._query_aware_coverage`` is the PyTorch
one and the oracle): the row-softmax of ``s · Q̄ K̄ᵀ`` over each query block's allowed key blocks, written
straight into the triangle layout of the block-causal pairs (``block_structure.causal_pair_index``).

One program per (query block, sequence x head): the logits of row t (grid block i = first_query_block + t)
against key blocks j <= i, masked to -inf before the sink and for rows holding no query, an online
softmax over them, then the probabilities at pair ``t * (first_query_block + 1) + t * (t - 1) / 2 + j``. A
row with no allowed block gets zeros (the PyTorch version's NaN -> 0). GQA by index: no K̄ is repeated.
The same function as the PyTorch version up to the rounding of exp and of the dot products' sums.

``ROWS_PER_PROGRAM`` > 1 (float32 only; the default, 16) runs ``_estimate_tile_kernel``: a tile of that many query
blocks per program, so each K̄ chunk is read once per tile rather than once per row (at 128K, one program per row
reads up to ~17 GB of K̄ from L2 per call), the logits by ``tl.dot``. On the H200 the 128K selection took 6.45 ms
with it against 6.80 ms by rows, the same selection (RESULTS.md, 2026-12-02 fourth session;
``benchmarks/profile_selection.py --time --estimate-rows 1`` times the row kernel).

The tile kernel's products run as "tf32x3" (``TILE_DOT_PRECISION``): three TF32 tensor-core products whose sum
carries about fp32's precision (max difference to the IEEE FMA products 1.2e-7 on probabilities at 128K), instead
of fp32 FMAs: on the H200 the kernel went from 1.47 to 0.34 ms at 128K and the whole selection from 6.33 to 5.18 ms,
with the same differing blocks against the all-PyTorch path on every check line as before (RESULTS.md, 2026-12-02
fifth session). The interpreter (CI) computes any precision as a plain fp32 product.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.block_sparse_triton import launch_device
from ..block_structure import causal_pair_count
from ..grid import BlockGrid
from ..runtime import cdiv, interpreting, next_power_of_2
from .coverage_triton import _from_bits, float_bits, refuse_cuda_float64
from .pattern_triton import _div

# Query blocks per program of the §4 estimate: 1 runs the row kernel; 16, 32 or 64 the tile kernel (float32).
# 16: measured on the H200, 2026-12-02 fourth session.
ROWS_PER_PROGRAM = 16
# The tile kernel's K̄ chunk (key blocks per step, at most) and warps. Register use decides them (fp32 operands
# by pointer loads: at 16 x 64 on 4 warps ptxas spills ~1.4 KB per thread).
TILE_BLOCK_N = 64
TILE_NUM_WARPS = 4
# The tile kernel's fp32 products: "tf32x3" (tensor cores, ~fp32 precision; 4.4x faster at 128K on the H200) or
# "ieee" (fp32 FMAs; ``profile_selection.py --estimate-ieee``).
TILE_DOT_PRECISION = "tf32x3"


@triton.jit
def _program_head(Sink, chunk_heads, head_start, num_kv_groups, scale_bits, FP64: tl.constexpr):
    """(pid_bh, off_b, off_hc, off_kvh, sink, scale) of a program of either kernel (axis 1: sequence x head)."""
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // chunk_heads
    off_hc = pid_bh % chunk_heads
    off_kvh = (head_start + off_hc) // num_kv_groups
    return pid_bh, off_b, off_hc, off_kvh, tl.load(Sink + off_b).to(tl.int64), _from_bits(scale_bits, FP64)


@triton.jit
def _estimate_kernel(
    QMeans, KMeans, Sink, QueryRows, QueryAware, Out,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_heads, chunk_heads, head_start, num_kv_groups, num_query_blocks, first_query_block, num_pairs, scale_bits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, FP64: tl.constexpr,
    HAS_QUERY_ROWS: tl.constexpr, HAS_QUERY_AWARE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_bh, off_b, off_hc, off_kvh, sink, scale = _program_head(Sink, chunk_heads, head_start, num_kv_groups,
                                                                 scale_bits, FP64)
    i = first_query_block + t
    dtype = tl.float64 if FP64 else tl.float32
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


@triton.jit
def _estimate_tile_kernel(
    QMeans, KMeans, Sink, QueryRows, QueryAware, Out,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    num_heads, chunk_heads, head_start, num_kv_groups, num_query_blocks, first_query_block, num_pairs, scale_bits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_QUERY_ROWS: tl.constexpr, HAS_QUERY_AWARE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``_estimate_kernel`` for BLOCK_M consecutive query blocks (rows t) per program, float32."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh, off_b, off_hc, off_kvh, sink, scale = _program_head(Sink, chunk_heads, head_start, num_kv_groups,
                                                                 scale_bits, False)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows
    in_rows = t < num_query_blocks
    i = first_query_block + t  # grid block of each row: it allows key blocks j <= i
    end = i + 1  # [BM]: allowed j < end (rows without a query allow none)
    if HAS_QUERY_ROWS:
        end = tl.where(tl.load(QueryRows + off_b * num_query_blocks + t, mask=in_rows, other=0) != 0, end, 0)
    # The loop runs to the tile's last row (the others mask), and not at all for a vertical-slash head.
    tile_end = tl.minimum(first_query_block + pid_m * BLOCK_M + BLOCK_M, first_query_block + num_query_blocks)
    if HAS_QUERY_AWARE:
        tile_end = tl.where(tl.load(QueryAware + off_b * num_heads + head_start + off_hc) != 0, tile_end, 0)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(QMeans + off_b * stride_qb + (head_start + off_hc) * stride_qh + t[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=in_rows[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    k_base = KMeans + off_b * stride_kb + off_kvh * stride_kh
    row_out = Out + pid_bh * num_pairs + t * (first_query_block + 1) + t * (t - 1) // 2  # [BM] pointers

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, tile_end, BLOCK_N):
        j = start + offs_n
        k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(j < tile_end)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BN, BD]
        allowed = (j[None, :] < end[:, None]) & (j[None, :] >= sink)
        logits = tl.where(allowed, tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk with nothing allowed: no NaN
        l_i = l_i * tl.exp(m_i - m_sub) + tl.sum(tl.exp(logits - m_sub[:, None]), 1)
        m_i = m_new
    m_sub = tl.where(m_i == float("-inf"), 0.0, m_i)
    denom = tl.where(l_i > 0, l_i, 1.0)
    for start in range(0, tile_end, BLOCK_N):
        j = start + offs_n
        k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(j < tile_end)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        allowed = (j[None, :] < end[:, None]) & (j[None, :] >= sink)
        logits = tl.where(allowed, tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale, float("-inf"))
        p = _div(tl.exp(logits - m_sub[:, None]), denom[:, None], False)  # 0 where not allowed
        tl.store(row_out[:, None] + j[None, :], p, mask=in_rows[:, None] & (j[None, :] <= i[:, None]))


def block_estimate_triton(
    q_means: torch.Tensor, k_means: torch.Tensor, sink: torch.Tensor, query_rows: Optional[torch.Tensor],
    grid: BlockGrid, softmax_scale: float, head_start: int, chunk_heads: int, block_n: Optional[int] = None,
    query_aware: Optional[torch.Tensor] = None, rows_per_program: Optional[int] = None,
) -> torch.Tensor:
    """Row-softmax probabilities of the block estimate over the block-causal pairs: [B, hc, P] in k_means's dtype.

    q_means: [B, Hq, nqb, D] (all query heads; the chunk is ``head_start .. head_start + chunk_heads``),
    k_means: [B, Hkv, nb, D], both float32/float64, any strides; sink: int64 [B] (key blocks before it are
    padding); query_rows: bool [B, nqb] (query blocks holding a query; the others get zeros) or None.
    block_n: key blocks per loop step (a power of two; default nb rounded up, at most 8192 / D rounded up).
    query_aware: optional bool [B, Hq] (contiguous): heads where it is False are not computed (their rows
    stay uninitialised; only query-aware heads read the estimate).
    rows_per_program: query blocks per program (default ``ROWS_PER_PROGRAM``; > 1 takes float32 only, a power of
    two >= 16: the tile kernel; float64 always runs the row kernel).
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
    rows = ROWS_PER_PROGRAM if rows_per_program is None else rows_per_program
    if rows != 1 and (rows < 16 or rows & (rows - 1)):
        raise ValueError(f"rows_per_program={rows} is not supported; expected 1 or a power of two >= 16")
    if rows > 1 and k_means.dtype == torch.float32:
        # Tiles for tl.dot: at least 16 each way; a K̄ chunk of [BN, BD] and a [BM, BN] logit tile in registers.
        block_n = max(16, min(next_power_of_2(grid.num_blocks), TILE_BLOCK_N)) if block_n is None else max(16, block_n)
        with launch_device(k_means):
            _estimate_tile_kernel[(cdiv(nqb, rows), batch * chunk_heads)](
                q_means, k_means, sink, sink if query_rows is None else query_rows,
                sink if query_aware is None else query_aware, out, *q_means.stride(), *k_means.stride(), q_heads,
                chunk_heads, head_start, q_heads // kv_heads, nqb, grid.first_query_block, pairs,
                float_bits(softmax_scale, k_means.dtype), HEAD_DIM=head_dim, BLOCK_D=max(16, block_d),
                BLOCK_M=rows, BLOCK_N=block_n, HAS_QUERY_ROWS=query_rows is not None,
                HAS_QUERY_AWARE=query_aware is not None, DOT_PRECISION=TILE_DOT_PRECISION,
                num_warps=1 if interpreting() else TILE_NUM_WARPS,
            )
        return out
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
