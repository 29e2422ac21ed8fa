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

Long rows can be searched by many programs per row, one launch per pass (``_launch_split``): the same probes,
the same arithmetic, the sums reduced over segments in a fixed order: rows of ``SPLIT_FROM`` entries or more
(65536, measured; or any row, with ``segment``).

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
from ..runtime import cdiv, next_power_of_2

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
def _probes(lo, hi, PROBES: tl.constexpr):
    """The K probes of a search step on the integer interval (lo, hi]: evenly spaced, the last one hi."""
    offs_k = tl.arange(0, PROBES).to(tl.int64)
    step = tl.maximum((hi - lo + PROBES - 1) // PROBES, 1)
    return tl.minimum(lo + (offs_k + 1) * step, hi)  # [K]


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
    # pred(t): the last entry >= t in the sorted order is kept (vacuously when there is none). Search the keys
    # for the smallest t* where it holds: pred(-1) is false by convention, pred(key_hi = +inf) true.
    lo = tl.full([], -1, tl.int64)
    hi = tl.full([], key_hi, tl.int64)
    for _ in tl.static_range(KEY_PASSES):
        probe = _probes(lo, hi, PROBES)
        t = _key_value(probe, FP64)  # [K]
        if TOP_K:
            at_least = tl.zeros([PROBES], dtype=tl.int64)
            for start in range(0, length, BLOCK):
                x = tl.load(x_row + start + offs, mask=start + offs < length, other=-1.0)  # [BLOCK]; -1: below all
                at_least += tl.sum((x[:, None] >= t[None, :]).to(tl.int64), 0)
            pred = at_least <= limit  # the last entry >= t sits at position at_least - 1
        else:
            total, least = _probe_sums(x_row, 0, length, t, BLOCK, PROBES)
            pred = (least == float("inf")) | (_before(total, least, FP64) < limit)
        lo, hi = _search_step(lo, hi, probe, pred)
    t_star = _key_value(hi, FP64)

    larger, kept, w, ties = _boundary_values(x_row, 0, length, t_star, BLOCK)
    w = tl.where(ties > 0, w, 0.0)  # no boundary value: any finite stand-in (no tie is kept)

    if TOP_K:
        tie_kept = tl.minimum(tl.maximum(limit - kept, 0), ties)
    else:
        tie_kept = _ties_kept(larger, w, ties, limit, PROBES, RANK_PASSES, FP64)
    return t_star, w, tie_kept, kept


@triton.jit
def _probe_sums(x_row, begin, end, t, BLOCK: tl.constexpr, PROBES: tl.constexpr):
    """Over entries [begin, end) of a row, for each probe t[k]: the float64 sum of the entries >= t[k] and the
    least of them (+inf if none)."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([PROBES], dtype=tl.float64)
    least = tl.full([PROBES], float("inf"), dtype=t.dtype)
    for start in range(begin, end, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < end, other=-1.0)  # -1: below every probe
        ge = x[:, None] >= t[None, :]  # [BLOCK, K]
        total += tl.sum(tl.where(ge, x[:, None].to(tl.float64), 0.0), 0)
        least = tl.minimum(least, tl.min(tl.where(ge, x[:, None], float("inf")), 0))
    return total, least


@triton.jit
def _boundary_values(x_row, begin, end, t_star, BLOCK: tl.constexpr):
    """Over entries [begin, end) of a row: the sum (float64) and count of the entries >= t*, the boundary value
    w = max{0 <= x < t*} (-inf if none) and how many entries equal it."""
    offs = tl.arange(0, BLOCK)
    larger = tl.zeros([], dtype=tl.float64)
    kept = tl.zeros([], dtype=tl.int64)
    w = tl.full([], float("-inf"), dtype=t_star.dtype)
    ties = tl.zeros([], dtype=tl.int64)
    for start in range(begin, end, BLOCK):
        valid = start + offs < end
        x = tl.load(x_row + start + offs, mask=valid, other=-1.0)
        ge = valid & (x >= t_star)
        larger += tl.sum(tl.where(ge, x.to(tl.float64), 0.0), 0)
        kept += tl.sum(ge.to(tl.int64), 0)
        below = valid & (x < t_star) & (x >= 0)
        block_max = tl.max(tl.where(below, x, float("-inf")), 0)
        block_ties = tl.sum((below & (x == block_max)).to(tl.int64), 0)
        ties = tl.where(block_max > w, block_ties, tl.where(block_max == w, ties + block_ties, ties))
        w = tl.maximum(w, block_max)
    return larger, kept, w, ties


@triton.jit
def _ties_kept(larger, w, ties, limit, PROBES: tl.constexpr, RANK_PASSES: tl.constexpr, FP64: tl.constexpr):
    """How many of the ``ties`` entries equal to the boundary value w are kept, when the larger kept entries sum
    to ``larger`` (float64): tie r (0-based) has running sum larger + (r + 1) w; search the first dropped r."""
    r_lo = tl.full([], -1, tl.int64)
    r_hi = ties
    w64 = w.to(tl.float64)
    for _ in tl.static_range(RANK_PASSES):
        probe = _probes(r_lo, r_hi, PROBES)
        dropped = (probe < ties) & ~(_before(larger + (probe + 1).to(tl.float64) * w64, w, FP64) < limit)
        r_lo, r_hi = _search_step(r_lo, r_hi, probe, dropped | (probe >= ties))
    return r_hi


@triton.jit
def _store_kept(x_row, out_row, begin, length, seen, t_star, w, tie_kept, BLOCK: tl.constexpr):
    """Write the kept mask of entries [begin, length) of a row (bool or int8) from its :func:`_boundary`: ties of w kept
    by index, ``seen`` of them before ``begin``."""
    offs = tl.arange(0, BLOCK)
    seen = seen.to(tl.int64)
    for start in range(begin, length, BLOCK):
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
        _store_kept(x_row, Out + row * length, 0, length, tl.zeros([], dtype=tl.int64), t_star, w, tie_kept, BLOCK)
    else:
        tl.store(Out + row, kept + tie_kept)


@triton.jit
def _vertical_slash_kernel(
    Scores, BlockScores, QueryAware, Short, Tokens, Out, num_rows, num_heads, n, num_blocks, gamma_bits, key_hi,
    block_size, min_blocks, most_blocks, query_aware_blocks,
    BLOCK: tl.constexpr, BLOCK_NB: tl.constexpr, PROBES: tl.constexpr, KEY_PASSES: tl.constexpr,
    RANK_PASSES: tl.constexpr, FP64: tl.constexpr, ALL_TOKENS: tl.constexpr, TOKENS_GIVEN: tl.constexpr,
    HAS_SHORT: tl.constexpr,
):
    # Row (kind, b, h): kind 0 vertical (key blocks), 1 slash (offset blocks).
    row = tl.program_id(0).to(tl.int64)
    bh = row % num_rows
    query_aware = tl.load(QueryAware + bh) != 0
    if ALL_TOKENS:  # γ >= 1: every token, whatever the rounding of the running sum (coverage_counts)
        tokens = tl.full([], n, tl.int64)
    elif TOKENS_GIVEN:  # long rows: counted beforehand by the split search
        tokens = tl.load(Tokens + row)
    else:
        # The token count only sets the budget of a vertical-slash head of a sequence that runs sparse: for a
        # query-aware head (its budget is fixed) or a dense sequence (§5 gives it every block) the row is not
        # searched (an empty row: no pass over it).
        needed = ~query_aware
        if HAS_SHORT:
            needed = needed & (tl.load(Short + bh // num_heads) == 0)
        t_star, w, tie_kept, kept = _boundary(Scores + row * n, tl.where(needed, n, 0), _from_bits(gamma_bits, FP64),
                                              key_hi, BLOCK, PROBES, KEY_PASSES, RANK_PASSES, FP64, False)
        tokens = kept + tie_kept
    # Budget: tokens -> blocks, floor(tokens / B) + 1 clamped (one clamp: max wins when min > max).
    budget = tl.minimum(tl.maximum(tokens // block_size + 1, min_blocks), most_blocks)
    budget = tl.where(query_aware, query_aware_blocks, budget)
    x_row = BlockScores + row * num_blocks
    t_star, w, tie_kept, kept = _boundary(x_row, num_blocks, budget, key_hi, BLOCK_NB, PROBES, KEY_PASSES,
                                          RANK_PASSES, FP64, True)
    _store_kept(x_row, Out + row * num_blocks, 0, num_blocks, tl.zeros([], dtype=tl.int64), t_star, w, tie_kept,
                BLOCK_NB)


# Long rows: the same search by many programs per row. One program per row makes KEY_PASSES dependent passes over
# its row; at 128K tokens (§3) and 524K causal block pairs (§4) that serial depth was the selection's cost on the
# H200 (benchmarks/RESULTS.md, 2026-12-02). Split, a row's segments each sum their part for every probe, and
# the next launch's programs each reduce those partials (in a fixed order) to the next probes: one launch per
# pass, then one for the boundary values and one for the output. With SPLIT_FROM set, rows of that many entries
# or more take this path (``segment`` forces it); shorter ones stay in one launch, where launches, not depth, are
# the cost. Measured on the H200 (benchmarks/RESULTS.md, 2026-12-02; ``benchmarks/profile_selection.py --stages
# triton --split-from 65536``): the selection took 3.0 / 4.9 / 7.2 ms at 64K / 96K / 128K keys with it (the sort
# stages 4.2 / 6.7 / 9.4), 15.9 at 128K without it (32 q heads). None: never split.
SPLIT_FROM: Optional[int] = 65536
_SEGMENT = 4096


@triton.jit
def _split_state(LoHi, PartTotal, PartLeast, row, num_rows, num_segments, index, limit, PROBES: tl.constexpr,
                 S_BLOCK: tl.constexpr, FP64: tl.constexpr):
    """(lo, hi) after pass ``index``: its probes came from LoHi[index]; its partials are in the buffers of its
    parity, [rows, segments, K]."""
    lo = tl.load(LoHi + (index * num_rows + row) * 2)
    hi = tl.load(LoHi + (index * num_rows + row) * 2 + 1)
    probe = _probes(lo, hi, PROBES)
    offs_k = tl.arange(0, PROBES)
    offs_s = tl.arange(0, S_BLOCK)
    parity = (index % 2).to(tl.int64) * num_rows * num_segments * PROBES
    total = tl.zeros([PROBES], dtype=tl.float64)
    least = tl.full([PROBES], float("inf"), dtype=tl.float64 if FP64 else tl.float32)
    for s0 in range(0, num_segments, S_BLOCK):
        seg = s0 + offs_s
        at = parity + (row * num_segments + seg)[:, None] * PROBES + offs_k[None, :]
        m = (seg < num_segments)[:, None]
        total += tl.sum(tl.load(PartTotal + at, mask=m, other=0.0), 0)
        least = tl.minimum(least, tl.min(tl.load(PartLeast + at, mask=m, other=float("inf")), 0))
    pred = (least == float("inf")) | (_before(total, least, FP64) < limit)
    return _search_step(lo, hi, probe, pred)


@triton.jit
def _segment_range(Needed, row, seg, length, SEGMENT: tl.constexpr, HAS_NEEDED: tl.constexpr):
    """[begin, end) of a program's segment; empty for a row nobody reads."""
    begin = seg.to(tl.int64) * SEGMENT
    end = tl.minimum(begin + SEGMENT, length)
    if HAS_NEEDED:
        end = tl.where(tl.load(Needed + row) != 0, end, begin)
    return begin, end


@triton.jit(do_not_specialize=["length", "num_segments", "index"])
def _split_pass_kernel(
    X, PartTotal, PartLeast, LoHi, Needed, length, num_segments, gamma_bits, key_hi, index,
    SEGMENT: tl.constexpr, BLOCK: tl.constexpr, PROBES: tl.constexpr, S_BLOCK: tl.constexpr, FP64: tl.constexpr,
    HAS_NEEDED: tl.constexpr, FIRST: tl.constexpr,
):
    """Pass ``index`` of the key search: the state after the previous pass, then this segment's partial sum and
    least entry >= each probe."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    num_rows = tl.num_programs(0)
    if FIRST:
        lo = tl.full([], -1, tl.int64)
        hi = tl.full([], key_hi, tl.int64)
    else:
        lo, hi = _split_state(LoHi, PartTotal, PartLeast, row, num_rows, num_segments, index - 1,
                              _from_bits(gamma_bits, FP64), PROBES, S_BLOCK, FP64)
    state = LoHi + (index * num_rows + row) * 2
    tl.store(state, lo, mask=seg == 0)
    tl.store(state + 1, hi, mask=seg == 0)
    t = _key_value(_probes(lo, hi, PROBES), FP64)  # [K]
    begin, end = _segment_range(Needed, row, seg, length, SEGMENT, HAS_NEEDED)
    total, least = _probe_sums(X + row * length, begin, end, t, BLOCK, PROBES)
    offs_k = tl.arange(0, PROBES)
    at = (index % 2).to(tl.int64) * num_rows * num_segments * PROBES + (row * num_segments + seg) * PROBES + offs_k
    tl.store(PartTotal + at, total)
    tl.store(PartLeast + at, least)


@triton.jit(do_not_specialize=["length", "num_segments", "last"])
def _split_boundary_kernel(
    X, PartTotal, PartLeast, LoHi, Needed, Larger, Kept, Below, Ties, length, num_segments, gamma_bits, last,
    SEGMENT: tl.constexpr, BLOCK: tl.constexpr, PROBES: tl.constexpr, S_BLOCK: tl.constexpr, FP64: tl.constexpr,
    HAS_NEEDED: tl.constexpr,
):
    """t* from the last pass (stored as LoHi[last + 1]), then this segment's sum and count of the entries >= t*,
    its largest entry below t* (>= 0) and how many equal that."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    num_rows = tl.num_programs(0)
    lo, hi = _split_state(LoHi, PartTotal, PartLeast, row, num_rows, num_segments, last, _from_bits(gamma_bits, FP64),
                          PROBES, S_BLOCK, FP64)
    state = LoHi + ((last + 1) * num_rows + row) * 2
    tl.store(state, lo, mask=seg == 0)
    tl.store(state + 1, hi, mask=seg == 0)
    t_star = _key_value(hi, FP64)
    begin, end = _segment_range(Needed, row, seg, length, SEGMENT, HAS_NEEDED)
    larger, kept, w, ties = _boundary_values(X + row * length, begin, end, t_star, BLOCK)
    at = row * num_segments + seg
    tl.store(Larger + at, larger)
    tl.store(Kept + at, kept)
    tl.store(Below + at, w)
    tl.store(Ties + at, ties)


@triton.jit(do_not_specialize=["length", "num_segments", "last"])
def _split_output_kernel(
    X, Out, LoHi, Needed, Larger, Kept, Below, Ties, length, num_segments, gamma_bits, last,
    SEGMENT: tl.constexpr, BLOCK: tl.constexpr, PROBES: tl.constexpr, S_BLOCK: tl.constexpr,
    RANK_PASSES: tl.constexpr, FP64: tl.constexpr, HAS_NEEDED: tl.constexpr, MASK: tl.constexpr,
):
    """The row's boundary from the segments' values (w = the largest of their values below t*, its ties in
    index order), then the count (MASK False: segment 0 writes it) or this segment's part of the mask."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    num_rows = tl.num_programs(0)
    t_star = _key_value(tl.load(LoHi + ((last + 1) * num_rows + row) * 2 + 1), FP64)
    offs_s = tl.arange(0, S_BLOCK)
    larger = tl.zeros([], dtype=tl.float64)
    kept = tl.zeros([], dtype=tl.int64)
    w = tl.full([], float("-inf"), dtype=t_star.dtype)
    for s0 in range(0, num_segments, S_BLOCK):
        m = s0 + offs_s < num_segments
        at = row * num_segments + s0 + offs_s
        larger += tl.sum(tl.load(Larger + at, mask=m, other=0.0), 0)
        kept += tl.sum(tl.load(Kept + at, mask=m, other=0), 0)
        w = tl.maximum(w, tl.max(tl.load(Below + at, mask=m, other=float("-inf")), 0))
    ties = tl.zeros([], dtype=tl.int64)
    before = tl.zeros([], dtype=tl.int64)  # ties of w in the segments before this one
    for s0 in range(0, num_segments, S_BLOCK):
        m = s0 + offs_s < num_segments
        at = row * num_segments + s0 + offs_s
        has_w = tl.load(Below + at, mask=m, other=float("-inf")) == w  # a segment's largest below t* is w
        seg_ties = tl.where(m & has_w, tl.load(Ties + at, mask=m, other=0), 0)
        ties += tl.sum(seg_ties, 0)
        before += tl.sum(tl.where(s0 + offs_s < seg, seg_ties, 0), 0)
    w = tl.where(ties > 0, w, 0.0)
    tie_kept = _ties_kept(larger, w, ties, _from_bits(gamma_bits, FP64), PROBES, RANK_PASSES, FP64)
    if MASK:
        begin, end = _segment_range(Needed, row, seg, length, SEGMENT, HAS_NEEDED)
        _store_kept(X + row * length, Out + row * length, begin, end, before, t_star, w, tie_kept, BLOCK)
    else:
        tl.store(Out + row, kept + tie_kept, mask=seg == 0)


def _launch_split(scores: torch.Tensor, out: torch.Tensor, gamma: float, mask: bool, segment: int,
                  rows_needed: Optional[torch.Tensor]) -> None:
    """The split search of rows [rows, L] into out (int64 [rows] counts, or a bool [rows, L]
    mask): KEY_PASSES launches, then the boundary and the output."""
    length = scores.shape[-1]
    rows = scores.numel() // length
    num_segments = cdiv(length, segment)
    keys = _keys(scores.dtype, gamma)
    passes = keys.pop("KEY_PASSES")
    device = scores.device
    part_total = torch.empty(2 * rows * num_segments * _PROBES, dtype=torch.float64, device=device)
    part_least = torch.empty(2 * rows * num_segments * _PROBES, dtype=scores.dtype, device=device)
    lo_hi = torch.empty((passes + 1) * rows * 2, dtype=torch.int64, device=device)
    larger = torch.empty(rows * num_segments, dtype=torch.float64, device=device)
    kept = torch.empty(rows * num_segments, dtype=torch.int64, device=device)
    below = torch.empty(rows * num_segments, dtype=scores.dtype, device=device)
    ties = torch.empty(rows * num_segments, dtype=torch.int64, device=device)
    needed = scores if rows_needed is None else rows_needed
    meta = dict(SEGMENT=segment, BLOCK=min(1024, max(16, next_power_of_2(segment))), PROBES=_PROBES,
                S_BLOCK=min(1024, max(16, next_power_of_2(num_segments))), FP64=keys["FP64"],
                HAS_NEEDED=rows_needed is not None)
    grid = (rows, num_segments)
    with launch_device(scores):
        for index in range(passes):
            _split_pass_kernel[grid](scores, part_total, part_least, lo_hi, needed, length, num_segments,
                                     keys["gamma_bits"], keys["key_hi"], index, FIRST=index == 0, **meta)
        _split_boundary_kernel[grid](scores, part_total, part_least, lo_hi, needed, larger, kept, below, ties, length,
                                     num_segments, keys["gamma_bits"], passes - 1, **meta)
        _split_output_kernel[grid if mask else (rows, 1)](
            scores, out, lo_hi, needed, larger, kept, below, ties, length, num_segments, keys["gamma_bits"],
            passes - 1, RANK_PASSES=_passes(length + 2), MASK=mask, **meta,
        )


def _split_segment(length: int, segment: Optional[int]) -> Optional[int]:
    """Entries per program of the split search, or None for one program per row."""
    if segment is not None:
        if segment < 1:
            raise ValueError(f"segment={segment} is not supported; expected a positive number of entries or None")
        return segment
    return _SEGMENT if SPLIT_FROM is not None and length >= SPLIT_FROM else None


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


def _launch(scores: torch.Tensor, gamma: float, mask: bool, rows_needed: Optional[torch.Tensor] = None,
            segment: Optional[int] = None) -> torch.Tensor:
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
    segment = _split_segment(length, segment)
    if segment is not None:
        _launch_split(scores, out, gamma, mask, segment, rows_needed)
        return out
    block = _block(length)
    with launch_device(scores):
        _coverage_kernel[(rows,)](
            scores, out, scores if rows_needed is None else rows_needed, length,
            **_keys(scores.dtype, gamma), BLOCK=block, PROBES=_PROBES, RANK_PASSES=_passes(length + 2), MASK=mask,
            HAS_NEEDED=rows_needed is not None, num_warps=8 if block >= 512 else 4,
        )
    return out


def _block(length: int) -> int:
    """Entries a program reads per step."""
    return min(1024, max(16, next_power_of_2(length)))


def coverage_counts_triton(scores: torch.Tensor, gamma: float, *, segment: Optional[int] = None) -> torch.Tensor:
    """``coverage.coverage_counts`` by a threshold search (module docstring): int64 [...], the fewest
    largest entries of each row of scores [..., L] (float32/float64, contiguous, >= 0) whose sum
    reaches gamma, L if they never do. One launch; rows of ``SPLIT_FROM`` entries or more when it is set (or any
    rows, given ``segment``, entries per program) by the split search, a launch per pass."""
    if gamma >= 1.0:  # all the attention: every entry (as coverage.coverage_counts)
        return torch.full(scores.shape[:-1], scores.shape[-1], dtype=torch.long, device=scores.device)
    return _launch(scores, gamma, mask=False, segment=segment)


def coverage_mask_triton(
    scores: torch.Tensor, gamma: float, rows_needed: Optional[torch.Tensor] = None, *, segment: Optional[int] = None
) -> torch.Tensor:
    """``coverage.coverage_mask`` by a threshold search: bool [..., L], the entries that rule keeps
    (ties at the boundary to the lower index, as the stable sort). One launch (long rows, or ``segment``:
    the split search, as :func:`coverage_counts_triton`).

    rows_needed: optional bool [...] (contiguous): rows where it is False are neither read nor written
    (their output stays uninitialised; §4 needs only the query-aware heads' rows)."""
    if gamma >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if rows_needed is not None:
        assert rows_needed.shape == scores.shape[:-1] and rows_needed.is_contiguous(), "rows_needed: bool [...]"
    return _launch(scores, gamma, mask=True, rows_needed=rows_needed, segment=segment)


def vertical_slash_blocks_triton(
    scores: torch.Tensor, block_scores: torch.Tensor, query_aware: torch.Tensor, gamma: float, block_size: int,
    min_blocks: int, most_blocks: int, query_aware_blocks: int, *, segment: Optional[int] = None,
    short: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """§3 in one launch: bool [2, B, Hq, nb], the vertical (row 0) and slash (row 1) blocks.

    scores: the token scores a_v, a_s [2, B, Hq, n]; block_scores: their block sums [2, B, Hq, nb] (both
    contiguous, float32/float64; block scores < 0 mark padding blocks, never chosen); query_aware bool
    [B, Hq]. Per row: the budget ``min(max(c // block_size + 1,
    min_blocks), most_blocks)`` from the γ-coverage count c of its token scores (``query_aware_blocks`` for
    query-aware heads), then that many highest block scores, ties to the lower index: what
    ``coverage.budget_blocks`` and ``top_blocks`` give, except that padding blocks are never chosen (the
    composition drops them: ``compose.MaskParts``). One launch; token rows of ``SPLIT_FROM`` entries or more when
    it is set (or any, given ``segment``) are counted first by the split search.
    short: optional bool [B], sequences that run dense (§5 gives them every block, whatever is chosen here).
    Token rows whose count no budget uses -- query-aware heads, and with ``short`` dense sequences -- are not
    searched: their blocks are then chosen as for a budget from no token (``min_blocks``), which only the
    rows of dense sequences could show and §5 overrides.
    """
    _check_rows("scores", scores)
    _check_rows("block_scores", block_scores)
    assert block_scores.dtype == scores.dtype and block_scores.shape[:-1] == scores.shape[:-1]
    assert scores.shape[0] == 2 and query_aware.shape == scores.shape[1:3] and query_aware.is_contiguous()
    n, num_blocks = scores.shape[-1], block_scores.shape[-1]
    rows = scores.numel() // n
    out = torch.empty(block_scores.shape, dtype=torch.bool, device=scores.device)
    tokens = None
    segment = None if gamma >= 1.0 else _split_segment(n, segment)
    if segment is not None:
        tokens = torch.empty(rows, dtype=torch.long, device=scores.device)
        # Long rows are GPU-bound: two small launches to skip the rows no budget uses (the one-launch kernel below
        # decides the same in its programs).
        skip = query_aware if short is None else query_aware | short[:, None]
        _launch_split(scores, tokens, gamma, False, segment, (~skip).expand(2, -1, -1).contiguous())
    with launch_device(scores):
        _vertical_slash_kernel[(rows,)](
            scores, block_scores, query_aware, query_aware if short is None else short,
            scores if tokens is None else tokens, out, rows // 2, query_aware.shape[1], n,
            num_blocks, **_keys(scores.dtype, min(gamma, 1.0)), block_size=block_size, min_blocks=min_blocks,
            most_blocks=most_blocks, query_aware_blocks=query_aware_blocks, BLOCK=_block(n),
            BLOCK_NB=_block(num_blocks), PROBES=_PROBES, RANK_PASSES=_passes(n + 2), ALL_TOKENS=gamma >= 1.0,
            TOKENS_GIVEN=tokens is not None, HAS_SHORT=short is not None, num_warps=8,
        )
    return out
