"""Triton version of the pattern test (ops/README.md §2; ``select._pattern`` is the PyTorch one and the oracle).

One program per (sequence, query head) computes, without any intermediate tensor:

    mean      the mean of the real representative rows of q (rows at or after the first real query)
    estimate  ā = softmax(s · mean · K̄ᵀ) over the key blocks (padding blocks, before the sink: -inf)
    distance  sqrt(JSD(ā, â)) with the true block distribution â (natural log, 0·log 0 = 0)
    pattern   query_aware = distance < τ (τ rounded to the compute dtype, as ``tensor < float`` does)

and, for sequences short enough to run dense, NaN and False instead (``select._select``). Two passes over
the key-block means (the softmax's max and sum, then the distance). The arithmetic is the PyTorch
version's up to the order of its sums and the rounding of exp and log (a pattern can differ only for a
distance within that rounding of τ).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.block_sparse_triton import launch_device
from ..runtime import interpreting, next_power_of_2
from .coverage_triton import _from_bits, float_bits, refuse_cuda_float64


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    """a / b correctly rounded, as torch divides (Triton's fp32 ``/`` is an approximation on GPU; fp64's is exact)."""
    if FP64:
        return a / b
    return tl.math.div_rn(a, b)


@triton.jit
def _pattern_kernel(
    Q, KMeans, TrueDist, QueryStart, Sink, Short, Distance, QueryAware,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_tb, stride_th,
    num_heads, num_kv_groups, n, r, num_blocks, scale_bits, tau_bits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    FP64: tl.constexpr, HAS_SINK: tl.constexpr, HAS_SHORT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    off_b = pid // num_heads
    off_h = pid % num_heads
    off_kvh = off_h // num_kv_groups
    dtype = tl.float64 if FP64 else tl.float32
    tau = _from_bits(tau_bits, FP64)
    scale = _from_bits(scale_bits, FP64)

    # Mean of the real representative rows (rows before the first real query: padding or a packed cache).
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    query_lo = tl.load(QueryStart + off_b).to(tl.int64)
    real = (offs_r < r) & (n - r + offs_r >= query_lo)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_r[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=real[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0).to(dtype)  # [BR, BD]
    rows = tl.maximum(tl.sum(real.to(tl.int32), 0), 1).to(dtype)
    mean = _div(tl.sum(q, 0), rows, FP64)  # [BD]

    sink = tl.zeros([], dtype=tl.int64)
    if HAS_SINK:
        sink = tl.load(Sink + off_b).to(tl.int64)
    k_base = KMeans + off_b * stride_kb + off_kvh * stride_kh
    offs_n = tl.arange(0, BLOCK_N)
    # Pass 1: the softmax's max and sum over the real key blocks.
    m_i = tl.full([], float("-inf"), dtype)
    l_i = tl.zeros([], dtype)
    for start in range(0, num_blocks, BLOCK_N):
        j = start + offs_n
        k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(j < num_blocks)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BN, BD]
        logits = tl.sum(k * mean[None, :], 1) * scale
        logits = tl.where((j < num_blocks) & (j >= sink), logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 0))
        # A chunk of padding only leaves the max at -inf: subtract 0 then (exp(-inf) = 0, no NaN).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_sub) + tl.sum(tl.exp(logits - m_sub), 0)
        m_i = m_new
    # Pass 2: the JS divergence of the estimate p and the true distribution t.
    true_dist = TrueDist + off_b * stride_tb + off_h * stride_th
    kl = tl.zeros([], dtype)
    for start in range(0, num_blocks, BLOCK_N):
        j = start + offs_n
        valid = j < num_blocks
        k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        logits = tl.where(valid & (j >= sink), tl.sum(k * mean[None, :], 1) * scale, float("-inf"))
        p = _div(tl.exp(logits - m_i), l_i, FP64)
        t = tl.load(true_dist + j, mask=valid, other=0.0).to(dtype)
        log_m = tl.log(tl.where(p + t > 0, (p + t) * 0.5, 1.0))  # where both are 0 neither term is used
        kl_p = tl.where(p > 0, p * (tl.log(tl.where(p > 0, p, 1.0)) - log_m), 0.0)
        kl_t = tl.where(t > 0, t * (tl.log(tl.where(t > 0, t, 1.0)) - log_m), 0.0)
        kl += tl.sum(tl.where(valid, kl_p + kl_t, 0.0), 0)
    distance = tl.sqrt(tl.maximum(kl * 0.5, 0.0))
    query_aware = distance < tau
    if HAS_SHORT:
        short = tl.load(Short + off_b) != 0
        distance = tl.where(short, float("nan"), distance)
        query_aware = query_aware & ~short
    tl.store(Distance + pid, distance)
    tl.store(QueryAware + pid, query_aware.to(tl.int8))


def pattern_triton(
    q_rep: torch.Tensor, k_means: torch.Tensor, true_dist: torch.Tensor, query_start: torch.Tensor,
    sink, short, k_len: int, softmax_scale: float, tau: float, block_n: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """§2 in one launch: (distance [B, Hq] in k_means's dtype, query_aware bool [B, Hq]).

    q_rep: the representative rows [B, r, Hq, D] (the last r of k_len positions), any dtype and strides;
    k_means: [B, Hkv, nb, D] (float32/float64, any strides); true_dist: â [B, Hq, nb] (last dim
    contiguous); query_start: int64 [B], position of each sequence's first real query; sink: int64 [B]
    (key blocks before it are padding) or None; short: bool [B] (sequences that run dense: NaN, False) or None.
    block_n: key blocks per loop step (a power of two; default nb rounded up, at most 8192 / D rounded up).
    """
    batch, r, q_heads, head_dim = q_rep.shape
    kv_heads, num_blocks = k_means.shape[1], k_means.shape[2]
    assert true_dist.shape == (batch, q_heads, num_blocks) and true_dist.stride(-1) == 1
    refuse_cuda_float64("k_means", k_means)
    dtype = k_means.dtype
    distance = torch.empty(batch, q_heads, dtype=dtype, device=q_rep.device)
    query_aware = torch.empty(batch, q_heads, dtype=torch.bool, device=q_rep.device)
    block_d = next_power_of_2(head_dim)
    if block_n is None:
        block_n = min(next_power_of_2(num_blocks), max(16, 8192 // block_d))
    with launch_device(q_rep):
        _pattern_kernel[(batch * q_heads,)](
            q_rep, k_means, true_dist, query_start, query_start if sink is None else sink,
            query_start if short is None else short, distance, query_aware,
            *q_rep.stride(), *k_means.stride(), true_dist.stride(0), true_dist.stride(1),
            q_heads, q_heads // kv_heads, k_len, r, num_blocks, float_bits(softmax_scale, dtype), float_bits(tau, dtype),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=max(16, next_power_of_2(r)), BLOCK_N=block_n,
            FP64=dtype == torch.float64, HAS_SINK=sink is not None, HAS_SHORT=short is not None,
            num_warps=1 if interpreting() else 4,
        )
    return distance, query_aware
