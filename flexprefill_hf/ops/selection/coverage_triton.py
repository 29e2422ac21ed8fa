"""Triton version of the γ-coverage rule (``coverage.coverage_counts`` / ``coverage_mask``) without a sort.

The rule, as ``coverage.py`` and ``reference.coverage_count`` compute it: sort a row descending (stable),
``before[i] = cumsum[i] - x[i]``, keep the entries with ``before[i] < γ``. Here one program per row finds
the same boundary by a threshold search over the entries' bit patterns (non-negative floats order as
their bits do), ``PROBES`` thresholds per pass over the row, and never orders the row:

* ``pred(t)``: is the *last* entry ``>= t`` (in the sorted order) kept? Its running sum is
  ``Σ_{x >= t} x`` and its value ``min{x >= t}``, so one pass gives ``pred`` at every probe.
  ``pred`` only flips once as t falls (the running sums only grow), so a K-ary search over the
  keys finds the smallest key ``t*`` with ``pred`` true in ``ceil(log_K(keys))`` passes: every entry
  ``>= t*`` is kept and the last tie run of them too.
* The boundary is the next smaller value ``w = max{x < t*}`` with its ``e`` ties: in the sorted order
  they follow the ``Σ_{x >= t*} x`` of the larger entries, so tie ``r`` (0-based) has running sum
  ``G + (r + 1) w`` and is kept when ``fl(fl(G + (r + 1) w) - w) < γ``; a search over ``r`` counts them,
  and the first ``c`` ties by index are the ones the stable sort puts first (the mask's tie rank is a
  running ``cumsum`` in index order).

Arithmetic, so that the result equals the sorted cumsum: running sums in float64 (torch's CPU
``cumsum`` accumulates float32 in double as well), rounded to the row's dtype, ``x`` subtracted in that
dtype, compared with γ rounded to that dtype (as ``tensor < float`` does). The sums here are
reductions in another order than the sequential cumsum; they are the same number whenever those
float64 sums are exact: for float32 rows, whenever every kept entry is at least 2^-29 and the sums
stay below 2 (an entry's lowest bit is then at least the double ulp of any partial sum). A row of
probabilities summing to 1 has its boundary entry at about ``(1 - γ) / L`` or more (the entries at or
below it carry the remaining mass), so this holds up to tens of millions of entries at γ = 0.9.
Ties, zeros and dyadic values are exact in any order. The one-flip argument also needs consecutive
running sums to round monotonically, which holds when the boundary entries are at least one ulp of γ
in the row's dtype. For float64 rows the float64 sums themselves round: the counts then agree unless a
boundary sum lies within rounding (~L·2^-53) of γ. (torch's CUDA ``cumsum`` sums float32 in float32, in
a scan order: the sort path it replaces was exact on CUDA under no such condition either.)

The same search with the rule "the k largest, ties to the lower index" (``pred(t)``: at most k entries
are ``>= t``; integer counts, exact) picks §3's blocks: :func:`vertical_slash_blocks_triton` runs, per
row, the coverage search on the token scores, the budget, and this top-k search on the block scores, in
one launch (``coverage.budget_blocks`` and ``top_blocks`` are its PyTorch version).

Rows: the last dim of a contiguous tensor, entries >= 0 (probabilities; no NaN); entries < 0 are never
kept (padding blocks of §3).
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from ..attention.block_sparse_triton import launch_device

# Thresholds evaluated per pass over a row (3 bits of the key per pass): more probes cost fp64 work per entry,
# fewer cost passes over the row.
_PROBES = 8


@triton.jit
def _key_value(key, FP64: tl.constexpr):
    """The float whose bit pattern is ``key`` (int64; a non-negative float's key is its bits)."""
    if FP64:
        return key.to(tl.float64, bitcast=True)
    return key.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _before(total, x, FP64: tl.constexpr):
    """The sorted cumsum's ``before`` of an entry x whose float64 running sum is total: rounded to the
    row's dtype, then x subtracted in that dtype (``torch.cumsum(o) - o``)."""
    if FP64:
        return total - x
    return total.to(tl.float32) - x


@triton.jit
def _search_step(lo, hi, probe, pred):
    """One K-ary search step: (lo, hi) with hi the smallest probe where pred holds (else hi) and lo the
    largest probe below it (else lo). Invariant: pred(lo) false, pred(hi) true."""
    new_hi = tl.min(tl.where(pred, probe, hi), 0)
    new_lo = tl.max(tl.where(probe < new_hi, probe, lo), 0)
    return new_lo, new_hi


@triton.jit
def _boundary(x_row, length, limit, key_hi, BLOCK: tl.constexpr, PROBES: tl.constexpr, KEY_PASSES: tl.constexpr,
              RANK_PASSES: tl.constexpr, FP64: tl.constexpr, TOP_K: tl.constexpr):
    """Where a row's rule stops, without ordering the row: (t*, w, tie_kept, kept). The entries kept are
    those >= t* (``kept`` of them) and the first ``tie_kept`` entries equal to w = max{x < t*} by index.

    Rule (module docstring): the γ-coverage of the sorted cumsum with γ = ``limit`` (a float in the row's
    dtype), or with TOP_K the ``limit`` (an int) largest entries, ties to the lower index. Entries < 0 are
    never kept (padding); the row is x_row[0:length], contiguous.
    """
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, PROBES).to(tl.int64)
    # pred(t): the last entry >= t in the sorted order is kept (vacuously when there is none). Search the keys
    # for the smallest t* where it holds: pred(-1) is false by convention, pred(key_hi = +inf) true.
    lo = tl.full([], -1, tl.int64)
    hi = tl.full([], key_hi, tl.int64)
    for _ in tl.static_range(KEY_PASSES):
        step = tl.maximum((hi - lo + PROBES - 1) // PROBES, 1)
        probe = tl.minimum(lo + (offs_k + 1) * step, hi)  # [K]
        t = _key_value(probe, FP64)  # [K]
        if TOP_K:
            at_least = tl.zeros([PROBES], dtype=tl.int64)
            for start in range(0, length, BLOCK):
                x = tl.load(x_row + start + offs, mask=start + offs < length, other=-1.0)  # [BLOCK]; -1: below all
                at_least += tl.sum((x[:, None] >= t[None, :]).to(tl.int64), 0)
            pred = at_least <= limit  # the last entry >= t sits at position at_least - 1
        else:
            total = tl.zeros([PROBES], dtype=tl.float64)
            least = tl.full([PROBES], float("inf"), dtype=t.dtype)
            for start in range(0, length, BLOCK):
                x = tl.load(x_row + start + offs, mask=start + offs < length, other=-1.0)
                ge = x[:, None] >= t[None, :]  # [BLOCK, K]
                total += tl.sum(tl.where(ge, x[:, None].to(tl.float64), 0.0), 0)
                least = tl.minimum(least, tl.min(tl.where(ge, x[:, None], float("inf")), 0))
            pred = (least == float("inf")) | (_before(total, least, FP64) < limit)
        lo, hi = _search_step(lo, hi, probe, pred)
    t_star = _key_value(hi, FP64)

    # The kept larger entries' sum and count, and the boundary value w = max{0 <= x < t*} with its ties.
    larger = tl.zeros([], dtype=tl.float64)
    kept = tl.zeros([], dtype=tl.int64)
    w = tl.full([], float("-inf"), dtype=t_star.dtype)
    ties = tl.zeros([], dtype=tl.int64)
    for start in range(0, length, BLOCK):
        valid = start + offs < length
        x = tl.load(x_row + start + offs, mask=valid, other=-1.0)
        ge = valid & (x >= t_star)
        larger += tl.sum(tl.where(ge, x.to(tl.float64), 0.0), 0)
        kept += tl.sum(ge.to(tl.int64), 0)
        below = valid & (x < t_star) & (x >= 0)
        block_max = tl.max(tl.where(below, x, float("-inf")), 0)
        block_ties = tl.sum((below & (x == block_max)).to(tl.int64), 0)
        ties = tl.where(block_max > w, block_ties, tl.where(block_max == w, ties + block_ties, ties))
        w = tl.maximum(w, block_max)
    w = tl.where(ties > 0, w, 0.0)  # no boundary value: any finite stand-in (no tie is kept)

    if TOP_K:
        tie_kept = tl.minimum(tl.maximum(limit - kept, 0), ties)
    else:
        # Tie r (0-based) has running sum larger + (r + 1) w; search the first dropped r in [0, ties].
        r_lo = tl.full([], -1, tl.int64)
        r_hi = ties
        w64 = w.to(tl.float64)
        for _ in tl.static_range(RANK_PASSES):
            step = tl.maximum((r_hi - r_lo + PROBES - 1) // PROBES, 1)
            probe = tl.minimum(r_lo + (offs_k + 1) * step, r_hi)  # [K]
            dropped = (probe < ties) & ~(_before(larger + (probe + 1).to(tl.float64) * w64, w, FP64) < limit)
            r_lo, r_hi = _search_step(r_lo, r_hi, probe, dropped | (probe >= ties))
        tie_kept = r_hi
    return t_star, w, tie_kept, kept


@triton.jit
def _store_kept(x_row, out_row, length, t_star, w, tie_kept, BLOCK: tl.constexpr):
    """Write the kept mask of a row (int8) from its :func:`_boundary`: ties of w kept by index."""
    offs = tl.arange(0, BLOCK)
    seen = tl.zeros([], dtype=tl.int64)
    for start in range(0, length, BLOCK):
        valid = start + offs < length
        x = tl.load(x_row + start + offs, mask=valid, other=-1.0)
        tie = (valid & (x == w)).to(tl.int64)
        rank = seen + tl.cumsum(tie, 0) - tie  # ties of w before this entry, in index order
        keep = (x >= t_star) | ((tie != 0) & (rank < tie_kept))
        tl.store(out_row + start + offs, keep.to(tl.int8), mask=valid)
        seen += tl.sum(tie, 0)


@triton.jit
def _from_bits(bits, FP64: tl.constexpr):
    """A float scalar from its bit pattern (``float_bits``) in the row's dtype."""
    if FP64:
        return tl.full([], bits, tl.int64).to(tl.float64, bitcast=True)
    return tl.full([], bits, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _coverage_kernel(
    X, Out, Needed, length, gamma_bits, key_hi,
    BLOCK: tl.constexpr, PROBES: tl.constexpr, KEY_PASSES: tl.constexpr, RANK_PASSES: tl.constexpr,
    FP64: tl.constexpr, MASK: tl.constexpr, HAS_NEEDED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * length
    if HAS_NEEDED:  # a row nobody reads: no pass over it, nothing written (an empty row to every loop)
        length = tl.where(tl.load(Needed + row) != 0, length, 0)
    t_star, w, tie_kept, kept = _boundary(x_row, length, _from_bits(gamma_bits, FP64), key_hi, BLOCK, PROBES,
                                          KEY_PASSES, RANK_PASSES, FP64, False)
    if MASK:
        _store_kept(x_row, Out + row * length, length, t_star, w, tie_kept, BLOCK)
    else:
        tl.store(Out + row, kept + tie_kept)


@triton.jit
def _vertical_slash_kernel(
    Scores, BlockScores, QueryAware, Out, num_rows, n, num_blocks, gamma_bits, key_hi, block_size,
    min_blocks, most_blocks, query_aware_blocks,
    BLOCK: tl.constexpr, BLOCK_NB: tl.constexpr, PROBES: tl.constexpr, KEY_PASSES: tl.constexpr,
    RANK_PASSES: tl.constexpr, FP64: tl.constexpr, ALL_TOKENS: tl.constexpr,
):
    # Row (kind, b, h): kind 0 vertical (key blocks), 1 slash (offset blocks).
    row = tl.program_id(0).to(tl.int64)
    bh = row % num_rows
    if ALL_TOKENS:  # γ >= 1: every token, whatever the rounding of the running sum (coverage_counts)
        tokens = tl.full([], n, tl.int64)
    else:
        t_star, w, tie_kept, kept = _boundary(Scores + row * n, n, _from_bits(gamma_bits, FP64), key_hi, BLOCK, PROBES,
                                              KEY_PASSES, RANK_PASSES, FP64, False)
        tokens = kept + tie_kept
    # Budget: tokens -> blocks, floor(tokens / B) + 1 clamped (one clamp: max wins when min > max).
    budget = tl.minimum(tl.maximum(tokens // block_size + 1, min_blocks), most_blocks)
    budget = tl.where(tl.load(QueryAware + bh) != 0, query_aware_blocks, budget)
    x_row = BlockScores + row * num_blocks
    t_star, w, tie_kept, kept = _boundary(x_row, num_blocks, budget, key_hi, BLOCK_NB, PROBES, KEY_PASSES,
                                          RANK_PASSES, FP64, True)
    _store_kept(x_row, Out + row * num_blocks, num_blocks, t_star, w, tie_kept, BLOCK_NB)


def _passes(width: int) -> int:
    """Passes of the K-ary search that shrink an interval of ``width`` keys to one."""
    passes = 0
    while width > 1:
        width = -(-width // _PROBES)
        passes += 1
    return passes


def refuse_cuda_float64(name: str, tensor: torch.Tensor) -> None:
    """The one-launch selection kernels (this module, ``pattern_triton.py``, ``estimate_triton.py``) take
    float64 only under the interpreter: on the H200 (2026-12-02) six of their float64 tests failed while
    every float32 one passed (the logs were lost; the cause is not known), so a float64 CUDA tensor is
    refused rather than risk a wrong selection. ``select_blocks`` never sends one: it routes float64 on
    CUDA to the "compose" stages (sorts in PyTorch, §5 in Triton), as it did before these kernels."""
    if tensor.dtype == torch.float64 and tensor.is_cuda:
        raise TypeError(
            f"{name}.dtype=torch.float64 on CUDA is not supported by the one-launch selection kernels (their float64 "
            "tests failed on the H200); expected torch.float32 on CUDA (float64 runs under TRITON_INTERPRET=1), or "
            "select_blocks(..., structure_backend='compose')"
        )


def _check_rows(name: str, scores: torch.Tensor) -> None:
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}.dtype={scores.dtype} is not supported; expected torch.float32 or torch.float64")
    refuse_cuda_float64(name, scores)
    if not scores.is_contiguous():
        raise ValueError(f"{name} must be contiguous (rows along the last dim)")


def float_bits(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` in ``dtype`` (float32: rounded to nearest, as a comparison or product with
    a float32 tensor rounds a Python float), for kernels: Triton takes no float64 scalars."""
    if dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _keys(dtype: torch.dtype, gamma: float) -> dict:
    """γ's bit pattern in ``dtype``, the key of +inf, and the passes of the key search."""
    key_hi = 0x7FF0000000000000 if dtype == torch.float64 else 0x7F800000
    return dict(gamma_bits=float_bits(gamma, dtype), key_hi=key_hi, KEY_PASSES=_passes(key_hi + 2),
                FP64=dtype == torch.float64)


def _launch(scores: torch.Tensor, gamma: float, mask: bool, rows_needed: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
    _check_rows("scores", scores)
    length = scores.shape[-1]
    rows = scores.numel() // max(length, 1)
    if mask:
        out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    else:
        out = torch.empty(scores.shape[:-1], dtype=torch.long, device=scores.device)
    if rows == 0 or length == 0:
        if not mask:
            out.fill_(length)
        return out
    block = _block(length)
    with launch_device(scores):
        _coverage_kernel[(rows,)](
            scores, out.view(torch.int8) if mask else out, scores if rows_needed is None else rows_needed, length,
            **_keys(scores.dtype, gamma), BLOCK=block, PROBES=_PROBES, RANK_PASSES=_passes(length + 2), MASK=mask,
            HAS_NEEDED=rows_needed is not None, num_warps=8 if block >= 512 else 4,
        )
    return out


def _block(length: int) -> int:
    """Entries a program reads per step."""
    return min(1024, max(16, triton.next_power_of_2(length)))


def coverage_counts_triton(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """``coverage.coverage_counts`` by a threshold search (module docstring): int64 [...], the fewest
    largest entries of each row of scores [..., L] (float32/float64, contiguous, >= 0) whose sum
    reaches gamma, L if they never do. One launch."""
    if gamma >= 1.0:  # all the attention: every entry (as coverage.coverage_counts)
        return torch.full(scores.shape[:-1], scores.shape[-1], dtype=torch.long, device=scores.device)
    return _launch(scores, gamma, mask=False)


def coverage_mask_triton(
    scores: torch.Tensor, gamma: float, rows_needed: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``coverage.coverage_mask`` by a threshold search: bool [..., L], the entries that rule keeps
    (ties at the boundary to the lower index, as the stable sort). One launch.

    rows_needed: optional bool [...] (contiguous): rows where it is False are neither read nor written
    (their output stays uninitialised; §4 needs only the query-aware heads' rows)."""
    if gamma >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if rows_needed is not None:
        assert rows_needed.shape == scores.shape[:-1] and rows_needed.is_contiguous(), "rows_needed: bool [...]"
    return _launch(scores, gamma, mask=True, rows_needed=rows_needed)


def vertical_slash_blocks_triton(
    scores: torch.Tensor, block_scores: torch.Tensor, query_aware: torch.Tensor, gamma: float, block_size: int,
    min_blocks: int, most_blocks: int, query_aware_blocks: int,
) -> torch.Tensor:
    """§3 in one launch: bool [2, B, Hq, nb], the vertical (row 0) and slash (row 1) blocks.

    scores: the token scores a_v, a_s [2, B, Hq, n]; block_scores: their block sums [2, B, Hq, nb] (both
    contiguous, float32/float64; block scores < 0 mark padding blocks, never chosen); query_aware bool
    [B, Hq]. Per row: the budget ``min(max(c // block_size + 1,
    min_blocks), most_blocks)`` from the γ-coverage count c of its token scores (``query_aware_blocks`` for
    query-aware heads), then that many highest block scores, ties to the lower index: what
    ``coverage.budget_blocks`` and ``top_blocks`` give, except that padding blocks are never chosen (the
    composition drops them: ``compose.MaskParts``).
    """
    _check_rows("scores", scores)
    _check_rows("block_scores", block_scores)
    assert block_scores.dtype == scores.dtype and block_scores.shape[:-1] == scores.shape[:-1]
    assert scores.shape[0] == 2 and query_aware.shape == scores.shape[1:3] and query_aware.is_contiguous()
    n, num_blocks = scores.shape[-1], block_scores.shape[-1]
    rows = scores.numel() // n
    out = torch.empty(block_scores.shape, dtype=torch.bool, device=scores.device)
    with launch_device(scores):
        _vertical_slash_kernel[(rows,)](
            scores, block_scores, query_aware, out.view(torch.int8), rows // 2, n, num_blocks,
            **_keys(scores.dtype, min(gamma, 1.0)), block_size=block_size, min_blocks=min_blocks,
            most_blocks=most_blocks, query_aware_blocks=query_aware_blocks, BLOCK=_block(n),
            BLOCK_NB=_block(num_blocks), PROBES=_PROBES, RANK_PASSES=_passes(n + 2), ALL_TOKENS=gamma >= 1.0,
            num_warps=8,
        )
    return out
