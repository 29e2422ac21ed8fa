"""Triton kernels for the selection's heaviest stage: the representative block's scores (ops/README.md §1, §3).

The representative queries (the last r <= B rows) attend to all n keys. Selection needs only the
column sums (vertical scores a_v) and the diagonal sums (slash scores a_s) of those r x n
probabilities, so two passes over the keys reduce them on the fly and no r x n tensor is stored:

1. ``_representative_lse_kernel``: each program runs an online softmax over a range of key tiles
   and writes a partial (max, sum) per row.
2. ``_representative_scores_kernel``: combines its head's partials into each row's log-sum-exp,
   recomputes the probabilities tile by tile, writes the column sums of each tile, and the tile's
   diagonal sums as 2*BLOCK partial sums (deterministic, no atomics). The diagonals become columns
   by rotating row i of the tile left by i (``tl.gather``, on chip); a column then holds one diagonal
   above the wrap and another below it, summed apart. (``_DIAGONAL_BY_GATHER = False``: the older way,
   a scatter of the tile into a skewed per-program scratch in global memory and a reload.)
   On Hopper ``scores_gluon.py`` replaces this kernel (same outputs; the rotation through shared memory).
3. ``_slash_scores_kernel``: adds each tile's partial diagonal sums to its neighbour's and writes
   them by offset.

Three launches and no other device work: the selection's fixed cost on CUDA is mostly launches.

Both passes read each key tile as rows [BN, D] (head dim contiguous, as K lies) and transpose it on chip
(``_K_ROWS``; ptxas then gives the LSE kernel 128 registers a thread instead of 229), and mask only the tiles that
need it (``_visible_tiles``: the first real tile and the tiles past the first representative row). Together the two
took the LSE kernel from 0.58 to 0.41 ms at 128K on the H200; the row reads alone account for ~0.04 ms of the whole
selection (``profile_selection.py --k-columns``), the rest was not separated. Where the time goes (H200, 128K, 32 heads, ablation in RESULTS.md 2026-12-02 fifth
session): the probabilities and their column sums ~0.8 ms, the diagonals' ``tl.gather`` rotation ~1.2 ms more.

Layouts as in ``scores.representative_scores`` (the PyTorch version, and the oracle of the tests):
q [B, q_len, Hq, D], k [B, n, Hkv, D], any strides.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.block_sparse_triton import launch_device
from ..grid import BlockGrid
from ..runtime import LOG2E, cdiv, interpreting, next_power_of_2

# Partial (max, sum) rows one program of the scores kernel loads at once.
_SPLIT_CHUNK = 32
# How both kernels read a key tile: True, as rows [BN, D] (head dim contiguous, the way K lies in memory) transposed
# on chip; False, the [D, BN] transpose by strided loads. Rows: 5.18 vs 5.22 ms for the 128K selection on the H200
# (RESULTS.md, 2026-12-02 fifth session); fewer registers.
_K_ROWS = True
# How the scores kernel sums a tile's diagonals: True, by rotating each row with ``tl.gather`` (on-chip);
# False, through a skewed per-program scratch in global memory (a 128 x 256 fp32 store and reload per tile).
_DIAGONAL_BY_GATHER = True
# Where ``scores_gluon.supported`` (Hopper, fp16/bf16, block 128, head dim 64/128): the Gluon version of the scores
# kernel, which skews each tile through shared memory instead (H200: the pass 3.06 -> 1.79 ms at 128K; RESULTS.md,
# 2026-12-02 sixth session).
_SHARED_SKEW = True


@triton.jit
def _program_head(KeyStart, QueryStart, Skip, num_heads, num_kv_groups, n, HAS_KEY_START: tl.constexpr,
                  HAS_QUERY_START: tl.constexpr, HAS_SKIP: tl.constexpr):
    """This program's (sequence x query head) row, sequence, query head, KV head, first real key and
    position of the first real query (the first real key without QueryStart), int64. A sequence flagged in
    Skip gets its first real key at n: it reads no key, and its scores come out 0."""
    pid_bh = tl.program_id(0).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_kvh = off_h // num_kv_groups
    key_lo = tl.zeros([], dtype=tl.int64)
    if HAS_KEY_START:
        key_lo = tl.load(KeyStart + off_b).to(tl.int64)
    query_lo = key_lo
    if HAS_QUERY_START:
        query_lo = tl.load(QueryStart + off_b).to(tl.int64)
    if HAS_SKIP:
        key_lo = tl.where(tl.load(Skip + off_b) != 0, n, key_lo)
    return pid_bh, off_b, off_h, off_kvh, key_lo, query_lo


@triton.jit
def _load_rep_queries(Q, off_b, off_h, stride_qb, stride_qm, stride_qh, stride_qd, q_len, n, r, query_lo,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """The representative rows [BLOCK, BLOCK_D] (0 past r) and their key positions (-1 past r and before
    the first real query: no key)."""
    offs_r = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    rows = q_len - r + offs_r
    ptrs = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(ptrs, mask=(offs_r < r)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # Rows past r (q_len < block) and rows before the first query (padding, a packed sequence's cache) see no key.
    pos = tl.where((offs_r < r) & (n - r + offs_r >= query_lo), n - r + offs_r, -1)
    return q, pos


@triton.jit
def _tile_scores(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, n_start, n, key_lo, pos,
                 qk_scale, k_base, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                 UPCAST: tl.constexpr, PACKED_K: tl.constexpr, MASKED: tl.constexpr = True,
                 K_ROWS: tl.constexpr = True):
    """Scaled scores (log2 units) of the representative rows against keys n_start.. (masked to -inf).
    PACKED_K: key position t of the view is row k_base + t of the packed K, and positions before key_lo
    (another sequence's rows, or before the tensor) are never read. MASKED=False: the caller knows every key
    of the tile is real and visible to every row (``_visible_tiles``): no mask at all.
    K_ROWS: load the keys as rows [BN, BD] (head dim contiguous, as K lies) and transpose on chip; False loads
    the [BD, BN] transpose directly (the older way)."""
    offs_n = n_start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    load_n = offs_n < n
    if PACKED_K:
        load_n = load_n & (offs_n >= key_lo)
    base = K + off_b * stride_kb + off_kvh * stride_kh
    if K_ROWS:
        ptrs = base + (k_base + offs_n[:, None]) * stride_kn + offs_d[None, :] * stride_kd
        if MASKED:
            k = tl.load(ptrs, mask=load_n[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BN, BD]
        else:
            k = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        kt = tl.trans(k)
    else:
        ptrs = base + offs_d[:, None] * stride_kd + (k_base + offs_n[None, :]) * stride_kn
        if MASKED:
            kt = tl.load(ptrs, mask=load_n[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)  # [BD, BN]
        else:
            kt = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    qk = tl.dot(q, kt) * qk_scale  # [BR, BN]
    if MASKED:
        visible = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] >= key_lo) & (offs_n[None, :] < n)
        qk = tl.where(visible, qk, float("-inf"))
    return qk


@triton.jit
def _visible_tiles(t_lo, t_hi, n, r, key_lo, query_lo, BLOCK: tl.constexpr):
    """The tiles [lo, hi) of [t_lo, t_hi) that need no mask: all BLOCK rows are real queries (r = BLOCK, none before
    the first query) and every key of the tile is real and at or before the first row's position n - r."""
    all_rows = (r == BLOCK) & (query_lo <= n - r)
    lo = tl.minimum(tl.maximum(t_lo, (key_lo + BLOCK - 1) // BLOCK), t_hi)
    hi = tl.where(all_rows, tl.maximum(tl.minimum(t_hi, (n - r + 1) // BLOCK), lo), lo)
    return lo, hi


@triton.jit
def _online_row_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos, qk_scale,
                     k_base, m_i, l_i, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                     UPCAST: tl.constexpr, PACKED_K: tl.constexpr, MASKED: tl.constexpr, K_ROWS: tl.constexpr):
    """One tile of the online softmax: the rows' running (max, sum) after key tile t."""
    qk = _tile_scores(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t * BLOCK, n, key_lo,
                      pos, qk_scale, k_base, BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, MASKED, K_ROWS)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(qk - m_sub[:, None]), 1)
    return m_new, l_i


@triton.jit
def _representative_lse_kernel(
    Q, K, KeyStart, QueryStart, KeyBase, Skip, PartMax, PartSum,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    num_heads, num_kv_groups, q_len, n, r, tiles_per_program, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_KEY_START: tl.constexpr,
    HAS_QUERY_START: tl.constexpr, UPCAST: tl.constexpr, PACKED_K: tl.constexpr, HAS_SKIP: tl.constexpr,
    K_ROWS: tl.constexpr,
):
    # torch.compile may hand float scalars over as fp64; keep the softmax state in fp32.
    qk_scale = tl.full([], qk_scale, tl.float32)
    pid_bh, off_b, off_h, off_kvh, key_lo, query_lo = _program_head(
        KeyStart, QueryStart, Skip, num_heads, num_kv_groups, n, HAS_KEY_START, HAS_QUERY_START, HAS_SKIP
    )
    k_base = tl.zeros([], dtype=tl.int64)
    if PACKED_K:
        k_base = tl.load(KeyBase + off_b).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK)
    q, pos = _load_rep_queries(Q, off_b, off_h, stride_qb, stride_qm, stride_qh, stride_qd, q_len, n, r, query_lo,
                               BLOCK, BLOCK_D, HEAD_DIM, UPCAST)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    # Tiles wholly before the first real key (left padding; a short sequence in a packed batch's long view) add
    # nothing to the row sums: skipped, so the work follows the real keys, not the padded length.
    t_lo = tl.maximum(pid_s * tiles_per_program, key_lo // BLOCK)
    t_hi = (pid_s + 1) * tiles_per_program
    # Masks only where a tile needs one: before (left padding) and after (causal, the end) the wholly visible run.
    free_lo, free_hi = _visible_tiles(t_lo, t_hi, n, r, key_lo, query_lo, BLOCK)
    for t in range(t_lo, free_lo):
        m_i, l_i = _online_row_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos,
                                    qk_scale, k_base, m_i, l_i, BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, True, K_ROWS)
    for t in range(free_lo, free_hi):
        m_i, l_i = _online_row_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos,
                                    qk_scale, k_base, m_i, l_i, BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, False, K_ROWS)
    for t in range(free_hi, t_hi):
        m_i, l_i = _online_row_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos,
                                    qk_scale, k_base, m_i, l_i, BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, True, K_ROWS)
    out = (pid_bh * num_splits + pid_s) * BLOCK + offs_r
    tl.store(PartMax + out, m_i)
    tl.store(PartSum + out, l_i)


@triton.jit
def _combine_partials(PartMax, PartSum, pid_bh, num_splits, BLOCK: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """Row log-sum-exps (log2 units) of head pid_bh from its [num_splits, BLOCK] partial (max, sum)s;
    +inf for rows with no key, so that their probabilities exp2(-inf - lse) are 0, not NaN."""
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_r = tl.arange(0, BLOCK)
    base = pid_bh * num_splits * BLOCK + offs_r[None, :]
    top = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        rows = s0 + offs_s
        part_max = tl.load(PartMax + base + rows[:, None] * BLOCK, mask=(rows < num_splits)[:, None], other=float("-inf"))
        top = tl.maximum(top, tl.max(part_max, 0))
    top_sub = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        rows = s0 + offs_s
        ptrs = base + rows[:, None] * BLOCK
        valid = (rows < num_splits)[:, None]
        part_max = tl.load(PartMax + ptrs, mask=valid, other=float("-inf"))  # [SC, BR]
        part_sum = tl.load(PartSum + ptrs, mask=valid, other=0.0)
        total += tl.sum(part_sum * tl.math.exp2(part_max - top_sub[None, :]), 0)
    has_key = total > 0
    return tl.where(has_key, tl.math.log2(tl.where(has_key, total, 1.0)) + top_sub, float("inf"))


@triton.jit
def _tile_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos, qk_scale, k_base,
               lse2, row_scale, Vertical, Diagonal, scratch, skew, rotate, wraps, pid_bh, num_tiles,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
               PACKED_K: tl.constexpr, ROW_CHUNK: tl.constexpr, DIAGONAL_BY_GATHER: tl.constexpr,
               MASKED: tl.constexpr, K_ROWS: tl.constexpr):
    """Key tile t of the scores kernel: its probabilities' column sums and partial diagonal sums, stored."""
    WIDTH: tl.constexpr = 2 * BLOCK
    offs_n = tl.arange(0, BLOCK)
    offs_w = tl.arange(0, WIDTH)
    qk = _tile_scores(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t * BLOCK, n, key_lo,
                      pos, qk_scale, k_base, BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, MASKED, K_ROWS)
    p = tl.math.exp2(qk - lse2[:, None]) * row_scale  # [BR, BN]
    tl.store(Vertical + pid_bh * n + t * BLOCK + offs_n, tl.sum(p, 0), mask=t * BLOCK + offs_n < n)
    out = Diagonal + (pid_bh * num_tiles + t) * WIDTH
    if DIAGONAL_BY_GATHER:
        rotated = tl.gather(p, rotate, 1)  # [BR, BN]
        # Layout: [0, BLOCK) the diagonals c - BLOCK (column 0 holds none: 0), [BLOCK, 2 BLOCK) the diagonals c.
        tl.store(out + offs_n, tl.sum(tl.where(wraps, rotated, 0.0), 0))
        tl.store(out + BLOCK + offs_n, tl.sum(tl.where(wraps, 0.0, rotated), 0))
    else:
        tl.store(scratch + skew, p)
        tl.debug_barrier()
        diag = tl.zeros([WIDTH], dtype=tl.float32)
        for c in tl.static_range(0, BLOCK, ROW_CHUNK):
            rows = c + tl.arange(0, ROW_CHUNK)
            # Row i holds columns BLOCK-1-i .. 2*BLOCK-2-i; the rest is never written (uninitialised).
            shift = offs_w[None, :] + rows[:, None]
            written = (shift >= BLOCK - 1) & (shift < WIDTH - 1)
            diag += tl.sum(tl.load(scratch + rows[:, None] * WIDTH + offs_w[None, :], mask=written, other=0.0), 0)
        tl.debug_barrier()
        # Layout: column c holds the diagonal c - (BLOCK - 1).
        tl.store(out + offs_w, diag)


@triton.jit
def _representative_scores_kernel(
    Q, K, KeyStart, QueryStart, KeyBase, Skip, PartMax, PartSum, Vertical, Diagonal, Scratch,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    num_heads, num_kv_groups, q_len, n, r, num_tiles, tiles_per_program, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_KEY_START: tl.constexpr,
    HAS_QUERY_START: tl.constexpr, UPCAST: tl.constexpr, PACKED_K: tl.constexpr, ROW_CHUNK: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, DIAGONAL_BY_GATHER: tl.constexpr, HAS_SKIP: tl.constexpr, K_ROWS: tl.constexpr,
):
    WIDTH: tl.constexpr = 2 * BLOCK
    # torch.compile may hand float scalars over as fp64; keep the softmax state in fp32.
    qk_scale = tl.full([], qk_scale, tl.float32)
    pid_bh, off_b, off_h, off_kvh, key_lo, query_lo = _program_head(
        KeyStart, QueryStart, Skip, num_heads, num_kv_groups, n, HAS_KEY_START, HAS_QUERY_START, HAS_SKIP
    )
    k_base = tl.zeros([], dtype=tl.int64)
    if PACKED_K:
        k_base = tl.load(KeyBase + off_b).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    q, pos = _load_rep_queries(Q, off_b, off_h, stride_qb, stride_qm, stride_qh, stride_qd, q_len, n, r, query_lo,
                               BLOCK, BLOCK_D, HEAD_DIM, UPCAST)
    lse2 = _combine_partials(PartMax, PartSum, pid_bh, num_splits, BLOCK, SPLIT_CHUNK)  # [BR]
    # 1 / (number of real representative rows, at least 1), correctly rounded (IEEE division, like torch on CPU).
    real_rows = tl.maximum(n - tl.maximum(query_lo, n - r), 1)
    row_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), real_rows.to(tl.float32))
    offs_w = tl.arange(0, WIDTH)
    if DIAGONAL_BY_GATHER:
        # Row i rotated left by i: column c then holds key c + i (diagonal c) where c + i < BLOCK, else key
        # c + i - BLOCK (diagonal c - BLOCK). The rotation runs in on-chip memory, never through global scratch.
        rotate = (offs_n[None, :] + offs_r[:, None]) % BLOCK  # [BR, BN]
        wraps = offs_n[None, :] + offs_r[:, None] >= BLOCK
        scratch, skew = Scratch, 0  # unused
    else:
        scratch = Scratch + (pid_bh * tl.num_programs(1) + pid_s) * (BLOCK * WIDTH)
        # Element (i, j) of a tile lies on diagonal column j - i + BLOCK - 1 of the skewed scratch.
        skew = offs_r[:, None] * WIDTH + offs_n[None, :] - offs_r[:, None] + BLOCK - 1
        rotate, wraps = 0, 0  # unused
    t_end = tl.minimum((pid_s + 1) * tiles_per_program, num_tiles)
    # Tiles wholly before the first real key: every probability there is 0 (as the masked scores give), stored
    # without computing them.
    t_real = tl.minimum(tl.maximum(pid_s * tiles_per_program, key_lo // BLOCK), t_end)
    for t in range(pid_s * tiles_per_program, t_real):
        tl.store(Vertical + pid_bh * n + t * BLOCK + offs_n, tl.zeros([BLOCK], dtype=tl.float32),
                 mask=t * BLOCK + offs_n < n)
        tl.store(Diagonal + (pid_bh * num_tiles + t) * WIDTH + offs_w, tl.zeros([WIDTH], dtype=tl.float32))
    # Masks only where a tile needs one: before (left padding) and after (causal, the end) the wholly visible run.
    free_lo, free_hi = _visible_tiles(t_real, t_end, n, r, key_lo, query_lo, BLOCK)
    for t in range(t_real, free_lo):
        _tile_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos, qk_scale,
                   k_base, lse2, row_scale, Vertical, Diagonal, scratch, skew, rotate, wraps, pid_bh, num_tiles,
                   BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, ROW_CHUNK, DIAGONAL_BY_GATHER, True, K_ROWS)
    for t in range(free_lo, free_hi):
        _tile_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos, qk_scale,
                   k_base, lse2, row_scale, Vertical, Diagonal, scratch, skew, rotate, wraps, pid_bh, num_tiles,
                   BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, ROW_CHUNK, DIAGONAL_BY_GATHER, False, K_ROWS)
    for t in range(free_hi, t_end):
        _tile_sums(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n, key_lo, pos, qk_scale,
                   k_base, lse2, row_scale, Vertical, Diagonal, scratch, skew, rotate, wraps, pid_bh, num_tiles,
                   BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K, ROW_CHUNK, DIAGONAL_BY_GATHER, True, K_ROWS)


@triton.jit
def _slash_scores_kernel(Diagonal, Slash, n, r, num_tiles, BLOCK: tl.constexpr, BLOCK_O: tl.constexpr,
                         DIAGONAL_BY_GATHER: tl.constexpr):
    """Slash score of offsets o: each offset meets two tiles' partial diagonal sums (tile t's diagonals
    d >= 0 and tile t + 1's d < 0, as laid out by the scores kernel)."""
    WIDTH: tl.constexpr = 2 * BLOCK
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    in_range = offs_o < n
    diagonal = Diagonal + pid_bh * num_tiles * WIDTH
    if DIAGONAL_BY_GATHER:
        # Query row i, key t*BLOCK + c: offset o = n - r - t*BLOCK - (c - i), so v = n - r - o + BLOCK >= 0 gives
        # tile v // BLOCK - 1 at diagonal v % BLOCK and tile v // BLOCK at diagonal v % BLOCK - BLOCK (column 0: none).
        v = n - r + BLOCK - offs_o
        t = v // BLOCK
        c = v % BLOCK
        first = tl.load(diagonal + (t - 1) * WIDTH + BLOCK + c, mask=in_range & (t >= 1) & (t - 1 < num_tiles), other=0.0)
        second = tl.load(diagonal + t * WIDTH + c, mask=in_range & (t < num_tiles) & (c >= 1), other=0.0)
    else:
        # Column u = t*BLOCK + c of the partial sums holds offset o = (n - r) + BLOCK - 1 - u.
        u = n - r + BLOCK - 1 - offs_o
        t = u // BLOCK
        c = u % BLOCK
        first = tl.load(diagonal + t * WIDTH + c, mask=in_range & (t < num_tiles), other=0.0)
        second = tl.load(diagonal + (t - 1) * WIDTH + BLOCK + c, mask=in_range & (t >= 1), other=0.0)
    tl.store(Slash + pid_bh * n + offs_o, first + second, mask=in_range)


def _use_shared_skew(q: torch.Tensor, k: torch.Tensor, block: int, shared_skew: Optional[bool]) -> bool:
    """Whether this call runs the Gluon scores kernel (``representative_scores_triton``'s shared_skew)."""
    if shared_skew is False or (shared_skew is None and not _SHARED_SKEW) or interpreting():
        if shared_skew:
            raise ValueError("shared_skew=True needs a GPU; the Triton interpreter cannot run Gluon kernels")
        return False
    from . import scores_gluon

    ok = scores_gluon.supported(q, k, block)
    if shared_skew and not ok:
        raise ValueError(f"shared_skew=True is not supported here: {scores_gluon.unsupported_reason(q, k, block)}")
    return ok


def representative_scores_triton(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, softmax_scale: float, key_start, splits: Optional[int] = None,
    *, query_start: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    diagonal_by_gather: Optional[bool] = None, skip: Optional[torch.Tensor] = None,
    shared_skew: Optional[bool] = None,
) -> torch.Tensor:
    """Vertical and slash scores of the representative queries, fp32 [2, B, Hq, n] (a_v, a_s).

    q [B, q_len, Hq, D], k [B, n, Hkv, D] in fp16/bf16, any strides; key_start optional int [B]; query_start
    optional int [B], key position of each sequence's first real query (``scores.representative_scores``).
    cu_seqlens_k: optional int32 [B + 1]; then k is packed, [total_k, Hkv, D], sequence b's keys in rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` laid at positions ``key_start[b]..n-1`` of the view (``ops/varlen.py``;
    key_start required, n = grid.k_len): the keys are read in place, never padded.
    Same function as ``scores.representative_scores`` (up to fp32 rounding).
    splits: programs per head (each takes a range of key tiles); default: enough to fill the GPU, 1
    when interpreting.
    diagonal_by_gather: how the Triton kernel sums the tiles' diagonals (module docstring); default
    ``_DIAGONAL_BY_GATHER``.
    shared_skew: run the Gluon scores kernel (``scores_gluon.py``, same outputs, the diagonals skewed through
    shared memory) instead of the Triton one: None where ``scores_gluon.supported`` and ``_SHARED_SKEW``; True
    requires it (ValueError where unsupported); False never.
    skip: optional bool [B], sequences whose scores nobody reads (they run dense): their rows are 0, computed
    from no key (the work of a selection then follows the sequences that need one).
    """
    batch, q_len, q_heads, head_dim = q.shape
    n, kv_heads = grid.k_len, k.shape[-2]
    packed = cu_seqlens_k is not None
    if packed:
        assert key_start is not None and k.dim() == 3, "packed keys need key_start and k [total_k, Hkv, D]"
    r = grid.num_representative
    block = grid.block_size
    num_tiles = cdiv(n, block)
    use_shared = _use_shared_skew(q, k, block, shared_skew)  # before any launch: a refusal leaves nothing half done
    interpret = interpreting()
    # Enough programs to fill the GPU: split each head's key tiles into ranges.
    if splits is None:
        splits = 1 if interpret else cdiv(1024, batch * q_heads)
    splits = max(1, min(num_tiles, splits))
    per_program = cdiv(num_tiles, splits)
    splits = cdiv(num_tiles, per_program)
    device = q.device
    has_key_start = key_start is not None
    # Without left padding the kernels never read KeyStart: any pointer will do.
    starts = key_start.to(device, torch.long) if has_key_start else q
    query_starts = query_start.to(device, torch.long) if query_start is not None else starts
    # Packed keys: row of position t of sequence b is k_base[b] + t.
    k_base = cu_seqlens_k[:-1].long() - starts if packed else starts
    skips = starts if skip is None else skip.to(device)  # without skip the kernels never read it
    meta = dict(
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), BLOCK=block,
        HAS_KEY_START=has_key_start, HAS_QUERY_START=query_start is not None,
        UPCAST=interpret and q.dtype == torch.bfloat16, PACKED_K=packed, HAS_SKIP=skip is not None,
        K_ROWS=_K_ROWS, num_warps=8 if block == 128 else 4,
    )
    qk_scale = softmax_scale * LOG2E
    k_strides = (0, *k.stride()) if packed else k.stride()  # packed: one row of keys shared by every sequence
    common = (*q.stride(), *k_strides, q_heads, q_heads // kv_heads, q_len, n, r)

    # Launch on q's device, not the current one (a model on cuda:1 while cuda:0 is current).
    with launch_device(q):
        part_max = torch.empty(batch * q_heads, splits, block, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
        _representative_lse_kernel[(batch * q_heads, splits)](
            q, k, starts, query_starts, k_base, skips, part_max, part_sum, *common, per_program, splits, qk_scale,
            **meta,
        )

        scores = torch.empty(2, batch, q_heads, n, dtype=torch.float32, device=device)
        diagonal = torch.empty(batch * q_heads, num_tiles, 2 * block, dtype=torch.float32, device=device)
        split_chunk = min(_SPLIT_CHUNK, max(2, next_power_of_2(splits)))
        if use_shared:
            from . import scores_gluon

            scores_gluon.launch_scores(q, k, starts, query_starts, k_base, skips, part_max, part_sum, scores[0],
                                       diagonal, common, num_tiles, per_program, splits, qk_scale, meta, split_chunk)
            # Same diagonal layout as the gather way's.
            _slash_scores_kernel[(batch * q_heads, cdiv(n, 1024))](
                diagonal, scores[1], n, r, num_tiles, BLOCK=block, BLOCK_O=1024, DIAGONAL_BY_GATHER=True, num_warps=4,
            )
            return scores
        by_gather = _DIAGONAL_BY_GATHER if diagonal_by_gather is None else diagonal_by_gather
        # The kernel reads back only the scratch entries it wrote (none by gather: any pointer will do).
        scratch = diagonal if by_gather else torch.empty(batch * q_heads * splits * block * 2 * block,
                                                         dtype=torch.float32, device=device)
        _representative_scores_kernel[(batch * q_heads, splits)](
            q, k, starts, query_starts, k_base, skips, part_max, part_sum, scores[0], diagonal, scratch, *common,
            num_tiles, per_program, splits, qk_scale, ROW_CHUNK=min(block, 32),
            SPLIT_CHUNK=split_chunk, DIAGONAL_BY_GATHER=by_gather,
            **meta,
        )
        block_o = 1024
        _slash_scores_kernel[(batch * q_heads, cdiv(n, block_o))](
            diagonal, scores[1], n, r, num_tiles, BLOCK=block, BLOCK_O=block_o, DIAGONAL_BY_GATHER=by_gather,
            num_warps=4,
        )
    return scores
