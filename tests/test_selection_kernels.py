"""The fused Triton scoring of the representative block against the PyTorch selection stage."""

import math

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.block_structure import structure_to_block_mask
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.selection import scores_triton, select_blocks
from flexprefill_hf.ops.selection.scores import representative_scores
from flexprefill_hf.ops.selection.scores_triton import representative_scores_triton
from flexprefill_hf.testing import structured_qkv

from helpers import random_qkv, seeded

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_float64_kernels(dtype):
    """The one-launch selection kernels take float64 only when interpreted (CUDA refuses it: see
    test_one_launch_kernels_refuse_float64_on_cuda); their float64 cases run on CPU."""
    if DEVICE == "cuda" and dtype == torch.float64:
        pytest.skip("float64 on CUDA is refused by the one-launch selection kernels (select routes it to 'compose')")


@pytest.mark.parametrize(
    "batch,q_len,k_len,hq,hkv,d,block,starts,dtype",
    [
        (1, 333, 333, 4, 2, 64, 64, None, torch.float16),
        (2, 77, 300, 3, 1, 32, 64, [0, 100], torch.bfloat16),
        (1, 1000, 1000, 7, 1, 128, 128, None, torch.float16),
        (2, 1, 200, 2, 1, 16, 64, [5, 190], torch.float16),
        (1, 130, 700, 4, 4, 96, 128, None, torch.bfloat16),
        (1, 64, 1100, 2, 1, 32, 64, None, torch.float16),  # more than 1024 offsets: two slash programs
        (2, 40, 900, 2, 1, 32, 64, [0, 700], torch.float16),  # padding tiles skipped, whole programs of them
        # Block 128, head dims 64/128: the cases the Gluon kernel takes on Hopper ("shared" below).
        (2, 200, 2000, 4, 2, 64, 128, [0, 1300], torch.bfloat16),
        (1, 90, 1337, 8, 2, 128, 128, None, torch.float16),  # fewer rows than the block
        (1, 3000, 3000, 4, 1, 128, 128, None, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("splits", [None, 5])
# The ways to sum diagonals (Triton: gather, scratch; Gluon on Hopper: skewed through shared memory) and the two ways
# to read a key tile (as rows, or as its transpose).
@pytest.mark.parametrize("by_gather, k_rows, shared", [(True, True, False), (False, True, False), (True, False, False),
                                                       (True, True, True)],
                         ids=["gather", "scratch", "gather-kt", "shared"])
def test_representative_scores_match_torch(
    batch, q_len, k_len, hq, hkv, d, block, starts, dtype, splits, by_gather, k_rows, shared, monkeypatch,
    poison_empty
):
    if shared:
        _needs_gluon_scores(block, d, dtype)
    q, k, _ = random_qkv(batch, q_len, k_len, hq, hkv, d, dtype=dtype, scale=1.5, seed=q_len + d)
    q, k = q.to(DEVICE), k.to(DEVICE)
    key_start = None if starts is None else torch.tensor(starts, device=DEVICE)
    grid = BlockGrid(q_len, k_len, block)
    starts_t = torch.zeros(batch, dtype=torch.long, device=DEVICE) if key_start is None else key_start
    key_valid = torch.arange(k_len, device=DEVICE)[None, :] >= starts_t[:, None]
    scale = 1 / math.sqrt(d)
    want_v, want_s = representative_scores(q, k, grid, scale, key_valid)
    # Several programs per head: their partial log-sum-exps are combined two rows at a time.
    monkeypatch.setattr(scores_triton, "_SPLIT_CHUNK", 2)
    monkeypatch.setattr(scores_triton, "_DIAGONAL_BY_GATHER", by_gather)
    monkeypatch.setattr(scores_triton, "_K_ROWS", k_rows)
    # Fresh memory is poisoned (NaN): the kernels must write every output and read no scratch they did not write.
    before = len(poison_empty.shapes)
    got_v, got_s = representative_scores_triton(q, k, grid, scale, key_start, splits=splits, shared_skew=shared)
    assert (2, batch, hq, k_len) in poison_empty.shapes[before:]  # the output itself came poisoned
    # Same half-precision inputs, fp32 arithmetic in both: only the summation order differs.
    torch.testing.assert_close(got_v, want_v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_s, want_s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_v.sum(-1), torch.ones_like(got_v.sum(-1)), rtol=1e-4, atol=1e-4)


def _needs_gluon_scores(block, d, dtype):
    """Skip unless the Gluon scores kernel runs here (a Hopper GPU with Gluon; never in the interpreter)."""
    from flexprefill_hf.ops.selection import scores_gluon

    if DEVICE != "cuda":
        pytest.skip("the Gluon scores kernel runs on the GPU only")
    probe = torch.empty(1, 1, 1, d, dtype=dtype, device=DEVICE)
    reason = scores_gluon.unsupported_reason(probe, probe, block)
    if reason:
        pytest.skip(f"Gluon scores kernel: {reason}")


@pytest.mark.parametrize("what", ["query_start", "skip"])
def test_gluon_scores_equal_triton_scores_with_a_cache_and_skips(what):
    # The Gluon kernel against the Triton one on what the torch oracle test above does not reach: a cache in front
    # of the queries (query_start) and skipped sequences. Same fp32 products; only the summation order differs.
    _needs_gluon_scores(128, 128, torch.bfloat16)
    q, k, _ = random_qkv(3, 150, 2600, 8, 2, 128, dtype=torch.bfloat16, scale=1.5, seed=31)
    q, k = q.to(DEVICE), k.to(DEVICE)
    grid = BlockGrid(150, 2600, 128)
    key_start = torch.tensor([0, 333, 2100], device=DEVICE)
    extra = dict(query_start=torch.tensor([2450, 2500, 2480], device=DEVICE)) if what == "query_start" else dict(
        skip=torch.tensor([False, True, False], device=DEVICE))
    want = representative_scores_triton(q, k, grid, 0.09, key_start, splits=4, shared_skew=False, **extra)
    got = representative_scores_triton(q, k, grid, 0.09, key_start, splits=4, shared_skew=True, **extra)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if what == "skip":
        assert (got[:, 1] == 0).all()


def test_shared_skew_refused_where_unsupported():
    q = torch.zeros(1, 4, 2, 96, dtype=torch.float16, device=DEVICE)  # head dim 96: no Gluon kernel anywhere
    with pytest.raises(ValueError, match="shared_skew"):
        representative_scores_triton(q, q, BlockGrid(4, 4, 64), 0.1, None, shared_skew=True)


def test_skipped_sequences_get_zero_scores_and_the_rest_are_unchanged(poison_empty):
    # Dense sequences' scores are never read: the kernels compute them from no key (zeros), leaving the others'.
    q, k, _ = random_qkv(3, 60, 400, 4, 2, 32, dtype=torch.float16, scale=1.5, seed=9)
    q, k = q.to(DEVICE), k.to(DEVICE)
    grid = BlockGrid(60, 400, 64)
    key_start = torch.tensor([0, 90, 210], device=DEVICE)
    want = representative_scores_triton(q, k, grid, 0.17, key_start, splits=3)
    skip = torch.tensor([False, True, False], device=DEVICE)
    got = representative_scores_triton(q, k, grid, 0.17, key_start, splits=3, skip=skip)
    assert (got[:, 1] == 0).all()
    assert torch.equal(got[:, 0], want[:, 0]) and torch.equal(got[:, 2], want[:, 2])


def test_selection_with_triton_scores_equals_torch_scores():
    q, k, _ = structured_qkv(2, 600, 4, 2, 64, dtype=torch.float16, generator=seeded(2))
    q, k = q.to(DEVICE), k.to(DEVICE)
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, block_size=64, min_budget=64)
    key_start = torch.tensor([0, 70], device=DEVICE)
    a = select_blocks(q, k, config, 0.125, key_start, scores_backend="torch")
    b = select_blocks(q, k, config, 0.125, key_start, scores_backend="triton")
    assert torch.equal(structure_to_block_mask(a.structure), structure_to_block_mask(b.structure))
    assert torch.equal(a.query_aware, b.query_aware)


# The γ-coverage threshold searches (coverage_triton.py) against the sort + cumsum rule (coverage.py), exactly.

def _coverage_both(x, gamma):
    from flexprefill_hf.ops.selection.coverage import coverage_counts, coverage_mask
    from flexprefill_hf.ops.selection.coverage_triton import coverage_counts_triton, coverage_mask_triton

    want_counts, want_mask = coverage_counts(x, gamma), coverage_mask(x, gamma)
    got_counts, got_mask = coverage_counts_triton(x.to(DEVICE), gamma), coverage_mask_triton(x.to(DEVICE), gamma)
    assert got_counts.dtype == torch.long and got_mask.dtype == torch.bool
    assert torch.equal(got_counts.cpu(), want_counts), (got_counts, want_counts)
    assert torch.equal(got_mask.cpu(), want_mask)
    assert torch.equal(want_mask.sum(-1), want_counts)  # the two rules agree with each other
    return want_counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 2, 37, 1024, 2500])  # one entry .. several 1024-entry blocks
@pytest.mark.usefixtures("poison_empty")
def test_coverage_search_equals_sorted_cumsum_on_random_rows(dtype, length):
    needs_float64_kernels(dtype)
    g = seeded(length + (dtype == torch.float64))
    # Rows of probabilities, peaked to flat, plus an all-zero row (a padding row keeps everything).
    logits = torch.randn(5, length, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1.0, 3.0, 8.0, 1.0])[:, None]
    x = torch.softmax(logits, -1).to(dtype)
    x[4] = 0
    for gamma in (0.05, 0.5, 0.9, 0.99):
        counts = _coverage_both(x, gamma)
        assert counts[4] == length
    assert torch.equal(_coverage_both(x, 1.0), torch.full((5,), length))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.usefixtures("poison_empty")
def test_coverage_search_ties_at_the_boundary_go_to_the_lower_index(dtype):
    needs_float64_kernels(dtype)
    # Multiples of 1/16: every running sum is exact, so the boundary falls exactly on γ for some γ, often inside
    # a run of ties; the stable sort keeps the first ties by index, and so must the search.
    g = seeded(23)
    x = (torch.randint(0, 6, (6, 41), generator=g).double() / 16).to(dtype)
    x[0, :] = 0.25  # one run of ties: before = 0, 0.25, 0.5, ... hits γ = 0.5 exactly (not kept)
    for gamma in (1 / 16, 0.25, 0.3, 0.5, 0.75, 0.76, 2.0 - 1 / 16):
        gamma = min(gamma, 0.999)
        _coverage_both(x, gamma)
    from flexprefill_hf.ops.selection.coverage_triton import coverage_mask_triton

    assert _coverage_both(x, 0.5)[0] == 2  # 0.25 + 0.25 reaches 0.5: two entries
    assert coverage_mask_triton(x.to(DEVICE), 0.5)[0].nonzero().flatten().tolist() == [0, 1]  # the lower indices


def test_coverage_search_rounds_gamma_like_the_tensor_comparison():
    # γ just above 0.5 rounds to 0.5 in float32 (the comparison's dtype) but not in float64.
    gamma = 0.5 + 2.0 ** -30
    for dtype, want in ((torch.float32, 2), (torch.float64, 3))[: 1 if DEVICE == "cuda" else 2]:
        x = torch.full((1, 4), 0.25, dtype=dtype)
        assert int(_coverage_both(x, gamma)[0]) == want


def test_coverage_mask_computes_the_rows_needed(poison_empty):
    from flexprefill_hf.ops.selection.coverage import coverage_mask
    from flexprefill_hf.ops.selection.coverage_triton import coverage_mask_triton

    x = torch.softmax(torch.randn(2, 3, 50, generator=seeded(4), dtype=torch.float64), -1).float()
    needed = torch.tensor([[True, False, True], [False, False, True]])
    got = coverage_mask_triton(x.to(DEVICE), 0.8, rows_needed=needed.to(DEVICE)).cpu()
    assert torch.equal(got[needed], coverage_mask(x, 0.8)[needed])  # the skipped rows are nobody's to read


# The split search (long rows: many programs per row, a launch per pass), forced on short rows by ``segment``.

def _split_both(x, gamma, segment):
    from flexprefill_hf.ops.selection.coverage import coverage_counts, coverage_mask
    from flexprefill_hf.ops.selection.coverage_triton import coverage_counts_triton, coverage_mask_triton

    got_counts = coverage_counts_triton(x.to(DEVICE), gamma, segment=segment).cpu()
    got_mask = coverage_mask_triton(x.to(DEVICE), gamma, segment=segment).cpu()
    assert torch.equal(got_counts, coverage_counts(x, gamma)), (got_counts, coverage_counts(x, gamma))
    assert torch.equal(got_mask, coverage_mask(x, gamma))
    return got_mask


# Three segments each, the last one partial (300 = 128 + 128 + 44, 37 = 16 + 16 + 5): every split launch costs
# rows x segments interpreted programs (float32 had segments of 64: five, no other case).
@pytest.mark.parametrize("dtype,length,segment", [(torch.float32, 300, 128), (torch.float64, 37, 16)])
@pytest.mark.usefixtures("poison_empty")
def test_split_search_equals_sorted_cumsum_on_random_rows(dtype, length, segment):
    """Several segments per row and a partial last one; peaked to flat rows and an all-zero (padding) row."""
    needs_float64_kernels(dtype)
    logits = torch.randn(5, length, generator=seeded(length), dtype=torch.float64) * torch.tensor(
        [0.1, 1.0, 3.0, 8.0, 1.0])[:, None]
    x = torch.softmax(logits, -1).to(dtype)
    x[4] = 0
    for gamma in (0.5, 0.9):
        assert _split_both(x, gamma, segment)[4].all()


@pytest.mark.usefixtures("poison_empty")
def test_split_search_keeps_ties_by_index_across_segments():
    """Multiples of 1/16 (exact sums, boundaries exactly on γ, runs of ties): the ties kept are the first by
    index across the segment borders (each segment counts the ties before it)."""
    # 4 rows, each searched at every gamma (every split launch costs rows x segments interpreted programs): a run
    # of 0.25 ties, a run of 1/64 ties over all three segments (γ 0.25: cut at the first segment's border, 0.5:
    # in the middle one, 0.76: the row sums to 41/64 < γ, all kept), and two random rows, whose kept 5/16 ties
    # are in the first segment (row 2) and across the first border (row 3: 5, 16, 24 at γ 0.76) while the rest
    # of their 5/16 tie run lies in the later segments. (Before: six rows, rows 1, 4, 5 random like row 2, and
    # the 1/64 run checked at γ 0.5 only, by a call of its own.)
    x = torch.randint(0, 6, (4, 41), generator=seeded(23)).float() / 16
    x[0, :] = 0.25
    x[1, :] = 1 / 64
    masks = {gamma: _split_both(x, gamma, 16) for gamma in (0.25, 0.5, 0.76)}
    assert masks[0.5][0].nonzero().flatten().tolist() == [0, 1]  # 0.25 + 0.25 reaches 0.5: the lower indices
    # One run of ties spanning all three segments: the boundary tie run is cut in the middle one.
    assert masks[0.5][1].nonzero().flatten().tolist() == list(range(32))
    assert masks[0.25][1].nonzero().flatten().tolist() == list(range(16))
    assert masks[0.76][1].all()
    assert masks[0.76][3].nonzero().flatten().tolist() == [5, 16, 24]


def test_split_search_rows_needed_and_the_vertical_slash_budget(poison_empty):
    from flexprefill_hf.ops.selection.coverage import coverage_counts, coverage_mask, top_blocks
    from flexprefill_hf.ops.selection.coverage_triton import coverage_mask_triton, vertical_slash_blocks_triton

    x = torch.softmax(torch.randn(2, 3, 50, generator=seeded(4), dtype=torch.float64), -1).float()
    needed = torch.tensor([[True, False, True], [False, False, True]])
    got = coverage_mask_triton(x.to(DEVICE), 0.8, rows_needed=needed.to(DEVICE), segment=16).cpu()
    assert torch.equal(got[needed], coverage_mask(x, 0.8)[needed])
    # §3 with its token rows counted by the split search first (segments of 128: 300 = 128 + 128 + 44, three
    # per row, the last partial; 64 made five, each segment costing an interpreted program per row and launch).
    g = seeded(90)
    batch, heads, n, block = 2, 3, 300, 32
    nb = -(-n // block)
    scores = torch.softmax(torch.randn(2, batch, heads, n, generator=g, dtype=torch.float64) * 2, -1).float()
    block_scores = (torch.randint(0, 5, (2, batch, heads, nb), generator=g).double() / 16).float()
    query_aware = torch.rand(batch, heads, generator=g) < 0.4
    got = vertical_slash_blocks_triton(scores.to(DEVICE), block_scores.to(DEVICE), query_aware.to(DEVICE), 0.9,
                                       block, 1, 9, 1, segment=128).cpu()
    budget = torch.where(query_aware, 1, (coverage_counts(scores, 0.9) // block + 1).clamp(min=1, max=9))
    assert torch.equal(got, top_blocks(block_scores, budget))


def test_coverage_search_follows_the_float32_rule_where_float64_arithmetic_differs():
    # On long float32 rows torch's rule (the float64 running sum rounded to float32, x subtracted, compared with
    # gamma in float32) and float64 arithmetic disagree on ~1 row in 100 (RESULTS.md, 2026-12-02: 5 of 384
    # softmax rows of 128K entries on the H200). Find such rows, then both searches (one program per row, and
    # split) must give torch's float32 count, not the float64 one.
    # Rows of 16K, not 128K: the interpreted searches cost in proportion to the length (~21 s of the test at 128K).
    # They still take many 1024-entry blocks per program and, split in segments of 4096 (_SEGMENT), several
    # segments of several blocks each (the only test of a segment longer than a block). Shorter rows disagree
    # less often (~1 row-gamma in 750 at 16K): seed 290 gives two such rows (one at gamma 0.9, one at 0.95) in
    # its first 32 rows, so the search stays short; any seed would do, only slower.
    from flexprefill_hf.ops.selection.coverage import coverage_counts
    from flexprefill_hf.ops.selection.coverage_triton import coverage_counts_triton

    g = seeded(290)
    found = []
    while len(found) < 2:
        x = torch.softmax(torch.randn(32, 1 << 14, generator=g) * 2.5, -1)
        for gamma in (0.9, 0.95):
            f32, f64 = coverage_counts(x, gamma), coverage_counts(x.double(), gamma)
            found += [(x[r], gamma, int(f32[r])) for r in (f32 != f64).nonzero().flatten().tolist()]
    for row, gamma, want in found[:2]:
        row = row[None].to(DEVICE)
        assert int(coverage_counts_triton(row, gamma)[0]) == want
        assert int(coverage_counts_triton(row, gamma, segment=4096)[0]) == want


def test_split_search_from_its_threshold_and_refuses_a_segment_below_one(monkeypatch):
    from flexprefill_hf.ops.selection import coverage_triton

    assert coverage_triton.SPLIT_FROM == 1 << 16  # the measured threshold (RESULTS.md, 2026-12-02)
    assert coverage_triton._split_segment(1 << 16, None) == coverage_triton._SEGMENT
    assert coverage_triton._split_segment((1 << 16) - 1, None) is None
    monkeypatch.setattr(coverage_triton, "SPLIT_FROM", None)
    assert coverage_triton._split_segment(1 << 22, None) is None
    assert coverage_triton._split_segment(10, 4) == 4
    with pytest.raises(ValueError, match="segment=0 is not supported; expected a positive number of entries"):
        coverage_triton.coverage_counts_triton(torch.rand(2, 8, device=DEVICE), 0.9, segment=0)


def test_coverage_search_rejects_what_it_cannot_read():
    from flexprefill_hf.ops.selection.coverage_triton import coverage_counts_triton

    x = torch.rand(3, 8, device=DEVICE)
    with pytest.raises(TypeError, match="scores.dtype=torch.float16 is not supported"):
        coverage_counts_triton(x.half(), 0.9)
    with pytest.raises(ValueError, match="scores must be contiguous"):
        coverage_counts_triton(x.t(), 0.9)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only: the interpreter runs float64")
def test_one_launch_kernels_refuse_float64_on_cuda():
    from flexprefill_hf.ops.selection.coverage_triton import (coverage_counts_triton, coverage_mask_triton,
                                                              vertical_slash_blocks_triton)
    from flexprefill_hf.ops.selection.estimate_triton import block_estimate_triton
    from flexprefill_hf.ops.selection.pattern_triton import pattern_triton

    x = torch.rand(2, 3, 40, device=DEVICE, dtype=torch.float64)
    for call in (lambda: coverage_counts_triton(x, 0.9), lambda: coverage_mask_triton(x, 0.9),
                 lambda: vertical_slash_blocks_triton(x, x, torch.zeros(3, 40, dtype=torch.bool, device=DEVICE), 0.9,
                                                      8, 1, 4, 1)):
        with pytest.raises(TypeError, match="scores.dtype=torch.float64 on CUDA is not supported"):
            call()
    grid = BlockGrid(16, 64, 16)
    k_means = torch.rand(1, 1, 4, 8, device=DEVICE, dtype=torch.float64)
    starts = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="k_means.dtype=torch.float64 on CUDA is not supported"):
        pattern_triton(torch.rand(1, 4, 1, 8, device=DEVICE), k_means, torch.rand(1, 1, 4, device=DEVICE,
                       dtype=torch.float64), starts, None, None, 64, 0.3, 0.1)
    with pytest.raises(TypeError, match="k_means.dtype=torch.float64 on CUDA is not supported"):
        block_estimate_triton(k_means, k_means, starts, None, grid, 0.3, 0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,least,most", [(0.9, 1, 9), (0.5, 3, 2), (1.0, 1, 9), (0.99, 0, 4)])
@pytest.mark.usefixtures("poison_empty")
def test_fused_vertical_slash_blocks_equal_budget_then_top_blocks(dtype, gamma, least, most):
    """§3 in one launch = coverage_counts -> budget -> (query-aware: least blocks) -> top_blocks, on block scores
    with ties (multiples of 1/16) and padding blocks (< 0, never chosen), min above max included."""
    needs_float64_kernels(dtype)
    from flexprefill_hf.ops.selection.coverage import coverage_counts, top_blocks
    from flexprefill_hf.ops.selection.coverage_triton import vertical_slash_blocks_triton

    g = seeded(int(gamma * 100) + least)
    batch, heads, n, block = 2, 3, 300, 32
    nb = -(-n // block)
    scores = torch.softmax(torch.randn(2, batch, heads, n, generator=g, dtype=torch.float64) * 2, -1).to(dtype)
    block_scores = (torch.randint(0, 5, (2, batch, heads, nb), generator=g).double() / 16).to(dtype)
    block_scores[0, 1, :, :3] = -1.0  # padding blocks of sequence 1
    query_aware = torch.rand(batch, heads, generator=g) < 0.4
    qa_blocks = min(least, nb)
    got = vertical_slash_blocks_triton(scores.to(DEVICE), block_scores.to(DEVICE), query_aware.to(DEVICE), gamma,
                                       block, least, most, qa_blocks).cpu()
    budget = (coverage_counts(scores, gamma) // block + 1).clamp(min=least, max=most)
    budget = torch.where(query_aware, qa_blocks, budget)
    want = top_blocks(block_scores, budget) & (block_scores >= 0)  # padding blocks: dropped by the composition
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("starts,short", [(None, None), ([0, 150], None), ([40, 290], [False, True])])
@pytest.mark.parametrize("block_n", [None, 16])  # one chunk of key blocks, or several (a chunk of padding only)
def test_pattern_kernel_matches_torch_pattern(dtype, starts, short, block_n):
    needs_float64_kernels(dtype)
    from flexprefill_hf.ops.selection import pattern_triton
    from flexprefill_hf.ops.selection.coverage import js_distance

    g = seeded(7 + (starts is None))
    batch, n, r, hq, hkv, d, block = 2, 300, 7, 4, 2, 24, 8
    grid = BlockGrid(r, n, block)
    nb = grid.num_blocks
    q_rep = (torch.randn(batch, r, hq, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    k_means = torch.randn(batch, nb, hkv, d, generator=g, dtype=torch.float64).to(dtype).permute(0, 2, 1, 3)
    true_dist = torch.softmax(torch.randn(batch, hq, nb, generator=g, dtype=torch.float64) * 3, -1).to(dtype)
    query_start = torch.tensor(starts or [0, 0])
    sink = None if starts is None else grid.sink_block(query_start)
    short_t = None if short is None else torch.tensor(short)
    got_js, got_qa = pattern_triton.pattern_triton(q_rep.to(DEVICE), k_means.to(DEVICE), true_dist.to(DEVICE),
                                                   query_start.to(DEVICE), None if sink is None else sink.to(DEVICE),
                                                   None if short_t is None else short_t.to(DEVICE), n, 0.3, 0.25,
                                                   block_n=block_n)
    got_js, got_qa = got_js.cpu(), got_qa.cpu()
    # The PyTorch arithmetic of select._pattern, written out.
    rows = (torch.arange(n - r, n)[None, :] >= query_start[:, None]).to(dtype)  # [B, r]
    mean = (q_rep * rows[:, :, None, None]).sum(1) / rows.sum(1).clamp_min(1)[:, None, None]  # [B, Hq, D]
    logits = (mean.unflatten(1, (hkv, hq // hkv)) @ k_means.transpose(-1, -2)).flatten(1, 2) * 0.3
    if sink is not None:
        logits = logits.masked_fill(torch.arange(nb)[None, None, :] < sink[:, None, None], -math.inf)
    want_js = js_distance(torch.softmax(logits, -1), true_dist)
    want_qa = want_js < 0.25
    if short_t is not None:
        want_js = want_js.masked_fill(short_t[:, None], math.nan)
        want_qa = want_qa & ~short_t[:, None]
    assert got_js.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got_js, want_js, equal_nan=True, **tol)
    assert torch.equal(got_qa, want_qa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("block_n", [None, 16])
@pytest.mark.parametrize("rows", [1, 16])
def test_block_estimate_kernel_matches_torch(dtype, padded, block_n, rows):
    """§4's row-softmax over the block-causal pairs, for a chunk of heads (GQA by index), with padding blocks,
    query blocks without a query (all zeros) and rows longer than one loop step; rows: query blocks per program
    (16: the float32 tile kernel, two tiles of the 32 query blocks; float64 keeps the row kernel)."""
    needs_float64_kernels(dtype)
    from flexprefill_hf.ops.block_structure import causal_pair_index
    from flexprefill_hf.ops.selection.estimate_triton import block_estimate_triton

    g = seeded(31 + padded)
    batch, hq, hkv, d = 2, 6, 2, 24
    grid = BlockGrid(500, 700, 16)  # nqb 32 of nb 44: a prefill on a cache, rows of 13 .. 44 key blocks
    nb, nqb = grid.num_blocks, grid.num_query_blocks
    q_means = torch.randn(batch, nqb, hq, d, generator=g, dtype=torch.float64).to(dtype).permute(0, 2, 1, 3)
    k_means = torch.randn(batch, nb, hkv, d, generator=g, dtype=torch.float64).to(dtype).permute(0, 2, 1, 3)
    sink = torch.tensor([0, 20 if padded else 0])
    query_rows = None
    if padded:
        query_rows = torch.arange(grid.first_query_block, nb)[None, :] >= torch.tensor([0, 30])[:, None]
    h0, hc = 1, 4
    got = block_estimate_triton(q_means.to(DEVICE), k_means.to(DEVICE), sink.to(DEVICE),
                                None if query_rows is None else query_rows.to(DEVICE), grid, 0.3, h0, hc,
                                block_n=block_n, rows_per_program=rows).cpu()
    # Heads that are not query-aware are skipped: the others' rows are the same numbers.
    query_aware = torch.rand(batch, hq, generator=g) < 0.5
    query_aware[0, h0] = True
    query_aware[0, h0 + 1] = False
    some = block_estimate_triton(q_means.to(DEVICE), k_means.to(DEVICE), sink.to(DEVICE),
                                 None if query_rows is None else query_rows.to(DEVICE), grid, 0.3, h0, hc,
                                 block_n=block_n, query_aware=query_aware.to(DEVICE), rows_per_program=rows).cpu()
    chunk_qa = query_aware[:, h0 : h0 + hc]
    assert torch.equal(some[chunk_qa], got[chunk_qa])
    # The PyTorch steps of select._query_aware_coverage, up to the normalisation.
    i = torch.arange(grid.first_query_block, nb)
    j = torch.arange(nb)
    blocked = (j[None, :] > i[:, None])[None] | (j[None, None, :] < sink[:, None, None])  # [B, nqb, nb]
    if query_rows is not None:
        blocked = blocked | ~query_rows[:, :, None]
    k_rep = k_means.repeat_interleave(hq // hkv, dim=1)[:, h0 : h0 + hc]
    logits = (q_means[:, h0 : h0 + hc] @ k_rep.transpose(-1, -2)) * 0.3
    probs = torch.softmax(logits.masked_fill(blocked[:, None], -math.inf), -1)
    want = torch.nan_to_num(probs.flatten(2).index_select(-1, causal_pair_index(grid, "cpu")), nan=0.0)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got, want, **tol)
    if padded:  # query blocks without a query: all zeros (and the others are not)
        row_of_pair = causal_pair_index(grid, "cpu") // nb
        no_query = ~query_rows[1][row_of_pair]  # [P]
        assert no_query.any() and got[1][:, no_query].eq(0).all() and got[1][:, ~no_query].sum(-1).gt(0).all()


def test_host_integer_helpers_equal_tritons():
    """runtime.cdiv / next_power_of_2 replace Triton's on the host (cheaper per call): the same values."""
    import triton

    from flexprefill_hf.ops.runtime import cdiv, next_power_of_2

    assert [next_power_of_2(n) for n in range(0, 5000)] == [triton.next_power_of_2(n) for n in range(0, 5000)]
    for n in (1 << 20, (1 << 20) + 1, (1 << 31) - 1):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in (1, 2, 7, 64, 128, 1000))
