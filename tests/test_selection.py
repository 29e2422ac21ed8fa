"""The vectorised selection equals the per-head reference selection exactly."""

import math

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops import reference
from flexprefill_hf.ops.block_structure import block_mask_to_structure, structure_to_block_mask
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.selection import scores, select, select_blocks
from flexprefill_hf.ops.selection.coverage import coverage_counts, coverage_mask, js_distance, top_blocks
from flexprefill_hf.testing import structured_qkv

from helpers import random_qkv, seeded

# The Triton stages run on DEVICE (CPU tensors go through the interpreter only when no GPU is present).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # batch, q_len, k_len, q_heads, kv_heads, head_dim, block, key_start, gamma, tau, min_budget, max_budget
    (1, 333, 333, 4, 4, 16, 64, None, 0.9, 0.1, 64, None),
    (2, 200, 200, 3, 1, 32, 64, [0, 37], 0.95, 0.2, 64, None),
    (2, 77, 333, 8, 2, 16, 64, [5, 130], 0.9, 0.15, 128, None),
    (1, 1000, 1000, 7, 1, 16, 128, None, 0.8, 0.1, 128, 256),
    (2, 1, 700, 4, 1, 16, 64, [0, 300], 0.9, 0.2, 64, None),
    (1, 520, 1100, 4, 4, 64, 128, None, 0.95, 0.0, 256, None),
    (2, 640, 640, 4, 2, 16, 64, [0, 100], 0.7, 1.0, 64, 128),
    (2, 5, 600, 4, 2, 16, 64, [0, 150], 0.9, 0.2, 64, None),  # a short turn on a long cache
    (2, 50, 300, 4, 2, 16, 64, None, 0.9, 0.1, 64, None),  # batch without padding, r = 50 rows
]


def _check_equal(q, k, config, key_start, dtype):
    scale = 1.0 / math.sqrt(q.shape[-1])
    want_mask, want_qa, want_js = reference.select_blocks_reference(q, k, config, scale, key_start, dtype=dtype)
    got = select_blocks(q.to(dtype), k.to(dtype), config, scale, key_start)
    got_mask = structure_to_block_mask(got.structure)
    assert torch.equal(got_mask, want_mask)
    assert torch.equal(got.query_aware, want_qa)
    torch.testing.assert_close(got.js_distance, want_js.to(got.js_distance.dtype), equal_nan=True)
    # The structure is ascending, -1 padded, and its counts match the mask.
    indices, counts = got.structure.indices, got.structure.counts
    assert torch.equal(counts, want_mask.sum(-1, dtype=torch.int32))
    valid = torch.arange(indices.shape[-1]) < counts[..., None]
    assert torch.equal(indices >= 0, valid)
    assert (indices[..., 1:][valid[..., 1:]] > indices[..., :-1][valid[..., 1:]]).all()
    return got_mask, got


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selection_equals_reference(case, dtype, poison_empty):
    # Fresh memory is poisoned: a structure entry the selection never writes fails the comparison.
    batch, q_len, k_len, hq, hkv, d, bs, starts, gamma, tau, min_budget, max_budget = case
    config = FlexPrefillConfig(gamma=gamma, tau=tau, block_size=bs, min_budget=min_budget, max_budget=max_budget)
    key_start = None if starts is None else torch.tensor(starts)
    seed = CASES.index(case) * 2 + (dtype == torch.float32)
    q, k, _ = random_qkv(batch, q_len, k_len, hq, hkv, d, dtype=dtype, scale=1.5, seed=seed)
    mask, got = _check_equal(q, k, config, key_start, dtype)
    grid = BlockGrid(q_len, k_len, bs)
    # ops/README.md §5: diagonal and sink in every present query block at or after the sink.
    starts_t = torch.zeros(batch, dtype=torch.long) if key_start is None else key_start
    assert got.causal_blocks.shape == (batch,) and got.causal_blocks.dtype == torch.int32
    for b in range(batch):
        sink = grid.sink_block(int(starts_t[b]))
        assert got.causal_blocks[b] == reference.block_causal_mask(grid, sink, "cpu").sum()
        for t in range(grid.num_query_blocks):
            i = grid.first_query_block + t
            if i >= sink:
                assert mask[b, :, t, i].all() and mask[b, :, t, sink].all()
            assert not mask[b, :, t, i + 1 :].any()
            assert not mask[b, :, t, :sink].any()


def test_selection_structured_inputs_mix_patterns():
    """On structured inputs both patterns occur and the selection still equals the reference."""
    q, k, _ = structured_qkv(2, 900, 8, 2, 32, generator=seeded(3), dtype=torch.float64)
    config = FlexPrefillConfig(gamma=0.9, tau=0.35, block_size=64, min_budget=64)
    mask, got = _check_equal(q, k, config, torch.tensor([0, 250]), torch.float64)
    assert got.query_aware.any() and not got.query_aware.all()
    assert mask.float().mean() < 0.9


def test_gamma_one_tau_zero_selects_every_causal_block():
    q, k, _ = random_qkv(2, 500, 500, 4, 2, 16, seed=11)
    config = FlexPrefillConfig(gamma=1.0, tau=0.0, block_size=64, min_budget=64)
    got = select_blocks(q, k, config, 0.25, torch.tensor([0, 90]))
    grid = BlockGrid(500, 500, 64)
    i = torch.arange(grid.num_blocks)
    for b, start in enumerate([0, 90]):
        sink = grid.sink_block(start)
        want = (i[None, :] <= i[:, None]) & (i[None, :] >= sink)
        assert torch.equal(structure_to_block_mask(got.structure)[b], want.expand(4, -1, -1))


def test_short_sequence_in_padded_batch_runs_dense():
    """A sequence whose real length is under the dense threshold gets the full causal block set."""
    q, k, _ = random_qkv(2, 640, 640, 2, 2, 16, seed=5)
    config = FlexPrefillConfig(gamma=0.5, tau=0.1, block_size=64, min_budget=256)  # threshold 256
    got = select_blocks(q, k, config, 0.25, torch.tensor([0, 400]))
    mask = structure_to_block_mask(got.structure)
    grid = BlockGrid(640, 640, 64)
    sink = grid.sink_block(400)
    i = torch.arange(grid.num_blocks)
    assert torch.equal(mask[1], ((i[None, :] <= i[:, None]) & (i[None, :] >= sink)).expand(2, -1, -1))
    assert torch.isnan(got.js_distance[1]).all() and not got.query_aware[1].any()
    assert mask[0].sum() < 2 * (i[None, :] <= i[:, None]).sum()  # sequence 0 is really sparse


def test_max_budget_caps_vertical_slash_blocks():
    q, k, _ = random_qkv(1, 1024, 1024, 2, 2, 16, seed=8)
    capped = FlexPrefillConfig(gamma=0.99, tau=0.0, block_size=64, min_budget=64, max_budget=128)
    got = select_blocks(q, k, capped, 0.25)
    # At most 2 vertical + 2 slash blocks, plus sink and diagonal, per query block.
    assert int(got.structure.counts.max()) <= 6


def test_block_structure_round_trip():
    g = seeded(0)
    mask = torch.rand(2, 3, 5, 9, generator=g) < 0.4
    structure = block_mask_to_structure(mask, BlockGrid(300, 520, 64))
    assert torch.equal(structure_to_block_mask(structure), mask)
    assert structure.indices.dtype == torch.int32 and structure.counts.dtype == torch.int32


def test_diagonal_sums_match_reference_slash_scores():
    g = seeded(1)
    attn = torch.rand(5, 40, generator=g, dtype=torch.float64)
    positions = torch.arange(35, 40)
    attn = attn.masked_fill(torch.arange(40)[None, :] > positions[:, None], 0)
    want = reference.slash_scores(attn, positions) * 5
    torch.testing.assert_close(scores.diagonal_sums(attn), want)


def test_js_distance_properties():
    g = seeded(2)
    p = torch.softmax(torch.randn(16, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(16, generator=g, dtype=torch.float64), 0)
    assert float(reference.js_distance_reference(p, p)) == pytest.approx(0.0, abs=1e-7)
    # Disjoint supports: JSD = ln 2, with zeros handled (no NaN).
    a = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, 0.25, 0.75], dtype=torch.float64)
    assert float(reference.js_distance_reference(a, b)) == pytest.approx(math.sqrt(math.log(2)))
    assert float(js_distance(a, b)) == pytest.approx(math.sqrt(math.log(2)))
    assert float(reference.js_distance_reference(p, q)) == pytest.approx(float(js_distance(p, q)))


def test_coverage_count():
    scores = torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64)
    assert reference.coverage_count(scores, 0.5) == 1
    assert reference.coverage_count(scores, 0.75) == 2
    assert reference.coverage_count(scores, 0.76) == 3
    assert reference.coverage_count(scores, 1.0) == 4
    assert torch.equal(coverage_counts(scores[None], 0.76), torch.tensor([3]))


def test_top_blocks_and_coverage_mask_by_counting():
    """Both scatter through a sort's permutation into fresh memory: every entry must come out as the
    order-free definition says (ranks counted pairwise, ties to the lower index). Multiples of 1/16 keep the
    running sums exact, so the coverage rule can be checked by summing in any order."""
    gen = seeded(21)
    scores_ = torch.randint(0, 6, (3, 5, 37), generator=gen).double() / 16  # many ties
    counts = torch.randint(0, 40, (3, 5), generator=gen)
    idx = torch.arange(37)
    # rank[j]: entries before j in the descending, stable order.
    ahead = (scores_[..., None, :] > scores_[..., :, None]) | (
        (scores_[..., None, :] == scores_[..., :, None]) & (idx[None, :] < idx[:, None])
    )  # [..., j, other]
    rank = ahead.sum(-1)
    assert torch.equal(top_blocks(scores_, counts), rank < counts[..., None])
    before = (ahead * scores_[..., None, :]).sum(-1)  # the larger entries' sum, exact in any order
    for gamma in (0.05, 0.3, 0.76, 0.9):
        assert torch.equal(coverage_mask(scores_, gamma), before < gamma)


def test_head_chunking_does_not_change_the_selection(monkeypatch):
    """Block masks are built a chunk of heads at a time at long lengths; one head per chunk must agree."""
    q, k, _ = structured_qkv(2, 700, 6, 2, 32, generator=seeded(13), dtype=torch.float64)
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, block_size=64, min_budget=64)
    key_start = torch.tensor([0, 120])
    whole = select_blocks(q, k, config, 0.2, key_start)
    monkeypatch.setattr(select, "_MASK_CHUNK_BYTES", 1)
    monkeypatch.setattr(scores, "_SCORE_CHUNK_BYTES", 1)
    chunked = select_blocks(q, k, config, 0.2, key_start)
    assert torch.equal(whole.structure.indices, chunked.structure.indices)
    assert torch.equal(whole.structure.counts, chunked.structure.counts)
    assert torch.equal(whole.query_aware, chunked.query_aware)


def test_sink_block_is_the_block_of_the_first_real_key():
    grid = BlockGrid(100, 333, 64)  # pad 51: block 0 holds keys 0..12, block j keys 64j-51 .. 64j+12
    starts = torch.tensor([0, 12, 13, 76, 77, 332], dtype=torch.int32)
    got = grid.sink_block(starts)
    assert got.dtype == torch.int64 and got.tolist() == [0, 0, 1, 1, 2, 5]
    assert [grid.sink_block(int(s)) for s in starts] == got.tolist()
    # A start past the last key (rejected by the operator) stays inside the grid.
    assert int(grid.sink_block(torch.tensor([5000]))) == grid.sink_block(5000) == grid.num_blocks - 1


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[7]], ids=["padded", "cache", "nonmultiple", "turn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "compose"])
def test_triton_structure_backend_equals_reference(case, dtype, backend, poison_empty):
    """The CUDA paths' §2-§5 (the one-launch stages with threshold-search coverage, or the sorts with the Triton
    composition) on float32/float64 inputs: still the reference's selection exactly."""
    batch, q_len, k_len, hq, hkv, d, bs, starts, gamma, tau, min_budget, max_budget = case
    if DEVICE == "cuda" and dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 on CUDA is refused by the one-launch kernels (test_selection_kernels.py checks it)")
    config = FlexPrefillConfig(gamma=gamma, tau=tau, block_size=bs, min_budget=min_budget, max_budget=max_budget)
    key_start = None if starts is None else torch.tensor(starts)
    q, k, _ = random_qkv(batch, q_len, k_len, hq, hkv, d, dtype=dtype, scale=1.5, seed=CASES.index(case) + 40)
    scale = 1.0 / math.sqrt(d)
    want_mask, want_qa, want_js = reference.select_blocks_reference(q, k, config, scale, key_start, dtype=dtype)
    got = select_blocks(q.to(DEVICE), k.to(DEVICE), config, scale, None if key_start is None else key_start.to(DEVICE),
                        structure_backend=backend)
    assert torch.equal(structure_to_block_mask(got.structure).cpu(), want_mask)
    assert torch.equal(got.query_aware.cpu(), want_qa)
    # The pattern kernel's distance: the same function, summed in another order (NaN for dense sequences).
    torch.testing.assert_close(got.js_distance.cpu(), want_js.to(got.js_distance.dtype), equal_nan=True)


def test_default_structure_backend_follows_the_measured_rule(monkeypatch):
    pytest.importorskip("triton")
    from flexprefill_hf.ops.selection import coverage_triton
    from flexprefill_hf.ops.selection.select import COMPOSE_STAGES_FROM, default_structure_backend

    # As measured: the split search from 64K keys, so the one-launch stages at every length.
    assert coverage_triton.SPLIT_FROM == COMPOSE_STAGES_FROM == 1 << 16
    assert default_structure_backend("cpu", torch.bfloat16, 1 << 20) == "torch"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for k_len in (8192, COMPOSE_STAGES_FROM - 1, COMPOSE_STAGES_FROM, 1 << 19):
            assert default_structure_backend("cuda", dtype, k_len) == "triton"
    assert default_structure_backend("cuda", torch.float64, 1024) == "compose"  # refused by the one-launch kernels
    assert default_structure_backend("cuda", torch.float64, 1 << 19) == "compose"
    # Rows split only from a longer length: the sort-based stages in between.
    monkeypatch.setattr(coverage_triton, "SPLIT_FROM", 1 << 17)
    assert default_structure_backend("cuda", torch.bfloat16, COMPOSE_STAGES_FROM - 1) == "triton"
    assert default_structure_backend("cuda", torch.bfloat16, COMPOSE_STAGES_FROM) == "compose"
    assert default_structure_backend("cuda", torch.bfloat16, (1 << 17) - 1) == "compose"
    assert default_structure_backend("cuda", torch.bfloat16, 1 << 17) == "triton"
    monkeypatch.setattr(coverage_triton, "SPLIT_FROM", None)  # never split: compose from COMPOSE_STAGES_FROM on
    assert default_structure_backend("cuda", torch.bfloat16, 1 << 19) == "compose"
    # Under torch.compile: the compose stages at every length (inductor lost the one-launch kernels' writes).
    assert default_structure_backend("cuda", torch.bfloat16, 8192, compiling=True) == "compose"
    assert default_structure_backend("cpu", torch.bfloat16, 8192, compiling=True) == "torch"


def test_select_blocks_asks_whether_it_is_being_compiled(monkeypatch):
    from flexprefill_hf.ops.selection import select

    seen = []
    real = select.default_structure_backend
    monkeypatch.setattr(select, "default_structure_backend", lambda *a: seen.append(a) or real(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, _ = random_qkv(1, 200, 200, 2, 1, 16, dtype=torch.float32, seed=3)
    select_blocks(q, k, FlexPrefillConfig(block_size=64, min_budget=64), 0.25)
    assert seen == [("cpu", torch.float32, 200, True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the default stages depend on the device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_default_stages_on_both_sides_of_the_threshold_equal_the_reference(dtype, monkeypatch):
    from flexprefill_hf.ops.selection import coverage_triton, select

    case = CASES[1]  # left padding, both patterns
    batch, q_len, k_len, hq, hkv, d, bs, starts, gamma, tau, min_budget, max_budget = case
    config = FlexPrefillConfig(gamma=gamma, tau=tau, block_size=bs, min_budget=min_budget, max_budget=max_budget)
    q, k, _ = random_qkv(batch, q_len, k_len, hq, hkv, d, dtype=dtype, scale=1.5, seed=41)
    scale = 1.0 / math.sqrt(d)
    want_mask, want_qa, _ = reference.select_blocks_reference(q, k, config, scale, torch.tensor(starts), dtype=dtype)
    searched = []
    real = coverage_triton.vertical_slash_blocks_triton
    spy = lambda *a, **kw: searched.append(1) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(coverage_triton, "vertical_slash_blocks_triton", spy)
    for threshold in (k_len + 1, k_len):  # one-launch stages below it, compose stages from it on
        monkeypatch.setattr(select, "COMPOSE_STAGES_FROM", threshold)
        searched.clear()
        got = select_blocks(q.cuda(), k.cuda(), config, scale, torch.tensor(starts, device="cuda"))
        assert torch.equal(structure_to_block_mask(got.structure).cpu(), want_mask)
        assert torch.equal(got.query_aware.cpu(), want_qa)
        assert bool(searched) == (threshold > k_len and dtype != torch.float64)


def test_one_launch_stages_with_the_split_search_equal_the_reference(monkeypatch, poison_empty):
    """The "triton" stages when every coverage row is long (thresholds lowered): §3's token rows and §4's pair rows
    both go through the split search, and the selection is still the reference's."""
    from flexprefill_hf.ops.selection import coverage_triton

    monkeypatch.setattr(coverage_triton, "SPLIT_FROM", 8)
    monkeypatch.setattr(coverage_triton, "_SEGMENT", 48)
    batch, q_len, k_len, hq, hkv, d, bs, starts, gamma, tau, min_budget, max_budget = CASES[1]
    config = FlexPrefillConfig(gamma=gamma, tau=0.9, block_size=bs, min_budget=min_budget, max_budget=max_budget)
    key_start = torch.tensor(starts)
    q, k, _ = random_qkv(batch, q_len, k_len, hq, hkv, d, dtype=torch.float32, scale=1.5, seed=43)
    scale = 1.0 / math.sqrt(d)
    want_mask, want_qa, _ = reference.select_blocks_reference(q, k, config, scale, key_start, dtype=torch.float32)
    assert want_qa.any()  # τ 0.9: query-aware heads, so §4's coverage runs
    got = select_blocks(q.to(DEVICE), k.to(DEVICE), config, scale, key_start.to(DEVICE), structure_backend="triton")
    assert torch.equal(structure_to_block_mask(got.structure).cpu(), want_mask)
    assert torch.equal(got.query_aware.cpu(), want_qa)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], (1, 1200, 1200, 4, 2, 16, 64, None, 0.9, 0.9, 64, None)])
@pytest.mark.parametrize("rows,kernel", [(16, "_estimate_tile_kernel"), (1, "_estimate_kernel")], ids=["tiles", "rows"])
def test_one_launch_stages_with_either_estimate_kernel_equal_the_reference(case, rows, kernel, monkeypatch,
                                                                            poison_empty):
    """The "triton" stages with §4's estimate computed 16 query blocks per program (the tile kernel, the default)
    and one per program (the row kernel): the selection is still the reference's, with left padding, a prefill on
    a cache, and 19 query blocks (two tiles)."""
    from flexprefill_hf.ops.selection import estimate_triton

    calls = []
    monkeypatch.setattr(estimate_triton, "ROWS_PER_PROGRAM", rows)
    monkeypatch.setattr(estimate_triton, kernel, _Spy(getattr(estimate_triton, kernel), calls))
    batch, q_len, k_len, hq, hkv, d, bs, starts, gamma, tau, min_budget, max_budget = case
    config = FlexPrefillConfig(gamma=gamma, tau=0.9, block_size=bs, min_budget=min_budget, max_budget=max_budget)
    key_start = torch.tensor(starts) if starts is not None else None
    q, k, _ = random_qkv(batch, q_len, k_len, hq, hkv, d, dtype=torch.float32, scale=1.5, seed=44)
    scale = 1.0 / math.sqrt(d)
    want_mask, want_qa, _ = reference.select_blocks_reference(q, k, config, scale, key_start, dtype=torch.float32)
    assert want_qa.any()  # τ 0.9: query-aware heads, so §4 runs
    got = select_blocks(q.to(DEVICE), k.to(DEVICE), config, scale,
                        None if key_start is None else key_start.to(DEVICE), structure_backend="triton")
    assert calls  # the kernel asked for ran
    assert torch.equal(structure_to_block_mask(got.structure).cpu(), want_mask)
    assert torch.equal(got.query_aware.cpu(), want_qa)


class _Spy:
    """A launched Triton kernel (``kernel[grid](...)``) that records each launch."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("split", [False, True])
def test_rows_no_budget_reads_are_not_searched(split, monkeypatch, poison_empty):
    """§3's token searches skip the rows whose count no budget uses: query-aware heads (fixed budget) and the
    rows of a sequence that runs dense (a batch with a short prompt; §5 gives it every block). The selection is
    still the reference's, by one program per row and by the split search."""
    from flexprefill_hf.ops.selection import coverage_triton

    if split:
        monkeypatch.setattr(coverage_triton, "SPLIT_FROM", 8)
        monkeypatch.setattr(coverage_triton, "_SEGMENT", 160)
    needed_rows = []
    real = coverage_triton._launch_split
    monkeypatch.setattr(coverage_triton, "_launch_split",
                        lambda scores, out, gamma, mask, segment, rows_needed: needed_rows.append(rows_needed)
                        or real(scores, out, gamma, mask, segment, rows_needed))
    config = FlexPrefillConfig(gamma=0.95, tau=0.15, block_size=64, min_budget=64)
    key_start = torch.tensor([0, 290, 40])  # sequence 1: 10 real keys, under the dense threshold (128)
    q, k, _ = random_qkv(3, 300, 300, 4, 2, 16, dtype=torch.float32, scale=1.5, seed=45)
    scale = 1.0 / math.sqrt(16)
    want_mask, want_qa, _ = reference.select_blocks_reference(q, k, config, scale, key_start, dtype=torch.float32)
    assert want_qa.any() and not want_qa[[0, 2]].all()  # both kinds of head among the sparse sequences
    got = select_blocks(q.to(DEVICE), k.to(DEVICE), config, scale, key_start.to(DEVICE), structure_backend="triton")
    assert torch.equal(structure_to_block_mask(got.structure).cpu(), want_mask)
    assert torch.equal(got.query_aware.cpu(), want_qa)
    if split:  # §3's call of the split search, told which rows to search: [2, B, Hq]
        needed = next(r for r in needed_rows if r is not None and r.shape == (2, 3, 4)).cpu()
        assert torch.equal(needed, (~(want_qa | torch.tensor([False, True, False])[:, None])).expand(2, -1, -1))
