"""FlexPrefill block selection for all sequences and query heads at once (ops/README.md §1-§5).

:func:`select_blocks` runs the algorithm's steps in order, one private function each:

    _sequences               per-sequence values: sink block, padding, the dense rule (§5)
    _representative_scores   §1: vertical and slash scores of the last r queries (scores.py / scores_triton.py)
    _block_scores            §2/§3: those scores pooled into key blocks and offset blocks
    _pattern                 §2: JS distance of the estimated and the true block distribution -> query-aware
                             (pattern_triton.py: one launch)
    _vertical_slash_blocks   §3: budgets by γ-coverage, then the best vertical and slash blocks
                             (coverage.py / coverage_triton.py: threshold searches, one launch)
    _query_aware_coverage    §4: global γ-coverage of the block estimate (one chunk of heads;
                             estimate_triton.py + coverage_triton.py: query-aware heads only)
    _compose                 §5: sink, diagonal and block-causal rules; the mask packed (compose.py,
                             compose_triton.py)

``structure_backend`` picks the stages (``_Stages``): "triton" runs the Triton version of §2-§5 (one launch
each, threshold searches instead of sorts); "compose" only §5 in Triton (§2-§4 in PyTorch with sorts: the CUDA
path before the one-launch kernels); "torch" everything in PyTorch, the CPU path and the tests' oracle. The
CUDA default is :func:`default_structure_backend`'s measured rule.

Fixed shapes, no host synchronisation, no Python loop over batch or heads: the only loops are over
chunks of heads, sized from the shapes so that the representative block's scores (``r x n`` per
query head) and the ``nqb x nb`` block estimates never exist for all heads at once. Computes in
float32 (float64 for float64 inputs, so that tests can compare with
``reference.select_blocks_reference`` by exact equality). The grid is the end-aligned one of
``ops/grid.py``; the output layout is ``ops/block_structure.py``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import torch

from ...config import FlexPrefillConfig
from ..block_structure import BlockStructure, causal_pair_count, causal_pair_index
from ..grid import BlockGrid, causal_block_counts
from ..runtime import KERNEL_DTYPES
from . import graphs
from .compose import MaskParts, compose_structure_torch
from .coverage import budget_blocks, budget_limits, coverage_counts, coverage_mask, js_distance, top_blocks
from .scores import block_counts, block_means, compute_dtype, pool_key_blocks, pool_offset_blocks, representative_scores

# Upper bound on the temporaries of one chunk of block masks, and their bytes per (query block, key
# block) pair and head: logits, probabilities, their sorted copy, int64 order, prefix sums, and the
# torch composition's masks and slots (the Triton composition needs none of the latter).
_MASK_CHUNK_BYTES = 1 << 32
_MASK_BYTES_PER_PAIR = 48

# From this many keys on, CUDA runs the "compose" stages, up to ``coverage_triton.SPLIT_FROM`` keys, where the
# one-launch stages return with their long coverage rows split over many programs. With SPLIT_FROM at 64K the
# range is empty: the compose stages run only for float64 (and when SPLIT_FROM is None). Measured on the H200
# (benchmarks/RESULTS.md, 2026-12-02, 32 q / 8 kv heads, d 128, eager ms per call): one-launch 0.63-0.66 at 8K,
# 1.9-2.0 at 32K (compose 2.3, 2.7); split 3.0 at 64K, 4.9 at 96K, 7.2 at 128K (compose 4.2, 6.7, 9.4); at 128K
# one program per row took 15.9 (64 rows of 128K token scores, 32 of 524K block pairs, on 132 SMs).
COMPOSE_STAGES_FROM = 65536


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Result of :func:`select_blocks`.

    structure: the selected key blocks (``BlockStructure``: indices int32 [B, Hq, nqb, nb], counts int32 [B, Hq, nqb]).
    query_aware: bool [B, Hq] -- pattern chosen per head (False for sequences short enough to run dense).
    js_distance: [B, Hq] in the compute dtype -- sqrt(JSD); NaN for sequences short enough to run dense.
    causal_blocks: int32 [B] -- blocks of the causal block triangle of each sequence (for fractions).
    """

    structure: BlockStructure
    query_aware: torch.Tensor
    js_distance: torch.Tensor
    causal_blocks: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Sequences:
    """Per-sequence values of one call, computed once.

    starts: int64 [B], first real key; sink: int64 [B], its block (``BlockGrid.sink_block``);
    key_valid: bool [B, n], or None without left padding; padding_block: bool [B, 1, nb], blocks of
    padding only, or None (``_blocked`` builds §4's mask from them when the PyTorch path needs it);
    short: bool [B], real length at or below the dense threshold, or at most one query (§5).
    query_start: int64 [B], key position of the first real query (``starts`` without ``query_start``:
    a padding row is no query); query_rows: bool [B, nqb], query blocks holding a real query, or None
    when every present block does (no ``query_start``).
    short_all: Python bool, the value of every ``short[b]`` when it is known from the shapes alone
    (neither ``key_start`` nor ``query_start``: every sequence starts at key 0), else None. It lets
    the call skip device ops whose outcome the host already knows (no host sync).
    """

    starts: torch.Tensor
    sink: torch.Tensor
    key_valid: Optional[torch.Tensor]
    padding_block: Optional[torch.Tensor]
    short: torch.Tensor
    query_start: torch.Tensor
    query_rows: Optional[torch.Tensor]
    short_all: Optional[bool]


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    config: FlexPrefillConfig,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    *,
    query_start: Optional[torch.Tensor] = None,
    scores_backend: Optional[str] = None,
    structure_backend: Optional[str] = None,
) -> BlockSelection:
    """Choose, per sequence and query head, the key blocks each query block computes (ops/README.md §1-§5).

    Args:
        q: [B, q_len, Hq, D]; k: [B, n, Hkv, D] (n >= q_len, queries are the last positions); any strides.
        config: hyper-parameters; softmax_scale: the attention scale.
        key_start: optional int [B], first real key of each sequence (left padding).
        query_start: optional int64 [B], key position of each sequence's first real query, with
            ``max(key_start[b], n - q_len) <= query_start[b] <= n`` (not checked: internal callers only).
            Rows of q before it are not queries (the cache of a packed sequence laid into a padded
            view, ``ops/varlen.py``): they are left out of every mean, the query blocks before the
            first one holding a query get no blocks (counts 0, indices -1) and take no part in the
            global coverage of §4, and a sequence with at most one query is short (dense, as decode
            is alone). Each sequence then gets exactly the selection of a call with its own
            ``q_len = n - query_start[b]`` and keys ``key_start[b]:`` alone. Default: the rows at or
            after ``key_start`` (or all rows) are queries, as before.
        scores_backend: "triton" (fused kernels of ``scores_triton.py``) or "torch" (``scores.py``)
            for the representative scores; default: triton for fp16/bf16 CUDA tensors, torch otherwise.
        structure_backend: "triton" (§2-§5 in one Triton launch each: ``pattern_triton.py``, the γ-coverage
            rules of §3/§4 by the threshold searches of ``coverage_triton.py`` (no sort),
            ``estimate_triton.py``, ``compose_triton.py``; float32 on CUDA, float64 only interpreted),
            "compose" (only §5 in Triton, §2-§4 in PyTorch with sorts) or "torch" (all in PyTorch:
            ``compose.compose_structure_torch``, ``coverage.py``); default: "torch" on CPU, on CUDA
            :func:`default_structure_backend` (by length and dtype). All give the same structure exactly
            (``coverage_triton.py`` says when its sums are).
    Returns:
        BlockSelection with the structure int32 [B, Hq, nqb, nb] / counts [B, Hq, nqb].
    """
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_size)
    seqs = _sequences(grid, q.shape[0], key_start, query_start, config, q.device)
    q_rep = q[:, grid.q_len - grid.num_representative :]  # [B, r, Hq, D]
    dtype = compute_dtype(q.dtype)
    k_means = counts = None
    if seqs.key_valid is not None and seqs.query_rows is None and grid.cache_len == 0:
        # q and k lie on the same grid with the same real rows: one count of them divides both block means.
        counts = block_counts(seqs.key_valid, grid, dtype)  # [B, nb]
        k_means = block_means(k, seqs.key_valid, grid, dtype, counts).permute(0, 2, 1, 3)  # [B, Hkv, nb, D]
    q_means = _query_block_means(q, grid, seqs, dtype, counts)
    return _select_or_replay(q_rep, q_means, k_means, k, None, grid, seqs, config, softmax_scale, key_start,
                             query_start, scores_backend, structure_backend)


def select_blocks_from_parts(
    q_rep: torch.Tensor,
    q_means: torch.Tensor,
    k: torch.Tensor,
    grid: BlockGrid,
    config: FlexPrefillConfig,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    *,
    query_start: Optional[torch.Tensor] = None,
    k_means: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    scores_backend: Optional[str] = None,
    structure_backend: Optional[str] = None,
) -> BlockSelection:
    """:func:`select_blocks` from the only parts of q it reads, for callers that never hold q as [B, q_len, Hq, D]
    (packed sequences, ``ops/varlen.py``).

    q_rep: [B, r, Hq, D], the representative rows, i.e. the last ``r = grid.num_representative`` rows of q;
    q_means: [B, Hq, nqb, D] in the compute dtype (``scores.compute_dtype``), the mean of each present
    query block over its real query rows (0 where it has none); grid: ``BlockGrid(q_len, n, block_size)``
    with ``k`` [B, n, Hkv, D]. Or, with ``cu_seqlens_k`` (int32 [B + 1]) and ``k_means`` ([B, Hkv, nb, D] in the
    compute dtype, the mean of each key block over its real keys), k packed [total_k, Hkv, D] (sequence b's
    keys at positions ``key_start[b]..n-1``; key_start required): read in place by the Triton scores
    kernels, so ``scores_backend`` must resolve to "triton". The rest as :func:`select_blocks`.
    """
    if (cu_seqlens_k is None) != (k_means is None):
        raise ValueError("cu_seqlens_k and k_means go together (packed keys); expected both or neither")
    seqs = _sequences(grid, q_rep.shape[0], key_start, query_start, config, q_rep.device)
    return _select_or_replay(q_rep, q_means, k_means, k, cu_seqlens_k, grid, seqs, config, softmax_scale, key_start,
                             query_start, scores_backend, structure_backend)


def _select_or_replay(q_rep, q_means, k_means, k, cu_seqlens_k, grid, seqs, config, softmax_scale, key_start,
                      query_start, scores_backend, structure_backend) -> BlockSelection:
    """:func:`_select`, from a CUDA graph where ``graphs.wanted`` says the launches cost more than the work
    (``graphs.py``: the same kernels, on copies of the inputs). The graph's body recomputes ``seqs`` from its
    copies of key_start and query_start (a few small ops; the eager ``seqs`` served the means above)."""
    inputs = (q_rep, q_means, k_means, k, cu_seqlens_k, key_start, query_start)
    if not graphs.wanted(k.device, grid.k_len) or any(t is not None and t.device != k.device for t in inputs):
        return _select(q_rep, q_means, k_means, k, cu_seqlens_k, grid, seqs, config, softmax_scale, key_start,
                       scores_backend, structure_backend)
    batch = q_rep.shape[0]

    def body(q_rep, q_means, k_means, k, cu_seqlens_k, key_start, query_start):
        seqs = _sequences(grid, batch, key_start, query_start, config, k.device)
        chosen = _select(q_rep, q_means, k_means, k, cu_seqlens_k, grid, seqs, config, softmax_scale, key_start,
                         scores_backend, structure_backend)
        return (chosen.structure.indices, chosen.structure.counts, chosen.query_aware, chosen.js_distance,
                chosen.causal_blocks)

    key = ("select_blocks", grid.q_len, grid.k_len, grid.block_size, config, softmax_scale, scores_backend,
           structure_backend)
    indices, counts, query_aware, distance, causal = graphs.replay(key, body, inputs)
    return BlockSelection(BlockStructure(indices=indices, counts=counts, grid=grid), query_aware, distance, causal)


def _select(q_rep, q_means, k_means, k, cu_seqlens_k, grid, seqs, config, softmax_scale, key_start, scores_backend,
            structure_backend):
    """§1-§5 from the representative rows q_rep [B, r, Hq, D], the query-block means q_means [B, Hq, nqb, D] and
    the keys k [B, n, Hkv, D] (or packed, with cu_seqlens_k and the key-block means k_means)."""
    stages = _backends(q_rep, grid.k_len, scores_backend, structure_backend)
    if cu_seqlens_k is not None and stages.scores != "triton":
        raise ValueError(f"scores_backend={stages.scores!r} cannot read packed keys; expected 'triton'")
    dtype = compute_dtype(q_rep.dtype)
    rep_scores = _representative_scores(q_rep, k, grid, softmax_scale, key_start, seqs, stages,
                                        cu_seqlens_k)  # [2, B, Hq, n]
    block_scores = _block_scores(rep_scores, grid)  # [2, B, Hq, nb]
    if k_means is None:
        k_means = block_means(k, seqs.key_valid, grid, dtype).permute(0, 2, 1, 3)  # [B, Hkv, nb, D]
    # Dense sequences have no pattern to report (nothing to clear when the host knows there are none).
    clear_short = seqs.short_all is not False
    if stages.pattern is not None:
        distance, query_aware = stages.pattern(
            q_rep, k_means, block_scores[0], seqs.query_start, None if seqs.padding_block is None else seqs.sink,
            seqs.short if clear_short else None, grid.k_len, softmax_scale, config.tau,
        )
        clear_short = False  # done by the kernel
    else:
        distance, query_aware = _pattern(q_rep, block_scores[0], k_means, grid, seqs, config, softmax_scale)
    vertical, slash = _vertical_slash_blocks(rep_scores, block_scores, query_aware, grid, seqs, config, stages)
    parts = MaskParts(vertical=vertical, slash=slash, query_aware=query_aware, short=seqs.short, sink=seqs.sink)
    structure = _compose(q_means, k_means, parts, grid, seqs, config, softmax_scale, stages)
    if seqs.short_all is not None:
        # Every sink is block 0: each sequence's causal triangle is the grid's, P pairs (known on the host).
        causal = torch.full((q_rep.shape[0],), causal_pair_count(grid), dtype=torch.int32, device=q_rep.device)
    else:
        causal = causal_block_counts(grid, seqs.sink)
    if seqs.query_rows is not None:
        # Query blocks without a query of their sequence compute nothing (what the sequence gets alone).
        no_query = ~seqs.query_rows[:, None, :]  # [B, 1, nqb]
        structure.counts.masked_fill_(no_query, 0)
        structure.indices.masked_fill_(no_query[..., None], -1)
        causal = causal_block_counts(grid, seqs.sink, grid.sink_block(seqs.query_start))

    if clear_short:
        query_aware = torch.where(seqs.short[:, None], False, query_aware)
        distance = distance.masked_fill(seqs.short[:, None], math.nan)
    return BlockSelection(structure, query_aware, distance, causal)


@dataclasses.dataclass(frozen=True)
class _Stages:
    """The functions one call runs for the stages that have a Triton and a PyTorch version.

    scores: "triton" or "torch" (``_representative_scores``); diagonal_by_gather: how the Triton scores kernel
    sums a tile's diagonals (``scores_triton.py``: True by ``tl.gather`` on chip, False through a global
    scratch, None its module default ``_DIAGONAL_BY_GATHER``);
    compose: the §5 composition; mask: §4's γ-coverage rule (``coverage.coverage_mask`` or its threshold search
    ``coverage_triton.coverage_mask_triton``); vertical_slash: all of §3 in one launch
    (``coverage_triton.vertical_slash_blocks_triton``), or None (§3 from ``coverage_counts``, budget_blocks,
    top_blocks); pattern: §2 in one launch (``pattern_triton.pattern_triton``), or None (``_pattern`` in
    PyTorch); estimate: §4's row-softmax over the pairs in one launch (``estimate_triton.block_estimate_triton``),
    or None (``_query_aware_coverage`` in PyTorch).
    """

    scores: str
    compose: Callable
    mask: Callable
    vertical_slash: Optional[Callable] = None
    pattern: Optional[Callable] = None
    estimate: Optional[Callable] = None
    diagonal_by_gather: Optional[bool] = None


def default_structure_backend(device_type: str, dtype: torch.dtype, k_len: int, compiling: bool = False) -> str:
    """The stages ``select_blocks`` runs when ``structure_backend`` is None: "torch" off CUDA; on CUDA
    "compose" for float64 (the one-launch kernels refuse it: ``coverage_triton.refuse_cuda_float64``), under
    ``torch.compile`` (``compiling``; see below) and from ``COMPOSE_STAGES_FROM`` keys up to
    ``coverage_triton.SPLIT_FROM`` (where the sort-based stages measured faster than one program per row);
    "triton" (the one-launch stages) otherwise.

    Under torch.compile (torch 2.11, H200, 2026-12-02) inductor lost the one-launch pattern kernel's writes:
    the compiled selection returned query_aware all False where eager gave all True, so a traced
    ``select_blocks`` runs the compose stages. The operator does not trace it at all: under compile its sparse
    route is one custom op (``ops/compiled.py``), inside which these defaults apply as in eager code.
    """
    if device_type != "cuda":
        return "torch"
    if compiling:
        return "compose"
    from . import coverage_triton  # Triton: imported on the CUDA path only

    split_from = coverage_triton.SPLIT_FROM
    if dtype == torch.float64 or COMPOSE_STAGES_FROM <= k_len < (math.inf if split_from is None else split_from):
        return "compose"
    return "triton"


def _backends(q: torch.Tensor, k_len: int, scores_backend: Optional[str], structure_backend: Optional[str]
              ) -> _Stages:
    """Resolve the two backend arguments (defaults from q's device, dtype and the key length) into the stages."""
    if scores_backend is None:
        scores_backend = "triton" if q.is_cuda and q.dtype in KERNEL_DTYPES else "torch"
    if scores_backend not in ("triton", "torch"):
        raise ValueError(f"scores_backend={scores_backend!r} is not supported; expected 'triton', 'torch' or None")
    if structure_backend is None:
        structure_backend = default_structure_backend(q.device.type, q.dtype, k_len, torch.compiler.is_compiling())
    if structure_backend == "triton":
        from .compose_triton import compose_structure_triton
        from .coverage_triton import coverage_mask_triton, vertical_slash_blocks_triton

        from .estimate_triton import block_estimate_triton
        from .pattern_triton import pattern_triton

        # Diagonals by the module default (the gather way), as measured with these stages at 8K-32K.
        return _Stages(scores_backend, compose_structure_triton, coverage_mask_triton, vertical_slash_blocks_triton,
                       pattern_triton, block_estimate_triton)
    if structure_backend == "compose":
        from .compose_triton import compose_structure_triton

        # The configuration measured at 128K on 2026-12-01: diagonals through the scratch.
        return _Stages(scores_backend, compose_structure_triton, coverage_mask, diagonal_by_gather=False)
    if structure_backend == "torch":
        return _Stages(scores_backend, compose_structure_torch, coverage_mask)
    raise ValueError(
        f"structure_backend={structure_backend!r} is not supported; expected 'triton', 'compose', 'torch' or None"
    )


def _sequences(
    grid: BlockGrid, batch: int, key_start: Optional[torch.Tensor], query_start: Optional[torch.Tensor],
    config: FlexPrefillConfig, device
) -> _Sequences:
    """Small per-sequence values, once; the left-padding masks only when there is padding."""
    nb = grid.num_blocks
    dense_from = grid.k_len - config.effective_dense_threshold  # sequences starting here or later run dense
    short_all = None
    if key_start is None:
        # Without left padding the sink is block 0 (the grid's pad < B), and every sequence starts at key 0:
        # whether it runs dense is known here, so `short` is filled, not compared.
        starts = sink = torch.zeros(batch, dtype=torch.long, device=device)
        key_valid = padding_block = None
        short_all = 0 >= dense_from
        short = torch.full((batch,), short_all, dtype=torch.bool, device=device)  # [B]
    else:
        starts = key_start.to(device, torch.long)
        sink = grid.sink_block(starts)  # [B]
        key_valid = torch.arange(grid.k_len, device=device)[None, :] >= starts[:, None]  # [B, n]
        padding_block = (torch.arange(nb, device=device) < sink[:, None])[:, None, :]  # [B, 1, nb]
        short = starts >= dense_from  # [B]
    query_rows = None
    if query_start is None:
        query_start = starts
    else:
        short_all = None
        query_start = query_start.to(device, torch.long)
        # Blocks from the one holding the first query (sink_block: the block of a position); none when q_len is 0.
        i = torch.arange(grid.first_query_block, nb, device=device)
        query_rows = (i[None, :] >= grid.sink_block(query_start)[:, None]) & (query_start < grid.k_len)[:, None]
        short = short | (query_start >= grid.k_len - 1)  # decode (or nothing) runs dense, as alone
    return _Sequences(starts, sink, key_valid, padding_block, short, query_start, query_rows, short_all)


def _blocked(grid: BlockGrid, seqs: _Sequences) -> torch.Tensor:
    """bool [1 or B, nqb, nb]: the pairs §4 never keeps (PyTorch path) -- outside the block-causal triangle,
    in padding, or (with ``query_start``) in query blocks before the sequence's first query."""
    nb = grid.num_blocks
    if seqs.padding_block is None and seqs.query_rows is None:
        # Only the triangle: pairs with j > i = first_query_block + t, by one fill and one triu (no aranges).
        blocked = torch.ones(grid.num_query_blocks, nb, dtype=torch.bool, device=seqs.sink.device)
        return blocked.triu_(grid.first_query_block + 1)[None]  # [1, nqb, nb]
    j = torch.arange(nb, device=seqs.sink.device)
    i = torch.arange(grid.first_query_block, nb, device=seqs.sink.device)
    blocked = (j[None, :] > i[:, None])[None]  # [1, nqb, nb]: outside the block-causal triangle
    if seqs.padding_block is not None:
        blocked = blocked | seqs.padding_block  # [B, nqb, nb]
    if seqs.query_rows is not None:
        blocked = blocked | ~seqs.query_rows[:, :, None]  # [B, nqb, nb]
    return blocked


def _representative_scores(
    q_rep: torch.Tensor, k: torch.Tensor, grid: BlockGrid, softmax_scale: float, key_start: Optional[torch.Tensor],
    seqs: _Sequences, stages: _Stages, cu_seqlens_k: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """§1 (and the scores of §3): a_v, a_s [2, B, Hq, n] of the representative rows q_rep [B, r, Hq, D], in the
    compute dtype (torch) or fp32 (triton, fp16/bf16 inputs)."""
    # The scores functions take the last r rows of their q: q_rep is all of it, on the grid of r queries.
    q, grid = q_rep, BlockGrid(q_rep.shape[1], grid.k_len, grid.block_size)
    if stages.scores == "triton":
        from .scores_triton import representative_scores_triton

        query_start = None if seqs.query_rows is None else seqs.query_start
        # Dense sequences' scores are never read (§5 gives them the full causal set): computed from no key, so a
        # packed batch's decode rows and short prompts cost no scores work. None when the host knows there are none.
        skip = None if seqs.short_all is False else seqs.short
        return representative_scores_triton(q, k, grid, softmax_scale, key_start, query_start=query_start,
                                            cu_seqlens_k=cu_seqlens_k, diagonal_by_gather=stages.diagonal_by_gather,
                                            skip=skip)
    key_valid = seqs.key_valid
    if key_valid is None:
        key_valid = torch.ones(q.shape[0], grid.k_len, dtype=torch.bool, device=q.device)
    return representative_scores(q, k, grid, softmax_scale, key_valid, seqs.query_start)


def _block_scores(rep_scores: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """[2, B, Hq, nb]: a_v pooled into key blocks (â of §2, the vertical block scores of §3) and a_s
    pooled into offset blocks (the slash block scores of §3)."""
    if grid.pad == 0:  # key blocks and offset blocks coincide: both by one reduction
        return rep_scores.unflatten(-1, (grid.num_blocks, grid.block_size)).sum(-1)
    a_v, a_s = rep_scores
    return torch.stack([pool_key_blocks(a_v, grid), pool_offset_blocks(a_s, grid)])


def _pattern(
    q: torch.Tensor, true_dist: torch.Tensor, k_means: torch.Tensor, grid: BlockGrid, seqs: _Sequences,
    config: FlexPrefillConfig, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """§2: (distance [B, Hq], query_aware bool [B, Hq]) from the true block distribution â
    (true_dist [B, Hq, nb]) and the estimate ā = softmax(s · mean(Q̂) · K̄ᵀ) over real key blocks;
    q: the representative rows [B, r, Hq, D]."""
    q_heads, kv_heads = q.shape[2], k_means.shape[1]
    n, r = grid.k_len, grid.num_representative
    dtype = k_means.dtype
    if seqs.key_valid is None and seqs.query_rows is None and r & (r - 1) == 0:
        # Dividing by a power of two is exact, however it is done.
        q_rep_mean = q.to(dtype).sum(1) / r  # [B, Hq, D]
    else:  # padding (and cache) rows are left out of the mean
        rep_valid = (torch.arange(n - r, n, device=q.device)[None, :] >= seqs.query_start[:, None]).to(dtype)
        # q itself, not its upcast copy: the product promotes to the compute dtype, and x·1, x·0 are exact.
        q_rep_mean = (q * rep_valid[:, :, None, None]).sum(1) / rep_valid.sum(1).clamp_min(1)[:, None, None]
    est_logits = (q_rep_mean.unflatten(1, (kv_heads, q_heads // kv_heads)) @ k_means.transpose(-1, -2)).flatten(1, 2)
    est_logits = est_logits * softmax_scale  # [B, Hq, nb]
    if seqs.padding_block is not None:
        est_logits = est_logits.masked_fill(seqs.padding_block, -math.inf)
    distance = js_distance(torch.softmax(est_logits, dim=-1), true_dist)  # [B, Hq]
    return distance, distance < config.tau


def _vertical_slash_blocks(
    rep_scores: torch.Tensor, block_scores: torch.Tensor, query_aware: torch.Tensor, grid: BlockGrid,
    seqs: _Sequences, config: FlexPrefillConfig, stages: _Stages,
) -> tuple[torch.Tensor, torch.Tensor]:
    """§3: (vertical, slash) bool [B, Hq, nb] -- the kb_v best key blocks and kb_s best offset blocks.

    Budgets by γ-coverage of the token scores rep_scores [2, B, Hq, n], turned into blocks and
    clamped; query-aware heads keep the minimum budget. Overwrites block_scores[0] (â, not needed
    after §2): padding blocks are set below every real block, so they are never candidates.
    With ``stages.vertical_slash`` (the "triton" stages), all of it in one launch (``coverage_triton``).
    """
    min_blocks = min(config.min_budget_blocks, grid.num_blocks)
    if seqs.padding_block is not None:
        block_scores[0].masked_fill_(seqs.padding_block, -1.0)
    if stages.vertical_slash is not None:
        least, most = budget_limits(grid, config)
        # Rows no budget reads (query-aware heads, dense sequences) are not searched (None: the host knows of none).
        chosen = stages.vertical_slash(rep_scores, block_scores, query_aware, config.gamma, grid.block_size,
                                       least, most, min_blocks, short=None if seqs.short_all is False else seqs.short)
        vertical, slash = chosen.unbind(0)
        return vertical, slash
    token_budget = budget_blocks(coverage_counts(rep_scores, config.gamma), grid, config)  # [2, B, Hq]
    block_budget = torch.where(query_aware, min_blocks, token_budget)  # [2, B, Hq]
    # Vertical and slash blocks by one sort: rows are independent.
    vertical, slash = top_blocks(block_scores, block_budget).unbind(0)
    return vertical, slash


def _query_aware_coverage(
    q_means: torch.Tensor, k_means: torch.Tensor, blocked: torch.Tensor, pair_index: torch.Tensor,
    softmax_scale: float, gamma: float, mask: Callable = coverage_mask,
) -> torch.Tensor:
    """§4 for a chunk of hc heads: bool [B, hc, P], the global γ-coverage of P = row-softmax(s · Q̄K̄ᵀ).

    q_means [B, hc, nqb, D], k_means [B, hc, nb, D]; blocked bool [1 or B, nqb, nb]; pair_index
    int64 [P] (``causal_pair_index``). The coverage runs over the block-causal pairs only (the others
    have probability 0 and are never kept): a gather keeps their row-major order, hence ties.
    """
    block_logits = q_means @ k_means.transpose(-1, -2)  # [B, hc, nqb, nb]
    block_probs = torch.softmax(block_logits.mul_(softmax_scale).masked_fill_(blocked[:, None], -math.inf), dim=-1)
    pair_probs = torch.nan_to_num_(block_probs.flatten(2).index_select(-1, pair_index), nan=0.0)  # [B, hc, P]
    return _pair_coverage(pair_probs, gamma, mask)


def _pair_coverage(pair_probs: torch.Tensor, gamma: float, mask: Callable) -> torch.Tensor:
    """bool [B, hc, P]: the γ-coverage of the row-softmax probabilities pair_probs [B, hc, P] (each
    query block's row sums to 1 or 0), normalised over all pairs of a head (overwritten)."""
    pair_probs = pair_probs.div_(pair_probs.sum(-1, keepdim=True).clamp_min(torch.finfo(pair_probs.dtype).tiny))
    return mask(pair_probs, gamma)


def _query_block_means(
    q: torch.Tensor, grid: BlockGrid, seqs: _Sequences, dtype: torch.dtype, counts: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Q̄ of §4: [B, Hq, nqb, D] in ``dtype``, each present query block's mean over its real query rows.
    counts: optional ``scores.block_counts`` of those rows (the caller's, shared with the key means)."""
    q_len = q.shape[1]
    q_valid = None
    if seqs.query_rows is not None:
        q_valid = torch.arange(grid.k_len - q_len, grid.k_len, device=q.device)[None, :] >= seqs.query_start[:, None]
    elif seqs.key_valid is not None:
        q_valid = seqs.key_valid[:, grid.k_len - q_len :]
    return block_means(q, q_valid, grid, dtype, counts).permute(0, 2, 1, 3)[:, :, -grid.num_query_blocks :]


def _compose(
    q_means: torch.Tensor, k_means: torch.Tensor, parts: MaskParts, grid: BlockGrid, seqs: _Sequences,
    config: FlexPrefillConfig, softmax_scale: float, stages: _Stages,
) -> BlockStructure:
    """§5: the packed structure from ``parts`` and the §4 estimate, a chunk of query heads at a time.

    The block masks are nqb x nb per head: each chunk's estimate (§4) is computed, then composed with
    the vertical/slash blocks, sink, diagonal and block-causal rules into ``indices`` / ``counts``.
    q_means: [B, Hq, nqb, D], the query-block means; k_means: [B, Hkv, nb, D], the key-block means.
    """
    batch, q_heads = q_means.shape[:2]
    nb, nqb = grid.num_blocks, grid.num_query_blocks
    groups = q_heads // k_means.shape[1]
    device = q_means.device
    if stages.estimate is None:
        # Each query head's KV-head means, by one copy (the Triton estimate reads them by index).
        k_means = k_means[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2)  # [B, Hq, nb, D]
        pair_index = causal_pair_index(grid, device)  # [P]: the block-causal pairs, row-major
        blocked = _blocked(grid, seqs)
    indices = torch.empty(batch, q_heads, nqb, nb, dtype=torch.int32, device=device)
    counts = torch.empty(batch, q_heads, nqb, dtype=torch.int32, device=device)
    chunk = max(1, min(q_heads, _MASK_CHUNK_BYTES // (_MASK_BYTES_PER_PAIR * batch * nqb * nb)))
    for h0 in range(0, q_heads, chunk):
        h1 = min(h0 + chunk, q_heads)
        if stages.estimate is None:
            estimate = _query_aware_coverage(
                q_means[:, h0:h1], k_means[:, h0:h1], blocked, pair_index, softmax_scale, config.gamma, stages.mask
            )
        else:
            # Only query-aware heads read their estimate: the kernels skip the others' rows (left unwritten).
            pair_probs = stages.estimate(q_means, k_means, seqs.sink, seqs.query_rows, grid, softmax_scale, h0, h1 - h0,
                                         query_aware=parts.query_aware)
            needed = parts.query_aware[:, h0:h1].contiguous()
            estimate = _pair_coverage(pair_probs, config.gamma, functools.partial(stages.mask, rows_needed=needed))
        stages.compose(parts, estimate, grid, indices, counts, h0)
    return BlockStructure(indices=indices, counts=counts, grid=grid)
