"""FlexPrefill on packed variable-length sequences (flash-attn's varlen layout): ``flexprefill_attention_varlen``.

Layout: q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``; sequence b owns query rows ``cu_seqlens_q[b] :
cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b] : cu_seqlens_k[b+1]`` (int32 ``[B + 1]``, flash-attn's
``cu_seqlens``), and its ``q_len_b`` queries are its last ``q_len_b`` keys (bottom-right causal: a prefill of
new tokens on a cache, a decode row when ``q_len_b == 1``). Rows past ``cu_seqlens_q[B]`` belong to no
sequence (transformers' continuous batching pads that way) and output 0.

How (ops/README.md, choice 1: the end-aligned grid). A sequence laid into a padded view of
``max_seqlen_k`` keys, left-padded by ``key_start[b] = max_seqlen_k - k_len_b``, gets exactly the blocks it
gets alone, shifted by its padding blocks. So:

1. Selection (``select_blocks_varlen``): ``select_blocks``' steps, unchanged but for ``query_start[b] =
   max_seqlen_k - q_len_b`` (rows of the view before it are the sequence's cache, not queries). Nothing
   of q or k is padded on CUDA: the representative rows ``[B, r, Hq, D]`` (r <= block size) are gathered,
   the query- and key-block means (``[B, Hq, nqb, D]``, ``[B, Hkv, nb, D]``) are segment sums over the packed
   rows, and the Triton scores kernels read the packed keys in place (per-sequence base offsets). What
   remains sized by the padded grid is the selection's own state: the representative scores, fp32
   ``[2, B, Hq, max_seqlen_k]``, and the structure, int32 ``[B, Hq, nqb, nb]``, i.e.
   O(B * Hq * (max_seqlen / block)^2) -- with one long prompt among many short ones (or decode rows), B
   times the long prompt's own. The PyTorch scores (CPU, fp32/fp64) take the keys padded,
   ``[B, max_seqlen_k, Hkv, D]``.
2. Attention: on CUDA (fp16/bf16) the Triton kernel reads q, k, v packed, through per-sequence base
   offsets (``block_sparse_attention_triton_packed``), and writes the output packed: no padded copy of
   v and no padded output. Given the same blocks, a sequence's output is the one the same kernel gives
   it alone, bit for bit. (The selection's arithmetic is the same as alone too, except the summation
   order of some sums -- softmax denominators over the longer view, the segment sums of the query
   means -- which can differ in the last bit; the tests find identical blocks in fp32 and fp64.)
   On CPU (and for fp32/fp64) the PyTorch path unpacks into the padded views and runs
   ``block_sparse_attention_torch`` on them, then gathers the rows back (O(B * max_seqlen) memory).
3. Dense sequences: a sequence is dense when it would run dense alone -- ``k_len_b`` at or below the
   dense threshold, ``q_len_b <= 1`` (decode), and on CUDA ``k_len_b < cuda_dense_below`` -- without
   branching on the host: ``select_blocks`` gives it the full causal block set (``short``), so one kernel
   launch covers every sequence. Its cost there is the block-sparse kernel over the full triangle (the
   kernel's dense speed, not flash-attn's) plus its share of the selection. When every sequence is dense
   (known from the Python ints ``max_seqlen_q`` / ``max_seqlen_k``, or for dtypes the kernel does not
   take), no selection runs at all: the kernel gets a full causal structure built in O(B * nb) memory
   (stride-0 views over heads and query blocks).

No host synchronisation and no Python loop over sequences: lengths are read on the device only, and the
input checks on CUDA are ``torch._assert_async`` (a bad value fails as a device-side assert at the next
synchronisation), eager ValueErrors on CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import FlexPrefillConfig
from .block_structure import BlockStructure
from .flexprefill import FlexPrefillStats, build_stats, selection_config
from .grid import BlockGrid, causal_block_counts
from .runtime import KERNEL_DTYPES
from .selection.scores import compute_dtype
from .selection.select import BlockSelection, select_blocks_from_parts
from .validation import check_attention_inputs, check_kernel_head_dim, check_softmax_scale

# Bytes of packed rows upcast at once for the block-mean segment sums.
_SEGMENT_CHUNK_BYTES = 1 << 28
# The block means on CUDA by one Triton launch (``varlen_triton.segment_block_means_triton``) instead of
# ``index_add_`` and its float32 copies: on the H200 whole varlen calls took 0.77-0.84x the time with it, bit for
# bit the same output (bench_varlen, RESULTS.md 2026-12-02 third session). False: the index_add_ version.
SEGMENT_MEANS_TRITON = True


def flexprefill_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    config: Optional[FlexPrefillConfig] = None,
    *,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """FlexPrefill causal attention for one layer on packed variable-length sequences (forward only).

    Args:
        q: [total_q, Hq, D] fp16/bf16/fp32/fp64, any strides; sequence b's queries in rows
            ``cu_seqlens_q[b] : cu_seqlens_q[b+1]``.
        k, v: [total_k, Hkv, D], q's dtype and device, Hq a multiple of Hkv (query head h reads KV head
            h // (Hq / Hkv)); sequence b's keys in rows ``cu_seqlens_k[b] : cu_seqlens_k[b+1]``. Its
            queries are its last keys (bottom-right causal), so ``q_len_b <= k_len_b``.
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] on q's device, non-decreasing from 0, with
            ``cu_seqlens_q[B] <= total_q`` and ``cu_seqlens_k[B] <= total_k``.
        max_seqlen_q, max_seqlen_k: Python ints >= 1, at least every q_len_b / k_len_b (upper bounds are
            fine; they size the padded selection views). No host sync reads them from the tensors.
        config: hyper-parameters (default ``FlexPrefillConfig()``); softmax_scale: default 1 / sqrt(D).
    Returns:
        [total_q, Hq, D] in q's dtype. Each sequence's rows equal what :func:`flexprefill_attention` gives
        it alone (same blocks; same arithmetic on the Triton path); rows past ``cu_seqlens_q[B]`` are 0.

    See the module docstring for the method, its memory and the dense rules. Gradients are refused as by
    :func:`flexprefill_attention`.
    """
    return flexprefill_attention_varlen_with_stats(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config, softmax_scale=softmax_scale
    )[0]


def flexprefill_attention_varlen_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    config: Optional[FlexPrefillConfig] = None,
    *,
    softmax_scale: Optional[float] = None,
) -> tuple[torch.Tensor, FlexPrefillStats]:
    """:func:`flexprefill_attention_varlen` that also returns what it chose, per (sequence, query head), as
    :class:`FlexPrefillStats` ([B, Hq] tensors; ``dense`` True when no selection ran)."""
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if config is not None and not isinstance(config, FlexPrefillConfig):
        raise TypeError(f"config has type {type(config).__name__}; expected FlexPrefillConfig or None")
    check_softmax_scale(softmax_scale)
    kernel = q.is_cuda and q.dtype in KERNEL_DTYPES
    if kernel:
        # Validated once, here: the packed kernel below is called through its unchecked launcher.
        check_kernel_head_dim(q.shape[-1])
    config = FlexPrefillConfig() if config is None else config
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    batch, q_heads = cu_seqlens_q.shape[0] - 1, q.shape[1]
    max_k = max_seqlen_k
    max_q = min(max_seqlen_q, max_k)
    # A sequence runs dense where it would alone (flexprefill.py's routing): at or below the threshold,
    # and on CUDA below cuda_dense_below; decode rows are dense by select_blocks' query_start rule.
    config = selection_config(config, q.is_cuda)
    threshold = config.effective_dense_threshold
    all_dense = max_q <= 1 or max_k <= threshold or (q.is_cuda and not kernel)
    grid = BlockGrid(max_q, max_k, config.block_size)
    if batch == 0:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        computed = torch.zeros(0, q_heads, dtype=torch.int32, device=q.device)  # [0, Hq]
        return out, build_stats(computed, computed[:, 0], None, all_dense)

    q_lens = cu_seqlens_q.diff().long()  # [B]
    k_lens = cu_seqlens_k.diff().long()
    # An empty sequence starts at max_k (padding only, as key_start == k_len in the operator): never clamp it to a
    # real position, or the packed scores kernel would read the next sequence's first key (or past the end of k).
    key_start = varlen_key_start(cu_seqlens_k, max_k)
    query_start = max_k - q_lens  # [B] padded key position of each sequence's first query
    sink = grid.sink_block(key_start)

    if all_dense:
        selection = None
        structure = full_causal_structure(grid, q_heads, sink, query_start)
    else:
        selection = select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_q, max_k, config, scale)
        structure = selection.structure
    if kernel:
        # Imported here: the kernel module is compiled for the device (or the interpreter) on first use.
        from .attention.block_sparse_triton import _block_sparse_attention_triton_packed

        out = _block_sparse_attention_triton_packed(q, k, v, structure, cu_seqlens_q, cu_seqlens_k, scale)
    else:
        out = _attention_torch(q, k, v, structure, cu_seqlens_q, cu_seqlens_k, q_lens, k_lens, key_start, scale,
                               selection is None)
    computed = structure.counts.sum(-1, dtype=torch.int32)  # [B, Hq]
    causal = causal_block_counts(grid, sink, grid.sink_block(query_start)) * (q_lens > 0)
    return out, build_stats(computed, causal, selection, dense=selection is None)


def select_blocks_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    config: FlexPrefillConfig,
    softmax_scale: float,
    **backends,
) -> BlockSelection:
    """``select_blocks`` for packed sequences (no validation: :func:`check_varlen_inputs` first).

    Sequence b is laid into the padded view of ``max_seqlen_k`` keys with ``key_start = max_seqlen_k - k_len_b``
    and ``query_start = max_seqlen_k - q_len_b``. Of q only what the selection reads is formed: the
    representative rows [B, r, Hq, D] (gathered) and the query-block means [B, Hq, nqb, D] (segment sums
    of the packed rows, in the compute dtype). With the Triton scores (fp16/bf16 CUDA, or
    ``scores_backend="triton"``) k is read packed, its block means by segment sums too; with the PyTorch
    scores it is gathered into the left-padded view [B, max_seqlen_k, Hkv, D]. Returns the selection on the padded grid
    ``BlockGrid(min(max_seqlen_q, max_seqlen_k), max_seqlen_k)``: sequence b's blocks are those it gets
    alone, shifted right by ``nb - ceil(k_len_b / block)`` blocks. ``backends``: select_blocks' keywords.
    """
    max_q = min(max_seqlen_q, max_seqlen_k)
    grid = BlockGrid(max_q, max_seqlen_k, config.block_size)
    q_lens, k_lens = cu_seqlens_q.diff().long(), cu_seqlens_k.diff().long()
    key_start = varlen_key_start(cu_seqlens_k, max_seqlen_k)  # max_seqlen_k for an empty sequence: reads no key
    query_start = max_seqlen_k - q_lens
    r = grid.num_representative
    # The last r rows of each sequence's view: rows before its first query are 0 (no query there).
    q_rep = _left_padded(q, cu_seqlens_q, q_lens, max_q, first=max_q - r)  # [B, r, Hq, D]
    q_means = _segment_means(q, cu_seqlens_q, q_lens, grid, grid.first_query_block)  # [B, Hq, nqb, D]
    scores_backend = backends.get("scores_backend")
    if scores_backend == "triton" or (scores_backend is None and q.is_cuda and q.dtype in KERNEL_DTYPES):
        # The Triton scores kernels read the packed keys in place: no padded copy of k at all.
        k_means = _segment_means(k, cu_seqlens_k, k_lens, grid, 0)  # [B, Hkv, nb, D]
        return select_blocks_from_parts(q_rep, q_means, k, grid, config, softmax_scale, key_start,
                                        query_start=query_start, k_means=k_means, cu_seqlens_k=cu_seqlens_k,
                                        **backends)
    k_pad = _left_padded(k, cu_seqlens_k, k_lens, max_seqlen_k)  # [B, max_k, Hkv, D]
    return select_blocks_from_parts(q_rep, q_means, k_pad, grid, config, softmax_scale, key_start,
                                    query_start=query_start, **backends)


def _segment_means(x: torch.Tensor, cu_seqlens: torch.Tensor, lens: torch.Tensor, grid: BlockGrid, first_block: int):
    """:func:`_block_means`, by the Triton kernel where it is switched on (``SEGMENT_MEANS_TRITON``, CUDA fp16/bf16)."""
    if SEGMENT_MEANS_TRITON and x.is_cuda and x.dtype in KERNEL_DTYPES:
        from .varlen_triton import segment_block_means_triton

        return segment_block_means_triton(x, cu_seqlens, grid, first_block)
    return _block_means(x, cu_seqlens, lens, grid, first_block)


def _block_means(x: torch.Tensor, cu_seqlens: torch.Tensor, lens: torch.Tensor, grid: BlockGrid, first_block: int):
    """[B, H, nb - first_block, D] in the compute dtype: the mean of each block ``first_block..nb-1`` of the padded
    grid over the packed rows x [total, H, D] of its sequence that fall in it (0 where none do), by one segment
    sum over the packed rows; sequence b's rows are the last lens[b] positions of the view."""
    batch, blocks = lens.shape[0], grid.num_blocks - first_block
    seq, position, real = _packed_positions(cu_seqlens, lens, x.shape[0], grid.k_len)  # key positions in the view
    block = ((position + grid.pad) // grid.block_size - first_block).clamp(0, blocks - 1)
    segment = torch.where(real, seq * blocks + block, batch * blocks)  # rows of no sequence: a dropped segment
    dtype = compute_dtype(x.dtype)
    sums = x.new_zeros((batch * blocks + 1,) + x.shape[1:], dtype=dtype)
    # Rows are upcast a chunk at a time: an fp32 copy of all of q would double its memory.
    chunk = max(1, _SEGMENT_CHUNK_BYTES // max(1, x[0].numel() * torch.finfo(dtype).bits // 8))
    for r0 in range(0, x.shape[0], chunk):
        sums.index_add_(0, segment[r0 : r0 + chunk], x[r0 : r0 + chunk].to(dtype))
    counts = x.new_zeros(batch * blocks + 1, dtype=dtype).index_add_(0, segment, x.new_ones(x.shape[0], dtype=dtype))
    means = sums[:-1] / counts[:-1].clamp_min(1)[:, None, None]
    return means.unflatten(0, (batch, blocks)).transpose(1, 2)  # [B, H, blocks, D]


def varlen_key_start(cu_seqlens_k: torch.Tensor, max_seqlen_k: int) -> torch.Tensor:
    """int64 [B]: left padding of each sequence in the padded view of ``max_seqlen_k`` keys
    (``max_seqlen_k - k_len_b``; ``max_seqlen_k`` for an empty sequence)."""
    return max_seqlen_k - (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()


def full_causal_structure(
    grid: BlockGrid, q_heads: int, sink: torch.Tensor, query_start: torch.Tensor
) -> BlockStructure:
    """The dense structure of every sequence on the padded grid, in O(B * nb) memory.

    Query block i of sequence b computes key blocks ``sink[b] .. i`` when it holds a query of b (i at or
    after the block of ``query_start[b]``, and ``query_start[b] < k_len``), nothing otherwise. indices:
    the same ascending row ``sink[b] + s`` for every head and query block (stride-0 views; entries past
    the count are never read); counts int32 [B, Hq, nqb] (a stride-0 view over heads).
    """
    device = sink.device
    nb = grid.num_blocks
    i = torch.arange(grid.first_query_block, nb, device=device)  # [nqb]
    has_query = (i[None, :] >= grid.sink_block(query_start)[:, None]) & (query_start < grid.k_len)[:, None]
    counts = torch.where(has_query, (i[None, :] - sink[:, None] + 1).clamp_min(0), 0).to(torch.int32)  # [B, nqb]
    rows = (sink[:, None] + torch.arange(nb, device=device)).clamp(max=nb - 1).to(torch.int32)  # [B, nb]
    batch = sink.shape[0]
    indices = rows[:, None, None, :].expand(batch, q_heads, grid.num_query_blocks, nb)
    return BlockStructure(indices=indices, counts=counts[:, None].expand(batch, q_heads, -1), grid=grid)


def _left_padded(
    x: torch.Tensor, cu_seqlens: torch.Tensor, lens: torch.Tensor, length: int, first: int = 0
) -> torch.Tensor:
    """Packing's inverse: the packed rows x [total, H, D] laid into the left-padded view of ``length`` rows,
    sequence b in its last lens[b] positions; positions ``first .. length - 1`` only: [B, length - first, H, D]
    (padding rows 0). :func:`_packed_positions` is the map back."""
    start = length - lens  # [B]
    t = torch.arange(first, length, device=lens.device)
    valid = t[None, :] >= start[:, None]  # [B, length - first]
    index = (cu_seqlens[:-1].long()[:, None] + t[None, :] - start[:, None]).clamp(0, x.shape[0] - 1)
    out = x.index_select(0, index.flatten()).unflatten(0, index.shape)
    return out.masked_fill_(~valid[:, :, None, None], 0)


def _packed_positions(
    cu_seqlens: torch.Tensor, lens: torch.Tensor, total: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packing's map: for each of the ``total`` packed rows, (its sequence, clamped to B - 1; its position in the
    sequence's left-padded view of ``length`` rows; bool: it belongs to a sequence, False past cu_seqlens[B]),
    each [total] (int64, int64, bool). Sequence b fills the last lens[b] positions, as in :func:`_left_padded`."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)  # B past the last sequence
    real = seq < lens.shape[0]
    seq = seq.clamp_max(lens.shape[0] - 1)
    return seq, length - lens[seq] + rows - cu_seqlens[:-1].long()[seq], real


def _attention_torch(q, k, v, structure, cu_q, cu_k, q_lens, k_lens, key_start, scale, dense) -> torch.Tensor:
    """The PyTorch path: unpack into the padded views, attend, gather each sequence's rows back."""
    from .attention.block_sparse_torch import masked_attention_torch

    grid = structure.grid
    q_pad = _left_padded(q, cu_q, q_lens, grid.q_len)
    k_pad, v_pad = (_left_padded(t, cu_k, k_lens, grid.k_len) for t in (k, v))
    # The dense path's structure is the full causal set: masked attention without one is the same function.
    out_pad = masked_attention_torch(q_pad, k_pad, v_pad, scale, key_start, None if dense else structure)
    # Packed row p of sequence b is padded row max_q - q_len_b + (p - cu_q[b]); rows past cu_q[B] stay 0.
    seq, pos, real = _packed_positions(cu_q, q_lens, q.shape[0], grid.q_len)  # [total_q]
    return torch.where(real[:, None, None], out_pad[seq, pos.clamp(0, grid.q_len - 1)], 0).to(q.dtype)


def check_varlen_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    kernel: bool = False,
) -> None:
    """Check packed q [total_q, Hq, D], k and v [total_k, Hkv, D], cu_seqlens int32 [B + 1] and the int
    maxima (as ``validation.check_attention_inputs`` for the tensors; ``kernel=True``: fp16/bf16 only).

    Values (cu_seqlens start at 0, never decrease, end within the tensors, q_len_b <= k_len_b, lengths within
    the maxima) are checked eagerly on CPU (ValueError naming the argument) and by ``torch._assert_async``
    on CUDA (no host sync; the same message as a device-side assert at the next synchronisation).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} has type {type(t).__name__}; expected a torch.Tensor")
        if t.dim() != 3:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 3 dims [total_tokens, heads, head_dim]")
    # Shapes first, so that messages show the packed shapes; then the shared checks on one-row-batch views.
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; expected equal shapes")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q has head_dim {q.shape[2]} but k has {k.shape[2]}; expected equal head dims")
    check_attention_inputs(q[None], k[None], v[None], kernel=kernel)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected an int")
        if value < 1:
            raise ValueError(f"{name}={value} is not supported; expected an int >= 1")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} has type {type(cu).__name__}; expected an int32 tensor of shape (B + 1,)")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} has dtype {cu.dtype}; expected torch.int32 of shape (B + 1,)")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} has shape {tuple(cu.shape)}; expected (B + 1,) with B >= 0")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}; expected q's device {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.shape[0]}; expected equal lengths (B + 1)")
    q_lens, k_lens = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    total_q, total_k = q.shape[0], k.shape[0]
    rules = (
        (cu_seqlens_q[:1] == 0, "cu_seqlens_q out of range; expected cu_seqlens_q[0] == 0"),
        (cu_seqlens_k[:1] == 0, "cu_seqlens_k out of range; expected cu_seqlens_k[0] == 0"),
        (q_lens >= 0, "cu_seqlens_q is not monotone; expected non-decreasing cumulative lengths"),
        (k_lens >= 0, "cu_seqlens_k is not monotone; expected non-decreasing cumulative lengths"),
        (cu_seqlens_q[-1:] <= total_q, f"cu_seqlens_q out of range; expected cu_seqlens_q[B] <= total_q = {total_q}"),
        (cu_seqlens_k[-1:] <= total_k, f"cu_seqlens_k out of range; expected cu_seqlens_k[B] <= total_k = {total_k}"),
        (q_lens <= k_lens, "cu_seqlens_q and cu_seqlens_k disagree; expected q_len_b <= k_len_b (queries are the "
                           "last keys)"),
        (q_lens <= max_seqlen_q, f"cu_seqlens_q has a sequence longer than max_seqlen_q = {max_seqlen_q}"),
        (k_lens <= max_seqlen_k, f"cu_seqlens_k has a sequence longer than max_seqlen_k = {max_seqlen_k}"),
    )
    for ok, message in rules:
        if q.device.type == "cuda":
            torch._assert_async(ok.all(), message)  # no host sync
        elif not bool(ok.all()):
            raise ValueError(message)
