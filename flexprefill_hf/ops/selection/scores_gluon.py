"""The representative scores pass (``scores_triton._representative_scores_kernel``) in Gluon, for Hopper (sm_90).

Same inputs, outputs and layout as the Triton kernel it replaces (column sums into ``Vertical``, each tile's
partial diagonal sums into ``Diagonal`` as 2*BLOCK columns); what differs is how a tile's diagonals are summed.
Triton's ``tl.gather`` rotates each row in registers (~280 shuffles and ~250 selects a thread for a 128 x 128
fp32 tile, ~1.2 of the pass's 2.0 ms at 128K on the H200). Here the rotation goes through shared memory, which
Gluon exposes and Triton does not:

* the representative rows are taken in reverse order (row i' = BLOCK-1-i), so that key j of row i' lies on
  diagonal m = i' + j (a slash line: the key's distance to the query, m - (BLOCK-1), is constant along it);
* the probabilities are stored through a transposed view of a padded layout, one pad element after each key
  column: element (i', j) at address j*(BLOCK+1) + i'. (Stored row-wise instead, triton 3.6 pairs a thread's
  two adjacent wgmma columns into one 8-byte store across the pads, misaligned on odd rows.)
* the same memory is read back as a plain row-major tile of BLOCK + 1 rows. Address j*(BLOCK+1) + i' is row j
  (+1 where i' + j >= BLOCK), column (i' + j) mod BLOCK: each column holds diagonal c (rows r <= c) and
  diagonal c + BLOCK (rows r > c + 1; the pad element sits at row c + 1, masked), so sums over rows give all
  2*BLOCK - 1 diagonal sums for one shared-memory store and one load an element.

The buffer is fp32 [2*BLOCK, BLOCK] (allocations are powers of two; the skew uses BLOCK + 1 rows of it), and Q's
wgmma operand lives in its top quarter (``Q_IN_SMEM``).

Gluon kernels run only on the GPU (no interpreter): the Triton kernel stays the oracle-tested path on CPU and the
fallback everywhere this one is not supported (``supported``). Tested against the Triton and PyTorch versions in
``tests/test_selection_kernels.py`` (GPU only).
"""

from __future__ import annotations

import functools

import torch
import triton

_BLOCK = 128
_NUM_WARPS = 8
_HEAD_DIMS = (64, 128)
# The skewed tile read back with 16 rows a thread (its sums over rows stay in the warp); False: one row a warp.
ROWS_IN_THREAD = True
# Q's wgmma operand in shared memory (the skew buffer's unused top quarter) instead of 32 registers a thread.
Q_IN_SMEM = True


try:  # Gluon ships with triton >= 3.5; this module is imported on the CUDA path only.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    # Gluon's API as of triton 3.6 (the version tested on the H200). Later versions renamed what this kernel uses
    # (``_reinterpret``, ``thread_barrier``, ``async_copy_global_to_shared``: triton 3.9 has none of the three);
    # there the Triton kernel runs.
    _HAVE_GLUON = (hasattr(gl, "PaddedSharedLayout") and hasattr(gl, "thread_barrier")
                   and hasattr(gl.shared_memory_descriptor, "_reinterpret") and not hasattr(async_copy, "async_load"))
except ImportError:
    _HAVE_GLUON = False


@functools.lru_cache(maxsize=None)
def _capability(device_index: int):
    return torch.cuda.get_device_capability(device_index)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, block: int):
    """None where the Gluon scores kernel runs this case, else why not. It needs CUDA sm_90 (Hopper: its wgmma),
    fp16/bf16, block 128, head dim 64 or 128, contiguous head dims with 16-byte aligned rows (its key tiles are
    copied 16 bytes a thread), and a triton whose Gluon has padded shared layouts. The Triton kernel runs the rest."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype):
        return f"needs fp16/bf16 CUDA tensors (q {q.dtype} on {q.device.type}, k {k.dtype})"
    if block != _BLOCK or q.shape[-1] not in _HEAD_DIMS:
        return f"needs block {_BLOCK} and head dim in {_HEAD_DIMS} (block {block}, head dim {q.shape[-1]})"
    major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if major != 9:
        return f"needs a Hopper GPU (sm_90); this one is sm_{major}{minor}"
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1 or any(s % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return f"needs {name} with a contiguous, 16-byte aligned head dim (strides {tuple(t.stride())})"
    if _kernel() is None:
        return f"this triton ({triton.__version__}) lacks the Gluon API the kernel was written for (triton 3.6)"
    return None


def supported(q: torch.Tensor, k: torch.Tensor, block: int) -> bool:
    """Whether the Gluon scores kernel runs this case (``unsupported_reason`` is None)."""
    return unsupported_reason(q, k, block) is None


def _kernel():
    """The Gluon scores kernel, or None where this triton has no Gluon with padded shared layouts."""
    return _scores_kernel if _HAVE_GLUON else None


if _HAVE_GLUON:

    @gluon.jit
    def _combine_partials(PartMax, PartSum, pid_bh, num_splits, BLOCK: gl.constexpr, SPLIT_CHUNK: gl.constexpr,
                          layout: gl.constexpr):
        """Row log-sum-exps (log2 units, +inf for rows with no key) from the LSE pass's partials, [BLOCK] in
        gl.SliceLayout(0, layout), rows in reverse order (entry i' is row BLOCK-1-i')."""
        offs_s = gl.arange(0, SPLIT_CHUNK, layout=gl.SliceLayout(1, layout))
        offs_r = BLOCK - 1 - gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
        base = pid_bh * num_splits * BLOCK + offs_r[None, :]
        top = gl.full([BLOCK], float("-inf"), gl.float32, layout=gl.SliceLayout(0, layout))
        for s0 in range(0, num_splits, SPLIT_CHUNK):
            rows = s0 + offs_s
            part_max = gl.load(PartMax + base + rows[:, None] * BLOCK, mask=(rows < num_splits)[:, None],
                               other=float("-inf"))
            top = gl.maximum(top, gl.max(part_max, 0))
        top_sub = gl.where(top == float("-inf"), 0.0, top)
        total = gl.zeros([BLOCK], gl.float32, layout=gl.SliceLayout(0, layout))
        for s0 in range(0, num_splits, SPLIT_CHUNK):
            rows = s0 + offs_s
            ptrs = base + rows[:, None] * BLOCK
            valid = (rows < num_splits)[:, None]
            part_max = gl.load(PartMax + ptrs, mask=valid, other=float("-inf"))
            part_sum = gl.load(PartSum + ptrs, mask=valid, other=0.0)
            total += gl.sum(part_sum * gl.exp2(part_max - top_sub[None, :]), 0)
        has_key = total > 0
        return gl.where(has_key, gl.log2(gl.where(has_key, total, 1.0)) + top_sub, float("inf"))

    @gluon.jit
    def _issue_key_tile(buffer, K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd, t, n,
                        key_lo, k_base, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, PACKED_K: gl.constexpr,
                        layout: gl.constexpr):
        """Start the copy of key tile t ([BLOCK, HEAD_DIM], rows as K lies) into shared ``buffer``; keys past n
        (and, packed, before key_lo: another sequence's rows) are not read."""
        offs_n = t * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        load_n = offs_n < n
        if PACKED_K:
            load_n = load_n & (offs_n >= key_lo)
        ptrs = (K + off_b * stride_kb + off_kvh * stride_kh + (k_base + offs_n)[:, None] * stride_kn
                + offs_d[None, :] * stride_kd)
        mask = load_n[:, None] & (offs_d < HEAD_DIM)[None, :]
        async_copy.async_copy_global_to_shared(buffer, ptrs, mask=mask)
        async_copy.commit_group()

    @gluon.jit
    def _tile_sums(qk, t, n, key_lo, pos, lse_rows, row_scale, free_lo, free_hi, Vertical, Diagonal, pid_bh,
                   num_tiles, skew_store, skew_rows, skew_last, BLOCK: gl.constexpr, mma: gl.constexpr,
                   skew_layout: gl.constexpr, small_layout: gl.constexpr):
        """Key tile t's column sums and partial diagonal sums from its scaled scores qk [BLOCK, BLOCK] (rows
        reversed), stored in the Triton kernel's layout."""
        WIDTH: gl.constexpr = 2 * BLOCK
        offs_n = t * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, mma))
        if (t < free_lo) | (t >= free_hi):
            visible = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] >= key_lo) & (offs_n[None, :] < n)
            qk = gl.where(visible, qk, float("-inf"))
        p = gl.exp2(qk - lse_rows[:, None]) * row_scale
        gl.store(Vertical + pid_bh * n + offs_n, gl.sum(p, 0), mask=offs_n < n)
        skew_store.store(p)
        gl.thread_barrier()
        rows = skew_rows.load(skew_layout)
        last = gl.sum(skew_last.load(small_layout), 0)  # row BLOCK: key BLOCK-1's wrapped part
        gl.thread_barrier()
        # Plain row r, column c: diagonal c (c >= r) or diagonal c + BLOCK (c < r - 1); column r - 1 is a pad
        # element. Diagonal m = i' + j is key - query offset m - (BLOCK - 1): output column m + 1 of the Triton
        # kernel's layout (column 0: no diagonal, 0).
        offs_c = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, skew_layout))
        offs_r = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, skew_layout))
        diag_above = gl.sum(gl.where(offs_c[None, :] >= offs_r[:, None], rows, 0.0), 0)
        diag_below = gl.sum(gl.where(offs_c[None, :] < offs_r[:, None] - 1, rows, 0.0), 0)
        offs_last = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, small_layout))
        diag_below = gl.convert_layout(diag_below, gl.SliceLayout(0, small_layout))
        diag_below += gl.where(offs_last < BLOCK - 1, last, 0.0)
        out = Diagonal + (pid_bh * num_tiles + t) * WIDTH
        gl.store(out + 1 + offs_c, diag_above)
        # Column BLOCK - 1 of the lower half is always 0 (no such diagonal): it lands on output column 0.
        gl.store(out + (BLOCK + 1 + offs_last) % WIDTH, diag_below)

    @gluon.jit
    def _scores_kernel(
        Q, K, KeyStart, QueryStart, KeyBase, Skip, PartMax, PartSum, Vertical, Diagonal,
        stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
        num_heads, num_kv_groups, q_len, n, r, num_tiles, tiles_per_program, num_splits, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, HAS_KEY_START: gl.constexpr, HAS_QUERY_START: gl.constexpr,
        PACKED_K: gl.constexpr, HAS_SKIP: gl.constexpr, SPLIT_CHUNK: gl.constexpr,
        ROWS_IN_THREAD: gl.constexpr, Q_IN_SMEM: gl.constexpr,
    ):
        WIDTH: gl.constexpr = 2 * BLOCK
        NUM_WARPS: gl.constexpr = gl.num_warps()
        # Scores tile [rows, keys] as wgmma leaves it; Q as its register operand.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                      instr_shape=[16, BLOCK, 16])
        q_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        # Global loads: 16 bytes a thread along the head dim.
        THREADS_D: gl.constexpr = HEAD_DIM // 8
        rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // THREADS_D, THREADS_D], [NUM_WARPS, 1], [1, 0])
        key_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        # The skew (module docstring): a padded store view and a plain load view of one buffer.
        padded: gl.constexpr = gl.PaddedSharedLayout.with_identity_for([[BLOCK, 1]], [BLOCK, BLOCK], [1, 0])
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        if ROWS_IN_THREAD:
            # Each thread sums 16 rows of 4 columns, lanes the rest: the sums over rows stay in the warp.
            skew_layout: gl.constexpr = gl.BlockedLayout([BLOCK // 8, 4], [8, 4], [1, NUM_WARPS], [1, 0])
        else:
            skew_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NUM_WARPS, 1], [1, 0])
        small_layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, NUM_WARPS], [1, 0])

        qk_scale = qk_scale.to(gl.float32)
        pid_bh = gl.program_id(0).to(gl.int64)
        off_b = pid_bh // num_heads
        off_h = pid_bh % num_heads
        off_kvh = off_h // num_kv_groups
        key_lo = pid_bh * 0
        if HAS_KEY_START:
            key_lo = gl.load(KeyStart + off_b).to(gl.int64)
        query_lo = key_lo
        if HAS_QUERY_START:
            query_lo = gl.load(QueryStart + off_b).to(gl.int64)
        if HAS_SKIP:
            key_lo = gl.where(gl.load(Skip + off_b) != 0, n, key_lo)
        k_base = key_lo * 0
        if PACKED_K:
            k_base = gl.load(KeyBase + off_b).to(gl.int64)
        pid_s = gl.program_id(1).to(gl.int64)

        # Representative rows in reverse order: tile row i' is row BLOCK-1-i' of the block (0 past r).
        offs_qr = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, rows_layout))
        offs_qd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
        real_q = BLOCK - 1 - offs_qr
        q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + (q_len - r + real_q)[:, None] * stride_qm
                  + offs_qd[None, :] * stride_qd)
        q = gl.load(q_ptrs, mask=(real_q < r)[:, None] & (offs_qd < HEAD_DIM)[None, :], other=0.0)
        if not Q_IN_SMEM:
            q = gl.convert_layout(q, q_operand)

        offs_i = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, mma))  # tile row i'
        offs_j = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, mma))  # key column of the tile
        real_i = BLOCK - 1 - offs_i
        # Key position of each row (-1 past r and before the first real query: it sees no key).
        pos = gl.where((real_i < r) & (n - r + real_i >= query_lo), n - r + real_i, -1)
        lse2 = _combine_partials(PartMax, PartSum, pid_bh, num_splits, BLOCK, SPLIT_CHUNK, small_layout)
        lse_rows = gl.convert_layout(lse2, gl.SliceLayout(1, mma))
        real_rows = gl.maximum(n - gl.maximum(query_lo, n - r), 1)
        row_scale = gl.div_rn(gl.full([], 1.0, gl.float32), real_rows.to(gl.float32))

        offs_last = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, small_layout))
        keys = gl.allocate_shared_memory(K.dtype.element_ty, [2, BLOCK, HEAD_DIM], key_smem)
        skew = gl.allocate_shared_memory(gl.float32, [2 * BLOCK, BLOCK], plain)
        # Stored through the transpose (element (i', j) at j*(BLOCK+1) + i'): a thread's two adjacent columns of
        # the wgmma tile are then BLOCK+1 apart, stored one by one; stored directly, triton 3.6 pairs them into
        # 8-byte stores across the pads, misaligned on odd rows.
        skew_store = skew._reinterpret(gl.float32, [BLOCK, BLOCK], padded).permute((1, 0))
        skew_rows = skew.slice(0, BLOCK, 0)
        skew_last = skew.slice(BLOCK, 1, 0)
        if Q_IN_SMEM:
            # The skew reads rows [0, BLOCK] of its buffer: Q's wgmma operand lives in the unused top quarter.
            q_smem = skew.slice(BLOCK + BLOCK // 2, BLOCK // 2, 0)._reinterpret(Q.dtype.element_ty, [BLOCK, HEAD_DIM],
                                                                             key_smem)
            q_smem.store(q)
            q = q_smem

        t_first = pid_s * tiles_per_program
        t_end = gl.minimum((pid_s + 1) * tiles_per_program, num_tiles)
        # Tiles wholly before the first real key: every probability there is 0, stored without computing them.
        t_real = gl.minimum(gl.maximum(t_first, key_lo // BLOCK), t_end)
        zeros_v = gl.zeros([BLOCK], gl.float32, layout=gl.SliceLayout(0, small_layout))
        for t in range(t_first, t_real):
            gl.store(Vertical + pid_bh * n + t * BLOCK + offs_last, zeros_v, mask=t * BLOCK + offs_last < n)
            out = Diagonal + (pid_bh * num_tiles + t) * WIDTH
            gl.store(out + offs_last, zeros_v)
            gl.store(out + BLOCK + offs_last, zeros_v)
        # The wholly visible run needs no mask (as ``scores_triton._visible_tiles``).
        all_rows = (r == BLOCK) & (query_lo <= n - r)
        free_lo = gl.minimum(gl.maximum(t_real, (key_lo + BLOCK - 1) // BLOCK), t_end)
        free_hi = gl.where(all_rows, gl.maximum(gl.minimum(t_end, (n - r + 1) // BLOCK), free_lo), free_lo)

        if t_real < t_end:
            _issue_key_tile(keys.index(0), K, off_b, off_kvh, stride_kb, stride_kn, stride_kh, stride_kd,
                            t_real, n, key_lo, k_base, BLOCK, HEAD_DIM, PACKED_K, rows_layout)
        for t in range(t_real, t_end):
            stage = ((t - t_real) % 2).to(gl.int32)
            # Next tile into the other buffer (its last reader, the previous tile's wgmma, is done: the skew's
            # barriers order every warp past it).
            if t + 1 < t_end:
                _issue_key_tile(keys.index(1 - stage), K, off_b, off_kvh, stride_kb, stride_kn, stride_kh,
                                stride_kd, t + 1, n, key_lo, k_base, BLOCK, HEAD_DIM, PACKED_K, rows_layout)
                async_copy.wait_group(1)
            else:
                async_copy.wait_group(0)
            gl.thread_barrier()
            hopper.fence_async_shared()
            no_acc = gl.zeros([BLOCK, BLOCK], gl.float32, layout=mma)
            qk = hopper.warpgroup_mma(q, keys.index(stage).permute((1, 0)), no_acc, use_acc=False)
            _tile_sums(qk * qk_scale, t, n, key_lo, pos, lse_rows, row_scale, free_lo, free_hi, Vertical, Diagonal,
                       pid_bh, num_tiles, skew_store, skew_rows, skew_last, BLOCK, mma, skew_layout, small_layout)



def launch_scores(q, k, starts, query_starts, k_base, skips, part_max, part_sum, vertical, diagonal, common,
                  num_tiles, per_program, splits, qk_scale, meta, split_chunk):
    """Launch the Gluon scores kernel with the Triton launcher's arguments (``scores_triton``)."""
    kernel = _kernel()
    kernel[(part_max.shape[0], splits)](
        q, k, starts, query_starts, k_base, skips, part_max, part_sum, vertical, diagonal, *common,
        num_tiles, per_program, splits, qk_scale,
        HEAD_DIM=meta["HEAD_DIM"], BLOCK=meta["BLOCK"], HAS_KEY_START=meta["HAS_KEY_START"],
        HAS_QUERY_START=meta["HAS_QUERY_START"], PACKED_K=meta["PACKED_K"], HAS_SKIP=meta["HAS_SKIP"],
        SPLIT_CHUNK=split_chunk, ROWS_IN_THREAD=ROWS_IN_THREAD, Q_IN_SMEM=Q_IN_SMEM, num_warps=_NUM_WARPS,
    )
