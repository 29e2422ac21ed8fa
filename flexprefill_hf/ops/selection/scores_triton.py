"""Triton kernels for the selection's heaviest stage: the representative block's scores (ops/README.md §1, §3).

The representative queries (the last r <= B rows) attend to all n keys. Selection needs only the
column sums (vertical scores a_v) and the diagonal sums (slash scores a_s) of those r x n
probabilities, so two passes over the keys reduce them on the fly and no r x n tensor is stored:

1. ``_representative_lse_kernel``: each program runs an online softmax over a range of key tiles
   and writes a partial (max, sum) per row.
2. ``_representative_scores_kernel``: combines its head's partials into each row's log-sum-exp,
   recomputes the probabilities tile by tile, writes the column sums of each tile, and the tile's
   diagonal sums (deterministic, no atomics), by one of three ways (``DIAGONALS``):
   - "gather": the diagonals become columns by rotating row i of the tile left by i (``tl.gather``, on
     chip); a column then holds one diagonal above the wrap and another below it, summed apart
     (2*BLOCK partial sums per tile);
   - "scratch": the older way, a scatter of the tile into a skewed per-program scratch in global memory
     and a reload (2*BLOCK);
   - "onehot": two small matrix products with 0/1 matrices, no data movement the compiler does not plan:
     the tile as GxG sub-blocks of SxS (S = 16, G = BLOCK/S); the first product sums each sub-block's
     2S-1 diagonals (contraction over its S*S entries), the second sums the sub-blocks that share a
     block-diagonal. A tile diagonal d = S*D + e (|e| < S) is then the sum of two entries (D, e) and
     (D+1, e-S) of a [16, 2S] table per tile (fp32 products, ``input_precision="ieee"``: no tf32).
3. ``_slash_scores_kernel``: adds each tile's partial diagonal sums to its neighbour's and writes
   them by offset.

Three launches and no other device work: the selection's fixed cost on CUDA is mostly launches.

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
# How the scores kernel sums a tile's diagonals (module docstring): "gather" (rotating each row with
# ``tl.gather``, on chip), "scratch" (a skewed per-program scratch in global memory: a 128 x 256 fp32 store and
# reload per tile) or "onehot" (two 0/1 matrix products).
DIAGONALS = "gather"
DIAGONAL_METHODS = ("gather", "scratch", "onehot")
# "onehot": sub-block side, and rows of its per-tile table (block-diagonals D + G - 1 in [0, 2G - 1), padded to
# the 16 rows a dot needs).
_SUB = 16
_TABLE_ROWS = 16


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
                 UPCAST: tl.constexpr, PACKED_K: tl.constexpr):
    """Scaled scores (log2 units) of the representative rows against keys n_start.. (masked to -inf).
    PACKED_K: key position t of the view is row k_base + t of the packed K, and positions before key_lo
    (another sequence's rows, or before the tensor) are never read."""
    offs_n = n_start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = (K + off_b * stride_kb + off_kvh * stride_kh + offs_d[:, None] * stride_kd
            + (k_base + offs_n[None, :]) * stride_kn)
    load_n = offs_n < n
    if PACKED_K:
        load_n = load_n & (offs_n >= key_lo)
    kt = tl.load(ptrs, mask=load_n[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)  # [BD, BN]
    if UPCAST:
        kt = kt.to(tl.float32)
    qk = tl.dot(q, kt) * qk_scale  # [BR, BN]
    visible = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] >= key_lo) & (offs_n[None, :] < n)
    return tl.where(visible, qk, float("-inf"))


@triton.jit
def _representative_lse_kernel(
    Q, K, KeyStart, QueryStart, KeyBase, Skip, PartMax, PartSum,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    num_heads, num_kv_groups, q_len, n, r, tiles_per_program, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_KEY_START: tl.constexpr,
    HAS_QUERY_START: tl.constexpr, UPCAST: tl.constexpr, PACKED_K: tl.constexpr, HAS_SKIP: tl.constexpr,
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
    for t in range(tl.maximum(pid_s * tiles_per_program, key_lo // BLOCK), (pid_s + 1) * tiles_per_program):
        qk = _tile_scores(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t * BLOCK, n, key_lo,
                          pos, qk_scale, k_base, BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(qk - m_sub[:, None]), 1)
        m_i = m_new
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
def _onehot_matrices(BLOCK: tl.constexpr, SUB: tl.constexpr, TABLE_ROWS: tl.constexpr):
    """The two 0/1 matrices of the "onehot" diagonal sums, fp32: [SUB*SUB, 2*SUB] maps entry (u, w) of a
    sub-block to its diagonal w - u + SUB - 1; [TABLE_ROWS, G*G] maps sub-block (a, b) to its block-diagonal
    b - a + G - 1 (G = BLOCK // SUB; rows past 2G - 2 stay 0)."""
    G: tl.constexpr = BLOCK // SUB
    entry = tl.arange(0, SUB * SUB)
    diag = tl.arange(0, 2 * SUB)
    within = ((entry % SUB) - (entry // SUB) + SUB - 1)[:, None] == diag[None, :]
    pair = tl.arange(0, G * G)
    row = tl.arange(0, TABLE_ROWS)
    across = row[:, None] == ((pair % G) - (pair // G) + G - 1)[None, :]
    return within.to(tl.float32), across.to(tl.float32)


@triton.jit
def _onehot_diagonal_table(p, within, across, BLOCK: tl.constexpr, SUB: tl.constexpr):
    """[TABLE_ROWS, 2*SUB] table of a tile's diagonal sums: entry (D + G - 1, e + SUB - 1) sums the elements
    (a*SUB + u, b*SUB + w) of p [BLOCK, BLOCK] with b - a = D and w - u = e."""
    G: tl.constexpr = BLOCK // SUB
    blocks = tl.reshape(tl.permute(tl.reshape(p, [G, SUB, G, SUB]), (0, 2, 1, 3)), [G * G, SUB * SUB])
    per_block = tl.dot(blocks, within, input_precision="ieee")  # [G*G, 2*SUB]: each sub-block's diagonals
    return tl.dot(across, per_block, input_precision="ieee")  # [TABLE_ROWS, 2*SUB]


@triton.jit
def _onehot_diagonal_sum(table, d, valid, SUB: tl.constexpr, TABLE_ROWS: tl.constexpr, G: tl.constexpr):
    """Tile diagonal d (|d| < BLOCK, int64 vector) from the table at pointer ``table``: d = SUB*D + e with
    0 <= e < SUB gives entries (D, e) and, for e >= 1, (D + 1, e - SUB)."""
    big = (d + G * SUB) // SUB - G  # floor(d / SUB): the dividend made positive first
    e = d - big * SUB
    row = big + G - 1
    first = tl.load(table + row * (2 * SUB) + e + SUB - 1, mask=valid & (row >= 0) & (row < TABLE_ROWS), other=0.0)
    second = tl.load(table + (row + 1) * (2 * SUB) + e - 1,
                     mask=valid & (e >= 1) & (row + 1 >= 0) & (row + 1 < TABLE_ROWS), other=0.0)
    return first + second


@triton.jit
def _representative_scores_kernel(
    Q, K, KeyStart, QueryStart, KeyBase, Skip, PartMax, PartSum, Vertical, Diagonal, Scratch,
    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
    num_heads, num_kv_groups, q_len, n, r, num_tiles, tiles_per_program, num_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_KEY_START: tl.constexpr,
    HAS_QUERY_START: tl.constexpr, UPCAST: tl.constexpr, PACKED_K: tl.constexpr, ROW_CHUNK: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr, DIAGONALS: tl.constexpr, HAS_SKIP: tl.constexpr, WIDTH: tl.constexpr,
    SUB: tl.constexpr, TABLE_ROWS: tl.constexpr,
):
    # WIDTH: floats of partial diagonal sums per tile (2*BLOCK; "onehot": its TABLE_ROWS x 2*SUB table).
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
    if DIAGONALS == "gather":
        # Row i rotated left by i: column c then holds key c + i (diagonal c) where c + i < BLOCK, else key
        # c + i - BLOCK (diagonal c - BLOCK). The rotation runs in on-chip memory, never through global scratch.
        rotate = (offs_n[None, :] + offs_r[:, None]) % BLOCK  # [BR, BN]
        wraps = offs_n[None, :] + offs_r[:, None] >= BLOCK
    elif DIAGONALS == "scratch":
        scratch = Scratch + (pid_bh * tl.num_programs(1) + pid_s) * (BLOCK * WIDTH)
        # Element (i, j) of a tile lies on diagonal column j - i + BLOCK - 1 of the skewed scratch.
        skew = offs_r[:, None] * WIDTH + offs_n[None, :] - offs_r[:, None] + BLOCK - 1
    else:
        within, across = _onehot_matrices(BLOCK, SUB, TABLE_ROWS)
        table_rows = tl.arange(0, TABLE_ROWS)
        table_cols = tl.arange(0, 2 * SUB)
    t_end = tl.minimum((pid_s + 1) * tiles_per_program, num_tiles)
    # Tiles wholly before the first real key: every probability there is 0 (as the masked scores give), stored
    # without computing them.
    t_real = tl.minimum(tl.maximum(pid_s * tiles_per_program, key_lo // BLOCK), t_end)
    for t in range(pid_s * tiles_per_program, t_real):
        tl.store(Vertical + pid_bh * n + t * BLOCK + offs_n, tl.zeros([BLOCK], dtype=tl.float32),
                 mask=t * BLOCK + offs_n < n)
        tl.store(Diagonal + (pid_bh * num_tiles + t) * WIDTH + offs_w, tl.zeros([WIDTH], dtype=tl.float32))
    for t in range(t_real, t_end):
        qk = _tile_scores(q, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t * BLOCK, n, key_lo,
                          pos, qk_scale, k_base, BLOCK, BLOCK_D, HEAD_DIM, UPCAST, PACKED_K)
        p = tl.math.exp2(qk - lse2[:, None]) * row_scale  # [BR, BN]
        tl.store(Vertical + pid_bh * n + t * BLOCK + offs_n, tl.sum(p, 0), mask=t * BLOCK + offs_n < n)
        out = Diagonal + (pid_bh * num_tiles + t) * WIDTH
        if DIAGONALS == "gather":
            rotated = tl.gather(p, rotate, 1)  # [BR, BN]
            # Layout: [0, BLOCK) the diagonals c - BLOCK (column 0 holds none: 0), [BLOCK, 2 BLOCK) the diagonals c.
            tl.store(out + offs_n, tl.sum(tl.where(wraps, rotated, 0.0), 0))
            tl.store(out + BLOCK + offs_n, tl.sum(tl.where(wraps, 0.0, rotated), 0))
        elif DIAGONALS == "scratch":
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
        else:
            table = _onehot_diagonal_table(p, within, across, BLOCK, SUB)
            tl.store(out + table_rows[:, None] * (2 * SUB) + table_cols[None, :], table)


@triton.jit
def _slash_scores_kernel(Diagonal, Slash, n, r, num_tiles, BLOCK: tl.constexpr, BLOCK_O: tl.constexpr,
                         DIAGONALS: tl.constexpr, WIDTH: tl.constexpr, SUB: tl.constexpr, TABLE_ROWS: tl.constexpr):
    """Slash score of offsets o: each offset meets two tiles' partial diagonal sums (tile t's diagonals
    d >= 0 and tile t + 1's d < 0, as laid out by the scores kernel)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    in_range = offs_o < n
    diagonal = Diagonal + pid_bh * num_tiles * WIDTH
    if DIAGONALS == "scratch":
        # Column u = t*BLOCK + c of the partial sums holds offset o = (n - r) + BLOCK - 1 - u.
        u = n - r + BLOCK - 1 - offs_o
        t = u // BLOCK
        c = u % BLOCK
        first = tl.load(diagonal + t * WIDTH + c, mask=in_range & (t < num_tiles), other=0.0)
        second = tl.load(diagonal + (t - 1) * WIDTH + BLOCK + c, mask=in_range & (t >= 1), other=0.0)
    else:
        # Query row i, key t*BLOCK + c: offset o = n - r - t*BLOCK - (c - i), so v = n - r - o + BLOCK >= 0 gives
        # tile v // BLOCK - 1 at diagonal v % BLOCK and tile v // BLOCK at diagonal v % BLOCK - BLOCK (none at 0).
        v = n - r + BLOCK - offs_o
        t = v // BLOCK
        c = v % BLOCK
        first_valid = in_range & (t >= 1) & (t - 1 < num_tiles)
        second_valid = in_range & (t < num_tiles) & (c >= 1)
        if DIAGONALS == "gather":
            first = tl.load(diagonal + (t - 1) * WIDTH + BLOCK + c, mask=first_valid, other=0.0)
            second = tl.load(diagonal + t * WIDTH + c, mask=second_valid, other=0.0)
        else:
            G: tl.constexpr = BLOCK // SUB
            first = _onehot_diagonal_sum(diagonal + (t - 1) * WIDTH, c, first_valid, SUB, TABLE_ROWS, G)
            second = _onehot_diagonal_sum(diagonal + t * WIDTH, c - BLOCK, second_valid, SUB, TABLE_ROWS, G)
    tl.store(Slash + pid_bh * n + offs_o, first + second, mask=in_range)


def representative_scores_triton(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, softmax_scale: float, key_start, splits: Optional[int] = None,
    *, query_start: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    diagonals: Optional[str] = None, skip: Optional[torch.Tensor] = None,
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
    diagonals: how the tiles' diagonals are summed, one of ``DIAGONAL_METHODS`` (module docstring); default
    ``DIAGONALS``.
    skip: optional bool [B], sequences whose scores nobody reads (they run dense): their rows are 0, computed
    from no key (the work of a selection then follows the sequences that need one).
    """
    batch, q_len, q_heads, head_dim = q.shape
    n, kv_heads = grid.k_len, k.shape[-2]
    packed = cu_seqlens_k is not None
    if packed:
        assert key_start is not None and k.dim() == 3, "packed keys need key_start and k [total_k, Hkv, D]"
    method = DIAGONALS if diagonals is None else diagonals
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"diagonals={method!r} is not supported; expected one of {DIAGONAL_METHODS} or None")
    r = grid.num_representative
    block = grid.block_size
    num_tiles = cdiv(n, block)
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
        num_warps=8 if block == 128 else 4,
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
        width = _TABLE_ROWS * 2 * _SUB if method == "onehot" else 2 * block
        diagonal = torch.empty(batch * q_heads, num_tiles, width, dtype=torch.float32, device=device)
        # The kernel reads back only the scratch entries it wrote (the other methods use none: any pointer will do).
        scratch = diagonal if method != "scratch" else torch.empty(batch * q_heads * splits * block * 2 * block,
                                                                   dtype=torch.float32, device=device)
        diagonal_meta = dict(DIAGONALS=method, WIDTH=width, SUB=_SUB, TABLE_ROWS=_TABLE_ROWS)
        _representative_scores_kernel[(batch * q_heads, splits)](
            q, k, starts, query_starts, k_base, skips, part_max, part_sum, scores[0], diagonal, scratch, *common,
            num_tiles, per_program, splits, qk_scale, ROW_CHUNK=min(block, 32),
            SPLIT_CHUNK=min(_SPLIT_CHUNK, max(2, next_power_of_2(splits))), **diagonal_meta, **meta,
            # "onehot" at block 128, d 128: 3 stages of key tiles plus the products' fp32 operands took 233472 B of
            # shared memory on the H200 (limit 232448).
            **(dict(num_stages=2) if method == "onehot" else {}),
        )
        block_o = 1024
        _slash_scores_kernel[(batch * q_heads, cdiv(n, block_o))](
            diagonal, scores[1], n, r, num_tiles, BLOCK=block, BLOCK_O=block_o, **diagonal_meta, num_warps=4,
        )
    return scores
