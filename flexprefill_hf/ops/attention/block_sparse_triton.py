"""Block-sparse causal attention forward (ops/README.md §6): Triton kernel and its host entries.

Layout: q ``[B, q_len, Hq, D]``, k and v ``[B, k_len, Hkv, D]`` in fp16 or bf16 with any strides (Hugging
Face's transposed views are read in place). Query head ``h`` reads KV head ``h // (Hq // Hkv)``. Query row
``r`` sits at key position ``k_len - q_len + r`` (bottom-right causal). Blocks lie on the end-aligned grid of
``ops/grid.py``; ``structure`` (``ops/block_structure.py``) lists, per (batch, query head, present query
block), the ascending key blocks to compute. A row attends key ``t`` iff ``t <= position``,
``t >= key_start[b]`` and ``block(t)`` is listed for its query block; a row with no such key outputs 0 and
has log-sum-exp ``-inf``. The oracle is ``reference.block_sparse_attention_reference``; the same function
in PyTorch is ``block_sparse_torch.block_sparse_attention_torch``.

One program computes ``BLOCK_M`` rows of one query block for one (batch, query head). Its key list splits
into three ranges because it is ascending: leading blocks that hold padding (``t < key_start`` or the
virtual left padding of the grid), middle blocks that are wholly visible (no element mask: the fast,
pipelined loop) and trailing blocks at or after the query block (the causal diagonal). Per tile config,
the wholly visible loop may load each block index one iteration ahead (``PREFETCH_INDEX``).

Forward only: FlexPrefill is a prefill (inference) method, and the entries refuse inputs that require grad.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..block_structure import BlockStructure
from ..runtime import LN2, LOG2E, interpreting, is_hopper, next_power_of_2
from ..validation import check_attention_inputs, check_softmax_scale, check_structure

_LN2 = tl.constexpr(LN2)


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q, idx_row, stride_ik, k_head, v_head, stride_kn, stride_vn, k_offs, v_offs, d_mask,
    offs_m, m_last, key_lo, pad, qk_scale, j_start, j_end, n_lo, n_hi,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, LOOP_STAGES: tl.constexpr, PREFETCH_INDEX: tl.constexpr,
):
    """Online softmax over key sub-tiles ``j_start .. j_end - 1`` (``BLOCK_SIZE // BLOCK_N`` per listed block).

    MASKED: the sub-tiles of the masked entries ``[0, n_lo)`` then ``[n_hi, count)``, with the causal and
    padding element mask; otherwise the wholly visible entries ``[n_lo, n_hi)`` with no mask at all.
    """
    TILES_N: tl.constexpr = BLOCK_SIZE // BLOCK_N
    if PREFETCH_INDEX:
        kb_next = tl.load(idx_row + (j_start // TILES_N) * stride_ik, mask=j_start < j_end, other=0).to(tl.int64)
    for j in tl.range(j_start, j_end, num_stages=LOOP_STAGES):
        entry = j // TILES_N
        if MASKED:
            entry = tl.where(entry < n_lo, entry, entry - n_lo + n_hi)
        if PREFETCH_INDEX:
            # The tile's block index was loaded one iteration ahead: its K/V loads depend on a loop-carried
            # value instead of a load in the same iteration, which the pipeliner can schedule early.
            kb = kb_next
            kb_next = tl.load(idx_row + ((j + 1) // TILES_N) * stride_ik, mask=j + 1 < j_end, other=0).to(tl.int64)
        else:
            kb = tl.load(idx_row + entry * stride_ik).to(tl.int64)
        n_start = kb * BLOCK_SIZE - pad + (j % TILES_N) * BLOCK_N
        offs_n = n_start + tl.arange(0, BLOCK_N)  # [BN] key positions
        k_ptrs = k_head + n_start * stride_kn + k_offs
        v_ptrs = v_head + n_start * stride_vn + v_offs
        if MASKED:
            # Never read keys no row may see: virtual padding (negative positions) or past the last row.
            n_mask = (offs_n >= key_lo) & (offs_n <= m_last)
            k = tl.load(k_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, k)  # [BM, BN] fp32
        if MASKED:
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= key_lo)
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(qk - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc)  # [BM, BD]
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _block_sparse_attention_fwd_kernel(
    Q, K, V, Out, Lse, Indices, Counts, KeyStart, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    num_heads, num_kv_groups, q_len, k_len, pad, first_query_block, num_query_blocks, qk_scale,
    length_bucket,  # only an autotune key: the best tiles differ between 4K and 32K tokens
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_START: tl.constexpr, STORE_LSE: tl.constexpr, UPCAST: tl.constexpr,
    PREFETCH_INDEX: tl.constexpr, PACKED: tl.constexpr,
):
    tl.static_assert(BLOCK_SIZE % BLOCK_M == 0, "BLOCK_M must divide the block size")
    # torch.compile may hand float scalars over as fp64; keep the softmax state in fp32.
    qk_scale = tl.full([], qk_scale, tl.float32)
    tl.static_assert(BLOCK_SIZE % BLOCK_N == 0, "BLOCK_N must divide the block size")
    TILES_M: tl.constexpr = BLOCK_SIZE // BLOCK_M
    TILES_N: tl.constexpr = BLOCK_SIZE // BLOCK_N
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    # int64 before any stride arithmetic: positions times strides overflow int32 at 1M tokens.
    pid_bh = tl.program_id(0).to(tl.int64)
    # Later query blocks have the longest key lists: launch them first.
    tile = num_query_blocks * TILES_M - 1 - tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_kvh = off_h // num_kv_groups
    qb_row = tile // TILES_M
    query_block = first_query_block + qb_row
    m_start = query_block * BLOCK_SIZE - pad + (tile % TILES_M) * BLOCK_M  # position of the tile's row 0
    key_lo = tl.zeros([], dtype=tl.int64)
    if HAS_KEY_START:
        key_lo = tl.maximum(tl.load(KeyStart + off_b).to(tl.int64), 0)
    if PACKED:
        # Sequence off_b laid into the padded (q_len, k_len) view: its query row r is packed row
        # cu_q[b] + r, its key at padded position t is packed key cu_k[b] + t - key_start[b].
        q_base = tl.load(CuSeqlensQ + off_b).to(tl.int64)
        cache_len = k_len - (tl.load(CuSeqlensQ + off_b + 1).to(tl.int64) - q_base)
        k_base = tl.load(CuSeqlensK + off_b).to(tl.int64) - key_lo
    else:
        q_base = tl.zeros([], dtype=tl.int64)
        cache_len = k_len - q_len
        k_base = tl.zeros([], dtype=tl.int64)

    offs_m = m_start + tl.arange(0, BLOCK_M)  # [BM] query positions
    rows = offs_m - cache_len  # [BM] query rows; < 0 before the first query
    row_mask = rows >= 0
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q_rows = q_base + rows  # [BM] rows of the q tensor (packed rows in the packed layout)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + q_rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
    if UPCAST:
        q = q.to(tl.float32)

    # First key block without padding keys; blocks before it need the element mask.
    first_full_block = (key_lo + pad + BLOCK_SIZE - 1) // BLOCK_SIZE

    idx_row = Indices + off_b * stride_ib + off_h * stride_ih + qb_row * stride_iq
    count = tl.load(Counts + off_b * stride_cb + off_h * stride_ch + qb_row * stride_cq)
    # A tile wholly before the first query (q_len smaller than a block) has nothing to compute.
    count = tl.where(m_start + BLOCK_M > cache_len, count, 0)
    # Trailing entries at or after the query block (the diagonal): [n_hi, count) need the causal mask.
    n_hi = count
    kb = tl.load(idx_row + (n_hi - 1) * stride_ik, mask=n_hi > 0, other=-1)
    while kb >= query_block:
        n_hi -= 1
        kb = tl.load(idx_row + (n_hi - 1) * stride_ik, mask=n_hi > 0, other=-1)
    # Leading entries holding padding keys: [0, n_lo) need the padding mask.
    n_lo = n_hi * 0
    kb = tl.load(idx_row, mask=n_lo < n_hi, other=0).to(tl.int64)
    while (n_lo < n_hi) & (kb < first_full_block):
        n_lo += 1
        kb = tl.load(idx_row + n_lo * stride_ik, mask=n_lo < n_hi, other=0).to(tl.int64)

    k_head = K + off_b * stride_kb + k_base * stride_kn + off_kvh * stride_kh
    v_head = V + off_b * stride_vb + k_base * stride_vn + off_kvh * stride_vh
    # Offsets inside a key tile stay int32; the tile's start is added to the int64 base pointer.
    offs_tile_n = tl.arange(0, BLOCK_N)
    # K is read transposed: a C-ordered tile for the dot (the interpreter's numpy matmul is 100x slower
    # on a transposed view).
    k_offs = offs_d[:, None] * stride_kd + offs_tile_n[None, :] * stride_kn  # [BD, BN]
    v_offs = offs_tile_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BN, BD]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Wholly visible key blocks (no element mask, pipelined with the launch's num_stages), then the few
    # padding and diagonal blocks (masked; usually one or two, not worth pipeline buffers).
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, idx_row, stride_ik, k_head, v_head, stride_kn, stride_vn, k_offs, v_offs, d_mask,
        offs_m, m_start + BLOCK_M - 1, key_lo, pad, qk_scale, n_lo * TILES_N, n_hi * TILES_N, n_lo, n_hi,
        BLOCK_SIZE, BLOCK_N, BLOCK_D, EVEN_D, False, UPCAST, None, PREFETCH_INDEX,
    )
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, idx_row, stride_ik, k_head, v_head, stride_kn, stride_vn, k_offs, v_offs, d_mask,
        offs_m, m_start + BLOCK_M - 1, key_lo, pad, qk_scale, 0, (n_lo + count - n_hi) * TILES_N, n_lo, n_hi,
        BLOCK_SIZE, BLOCK_N, BLOCK_D, EVEN_D, True, UPCAST, 1, False,
    )

    # Rows that saw no key have l_i = 0 and acc = 0: they output 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + q_rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if STORE_LSE:
        tl.static_assert(not PACKED, "the packed layout stores no log-sum-exp")
        # m_i is in log2 units (log2(e) is folded into qk_scale); empty rows get -inf.
        lse = (m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))) * _LN2
        tl.store(Lse + pid_bh * q_len + rows, lse, mask=row_mask)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Pinned tiles for the sparse kernel (tests, benchmarks, sweeps); without one the GPU autotunes.

    block_m: query rows per program; block_n: keys per inner step. Both powers of two in [16, 128] that
    divide the grid's block size. num_warps: 1, 2, 4, 8 or 16. num_stages >= 1: software-pipeline depth of
    the wholly visible loop. prefetch_index: load each key block's index one iteration ahead.
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    prefetch_index: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected an int")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value not in (16, 32, 64, 128):
                raise ValueError(f"{name}={value} is not supported; expected one of (16, 32, 64, 128)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} is not supported; expected one of (1, 2, 4, 8, 16)")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} is not supported; expected an int >= 1")
        if not isinstance(self.prefetch_index, bool):
            raise TypeError(f"prefetch_index={self.prefetch_index!r} has type "
                            f"{type(self.prefetch_index).__name__}; expected a bool")

    def as_tuple(self) -> tuple:
        return (self.block_m, self.block_n, self.num_warps, self.num_stages, self.prefetch_index)


def _config(tiles: tuple) -> triton.Config:
    bm, bn, warps, stages, prefetch = tiles
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "PREFETCH_INDEX": prefetch}, num_warps=warps, num_stages=stages)


def _tiles_of(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["PREFETCH_INDEX"])


# Tuning tables measured on an H200 (compute capability 9.0, benchmarks/RESULTS.md kernel sweep); they apply
# only there. BLOCK_M x BLOCK_N, warps, pipeline stages, index prefetch (see _attend_blocks). The prefetch
# gained 13 % with 128 x 128 tiles, 3 stages, d 128, but cost 4x with 128 x 64 tiles on 4 warps: a per-config
# choice.
_H200_TILES = [
    (128, 128, 8, 3, True), (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 8, 3, False),
    (128, 64, 4, 3, False), (64, 64, 4, 3, False), (64, 64, 4, 2, False), (64, 64, 8, 2, False),
    (64, 32, 8, 2, False),
]
# Measured best on the H200 from 32K tokens on: with d 128 128 x 128 tiles on 8 warps, 3 stages, index
# prefetch; with d 64 128 x 64 tiles on 4 warps without it.
_H200_LONG_CANDIDATES = {(128, 128, 8, 3, True), (128, 64, 4, 3, False)}
# length_bucket (query blocks, rounded up to a power of two) from which only the long candidates are tuned:
# more than 128 query blocks, i.e. beyond 16K tokens at block 128, where every trial costs a long call.
_LONG_BUCKET = 256
# Every other GPU: a plain list of common flash-attention tiles, all tried (nothing measured there).
_DEFAULT_TILES = [
    (128, 128, 8, 2, False), (128, 64, 4, 2, False), (64, 64, 4, 2, False), (64, 64, 4, 3, False),
    (64, 32, 4, 2, False),
]
_ALL_CONFIGS = [_config(t) for t in dict.fromkeys(_H200_TILES + _DEFAULT_TILES)]
# Launched without tuning under CUDA-graph capture: in both lists above, and dividing both block sizes.
_CAPTURE_TILES = TileConfig(64, 64, 4, 2, False)


def _prune_configs(configs, named_args, **kwargs):
    block_size, block_d = kwargs["BLOCK_SIZE"], kwargs["BLOCK_D"]
    hopper = is_hopper(named_args["Q"])
    listed = set(_H200_TILES if hopper else _DEFAULT_TILES)

    def fits(c):
        bm, bn, warps = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        # More than 64 fp32 accumulator values per thread spill registers (ptxas -v on the H200; the
        # register file per thread is the same on other recent GPUs).
        spills = bm * block_d > 64 * 32 * warps
        # H200: narrow key tiles and 64-row tiles on 8 warps ran at 40 % of the best with d 128; only heads
        # too wide for 64 x 64 tiles on 4 warps need them.
        slow = hopper and (bn < 64 or (bm < 128 and warps == 8)) and block_d <= 128
        return _tiles_of(c) in listed and bm <= block_size and bn <= block_size and not spills and not slow

    # The smallest tile always fits: keep it so every head dim has a candidate.
    kept = [c for c in configs if fits(c)] or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    if hopper and named_args.get("length_bucket", 0) >= _LONG_BUCKET:
        kept = [c for c in kept if _tiles_of(c) in _H200_LONG_CANDIDATES] or kept
    return kept


def _tuning_bench(kernel_call, quantiles):
    """Autotuner timing: do_bench for short calls; one timed call (after a warm-up) for long ones, where
    do_bench's ~7 calls per config would cost minutes at 1M tokens."""
    kernel_call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    kernel_call()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    if ms < 20.0:
        return triton.testing.do_bench(kernel_call, warmup=5, rep=50, quantiles=quantiles)
    return [ms] * len(quantiles)


_TUNING = dict(configs=_ALL_CONFIGS, key=["HEAD_DIM", "BLOCK_SIZE", "length_bucket"],
               prune_configs_by={"early_config_prune": _prune_configs})
_block_sparse_attention_fwd_tuned = triton.autotune(**_TUNING, do_bench=_tuning_bench)(_block_sparse_attention_fwd_kernel)
# Under torch.compile the user kernel is tuned by inductor: hand it a plain autotuner.
_block_sparse_attention_fwd_tuned_plain = triton.autotune(**_TUNING)(_block_sparse_attention_fwd_kernel)


def _check_tile_config(tile_config, block_size: int) -> None:
    if tile_config is not None and not isinstance(tile_config, TileConfig):
        raise TypeError(f"tile_config has type {type(tile_config).__name__}; expected TileConfig or None")
    if tile_config is not None and (block_size % tile_config.block_m or block_size % tile_config.block_n):
        raise ValueError(
            f"tile_config block_m={tile_config.block_m}, block_n={tile_config.block_n} do not divide "
            f"block_size={block_size}; expected divisors of the block size"
        )


def _check_inputs(q, k, v, structure: BlockStructure, softmax_scale, key_start, tile_config) -> None:
    """What the public launchers check (the operator checks its own inputs and calls the unchecked one)."""
    check_attention_inputs(q, k, v, key_start, kernel=True)
    check_structure(structure, q, k)
    check_softmax_scale(softmax_scale)
    _check_tile_config(tile_config, structure.grid.block_size)


def _block_sparse_attention_triton(
    q, k, v, structure: BlockStructure, softmax_scale, key_start, tile_config=None, store_lse: bool = False
):
    """:func:`block_sparse_attention_triton` without validation (the caller validated: the operator, which
    built ``structure`` itself); allocate and launch. Returns (out, lse), lse ``out`` itself when not stored."""
    batch, q_len, q_heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device) if store_lse else out
    if q_len == 0 or batch == 0 or q_heads == 0:
        return out, lse
    _launch(q, k, v, out, lse, structure, softmax_scale, key_start, None, tile_config, store_lse)
    return out, lse


def _launch(q, k, v, out, lse, structure: BlockStructure, softmax_scale, key_start, cu_seqlens, tile_config,
            store_lse: bool) -> None:
    """Launch the kernel on q [B, q_len, Hq, D] (or, with ``cu_seqlens = (cu_q, cu_k)``, the packed q
    [total_q, Hq, D] and k/v [total_k, Hkv, D]); ``structure`` has the batch and the grid of the launch."""
    grid_geom = structure.grid
    batch, q_heads = structure.counts.shape[:2]
    head_dim = q.shape[-1]
    packed = cu_seqlens is not None
    if packed:  # the packed tensors as one batch row: the kernel adds each sequence's offsets itself
        q, k, v, out = (t.unsqueeze(0).expand(batch, -1, -1, -1) for t in (q, k, v, out))
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_SIZE=grid_geom.block_size,
        BLOCK_D=next_power_of_2(head_dim),
        HAS_KEY_START=key_start is not None,
        STORE_LSE=store_lse,
        # The interpreter computes bf16 arithmetic wrongly: upcast right after each load there.
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PACKED=packed,
    )
    if tile_config is None and interpreting():
        # Autotuning needs a GPU. The interpreter's cost is per tile, barely by size: one tile per block.
        tile_config = TileConfig(grid_geom.block_size, grid_geom.block_size, 4, 1, True)
    elif tile_config is None and q.is_cuda and not torch.compiler.is_compiling() and _capturing():
        # Inside CUDA-graph capture (transformers' continuous batching captures its forward) the autotuner's
        # timing runs would break the capture: a tile listed for every GPU and both block sizes instead.
        # (Under torch.compile inductor tunes the kernel, and the capture query cannot be traced.)
        tile_config = _CAPTURE_TILES
    if tile_config is not None:
        kernel = _block_sparse_attention_fwd_kernel
        meta.update(BLOCK_M=tile_config.block_m, BLOCK_N=tile_config.block_n, PREFETCH_INDEX=tile_config.prefetch_index,
                    num_warps=tile_config.num_warps, num_stages=tile_config.num_stages)
    elif torch.compiler.is_compiling():
        kernel = _block_sparse_attention_fwd_tuned_plain
    else:
        kernel = _block_sparse_attention_fwd_tuned

    def launch_grid(m):
        num_tiles = grid_geom.num_query_blocks * (grid_geom.block_size // m["BLOCK_M"])
        if num_tiles > 65535:  # CUDA's limit on the second grid dimension
            raise ValueError(f"q_len={grid_geom.q_len} needs {num_tiles} query tiles; at most 65535 are supported")
        return (batch * q_heads, num_tiles)

    indices, counts = structure.indices, structure.counts
    cu_q, cu_k = cu_seqlens if packed else (counts, counts)  # never read unless packed
    with launch_device(q):  # q's device, not the current one (a model on cuda:1 while cuda:0 is current)
        kernel[launch_grid](
            q, k, v, out, lse, indices, counts, key_start if key_start is not None else counts, cu_q, cu_k,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *indices.stride(), *counts.stride(),
            q_heads, q_heads // k.shape[2], grid_geom.q_len, grid_geom.k_len, grid_geom.pad,
            grid_geom.first_query_block, grid_geom.num_query_blocks,
            scale * LOG2E,  # the kernel's softmax uses exp2
            # Beyond 128 query blocks (16K tokens at block 128) one tuning for all: the same tiles won at 32K and 128K.
            min(next_power_of_2(grid_geom.num_query_blocks), _LONG_BUCKET),
            **meta,
        )


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def launch_device(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device current for a Triton launch (Triton launches on the current
    device, whatever the tensors' one); a no-op for CPU tensors (the interpreter) and inside a torch.compile
    trace, where inductor's generated code sets the graph's device itself and dynamo cannot trace the
    device switch (nor the capture query above) into a full graph."""
    if not t.is_cuda or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
    tile_config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """Causal attention over the key blocks selected in ``structure``, forward only (no gradients).

    Args:
        q: [B, q_len, Hq, D] fp16/bf16, any strides. k, v: [B, k_len, Hkv, D], same dtype and device;
            Hq a multiple of Hkv; q_len <= k_len; D a multiple of 8 in [16, 256].
        structure: the selected key blocks, grid block size 64 or 128, ``grid.q_len == q_len`` and
            ``grid.k_len == k_len``; indices int32 [B, Hq, nqb, nb], counts int32 [B, Hq, nqb].
        softmax_scale: defaults to 1 / sqrt(D).
        key_start: optional int32/int64 [B], 0 <= key_start[b] <= k_len (k_len: padding only, every row outputs 0);
            keys before it are (left) padding.
            On CUDA the range is checked by a device-side assert (no host sync; see ``ops/validation.py``).
        tile_config: pin the tiles (:class:`TileConfig`); default: autotuned on the GPU (H200-measured
            candidates on compute capability 9.0, a plain list elsewhere), one tile per block in the
            Triton interpreter.
    Returns:
        out [B, q_len, Hq, D] in the input dtype; rows with no visible key are 0. A NaN or Inf in q, k or v
        reaches every row whose computed blocks hold it (as in SDPA).
    """
    _check_inputs(q, k, v, structure, softmax_scale, key_start, tile_config)
    return _block_sparse_attention_triton(q, k, v, structure, softmax_scale, key_start, tile_config)[0]


def block_sparse_attention_triton_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
    tile_config: Optional[TileConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`block_sparse_attention_triton`; also returns the natural log-sum-exp, fp32 [B, Hq, q_len]
    (``-inf`` for rows with no visible key)."""
    _check_inputs(q, k, v, structure, softmax_scale, key_start, tile_config)
    return _block_sparse_attention_triton(q, k, v, structure, softmax_scale, key_start, tile_config, store_lse=True)


def block_sparse_attention_triton_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    tile_config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """:func:`block_sparse_attention_triton` on packed variable-length sequences, without unpacking them.

    Args:
        q: [total_q, Hq, D] fp16/bf16, the queries of sequence b in rows ``cu_seqlens_q[b] : cu_seqlens_q[b+1]``.
        k, v: [total_k, Hkv, D], sequence b's keys in rows ``cu_seqlens_k[b] : cu_seqlens_k[b+1]``; its queries
            are its last ``q_len_b`` keys (bottom-right causal), ``q_len_b <= k_len_b``.
        structure: on the padded grid ``(max_seqlen_q, max_seqlen_k)`` of the batch, indices int32
            [B, Hq, nqb, nb] and counts int32 [B, Hq, nqb], any strides: sequence b is laid into that view
            end-aligned, i.e. left-padded by ``key_start[b] = max_seqlen_k - k_len_b`` keys, so its blocks
            are those it has alone shifted by the padding blocks (``ops/varlen.py`` builds it). Row t of a
            query block before the sequence's first query computes nothing for it (no row is stored).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] on q's device, cumulative lengths.
    Returns:
        [total_q, Hq, D] in q's dtype; rows outside every sequence (past ``cu_seqlens_q[B]``) are 0.

    Nothing is read on the host (no sync): the lengths are checked by ``ops/varlen.check_varlen_inputs``
    (device-side asserts on CUDA). The kernel is the padded one with per-sequence base offsets, so a
    sequence's output equals the one it gets alone from :func:`block_sparse_attention_triton`, bit for bit.
    """
    from ..varlen import check_varlen_inputs

    grid_geom = getattr(structure, "grid", None)
    if grid_geom is None or not hasattr(structure, "indices") or not hasattr(structure, "counts"):
        raise TypeError(f"structure has type {type(structure).__name__}; expected a BlockStructure")
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, grid_geom.q_len, grid_geom.k_len, kernel=True)
    check_softmax_scale(softmax_scale)
    _check_tile_config(tile_config, grid_geom.block_size)
    batch = cu_seqlens_q.shape[0] - 1
    expected = (batch, q.shape[1], grid_geom.num_query_blocks, grid_geom.num_blocks)
    for name, t, shape in (("indices", structure.indices, expected), ("counts", structure.counts, expected[:3])):
        if tuple(t.shape) != shape or t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"structure.{name} is {t.dtype} of shape {tuple(t.shape)} on {t.device}; "
                             f"expected torch.int32 of shape {shape} on {q.device}")
    return _block_sparse_attention_triton_packed(q, k, v, structure, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                                 tile_config)


def _block_sparse_attention_triton_packed(q, k, v, structure: BlockStructure, cu_seqlens_q, cu_seqlens_k,
                                          softmax_scale, tile_config=None) -> torch.Tensor:
    """:func:`block_sparse_attention_triton_packed` without validation (the caller validated:
    ``varlen.flexprefill_attention_varlen``, which built ``structure`` itself); allocate and launch."""
    from ..varlen import varlen_key_start

    batch = cu_seqlens_q.shape[0] - 1
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return out
    key_start = varlen_key_start(cu_seqlens_k, structure.grid.k_len)
    _launch(q, k, v, out, out, structure, softmax_scale, key_start, (cu_seqlens_q, cu_seqlens_k), tile_config, False)
    return out


def tuned_tile_config() -> Optional[TileConfig]:
    """The tiles the autotuner chose for the most recent autotuned (eager, GPU) launch, as a
    :class:`TileConfig`; None before the first one. For benchmarks that report what ran."""
    best = getattr(_block_sparse_attention_fwd_tuned, "best_config", None)
    return None if best is None else TileConfig(*_tiles_of(best))
