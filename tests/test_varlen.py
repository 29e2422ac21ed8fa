"""Packed variable-length FlexPrefill (ops/varlen.py) against each sequence alone, and the packed Triton kernel.

Oracles: (1) every sequence of a packing gets the selection ``select_blocks`` gives it alone (the same
block mask, shifted by its padding blocks on the padded grid) and the output and stats
``flexprefill_attention_with_stats`` give it alone; (2) the packed kernel gives each sequence exactly
(bit for bit) what the padded kernel gives it alone, and is within the dtype rule of
tests/test_block_sparse_kernel.py of the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import relative_error, seeded

from flexprefill_hf.config import FlexPrefillConfig
from flexprefill_hf.ops.attention.block_sparse_triton import (
    block_sparse_attention_triton,
    block_sparse_attention_triton_packed,
)
from flexprefill_hf.ops.block_structure import BlockStructure, block_mask_to_structure, structure_to_block_mask
from flexprefill_hf.ops.flexprefill import flexprefill_attention_with_stats
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.reference import block_sparse_attention_reference
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.ops.selection.scores import representative_scores
from flexprefill_hf.ops.runtime import interpreting
from flexprefill_hf.ops.selection.scores_triton import representative_scores_triton
from flexprefill_hf.ops.varlen import (
    check_varlen_inputs,
    flexprefill_attention_varlen,
    flexprefill_attention_varlen_with_stats,
    full_causal_structure,
    select_blocks_varlen,
    varlen_key_start,
)
from flexprefill_hf.testing import structured_qkv

SMALL = dict(block_size=64, min_budget=64)  # dense threshold 128 tokens


# These call the Triton kernels on CPU tensors, which only the interpreter runs; on a GPU machine the gpu-marked
# tests below check the packed kernel and selection on CUDA tensors instead.
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")


def _pack(lengths, q_heads, kv_heads, head_dim, dtype, seed):
    """Per-sequence (q [q_len, Hq, D], k, v [k_len, Hkv, D]) with FlexPrefill-like structure, and the packing."""
    seqs = []
    for i, (q_len, k_len) in enumerate(lengths):
        q, k, v = structured_qkv(1, k_len, q_heads, kv_heads, head_dim, q_len=q_len, dtype=dtype,
                                 generator=seeded(seed + i))
        seqs.append((q[0], k[0], v[0]))
    cu_q = torch.tensor([0] + [q for q, _ in lengths]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [k for _, k in lengths]).cumsum(0).to(torch.int32)
    packed = [torch.cat([s[i] for s in seqs]) for i in range(3)]
    return seqs, packed, cu_q, cu_k


def _random_lengths(count, seed, longest=700):
    g = seeded(seed)
    k_lens = torch.randint(1, longest, (count,), generator=g)
    q_lens = (torch.rand(count, generator=g) * k_lens).long().clamp_min(1)
    q_lens = torch.where(torch.rand(count, generator=g) < 0.5, k_lens, q_lens)  # half of them full prefills
    return list(zip(q_lens.tolist(), k_lens.tolist()))


PACKINGS = {
    "random-a": _random_lengths(5, seed=1),
    "random-b": _random_lengths(4, seed=2),
    "one-long-many-short": [(900, 900)] + [(n, n) for n in (3, 40, 128, 129, 17, 64)],
    "decode-rows-and-prefills": [(1, 500), (600, 600), (1, 90), (1, 1), (300, 800), (1, 700)],
    "q-shorter-than-k": [(70, 640), (200, 333), (5, 260), (130, 130)],
}


def _alone_block_mask(q, k, config, scale):
    """The block mask [Hq, nqb_b, nb_b] a sequence gets alone (decode: its full causal row)."""
    grid = BlockGrid(q.shape[0], k.shape[0], config.block_size)
    if q.shape[0] == 1:
        return torch.ones(q.shape[1], 1, grid.num_blocks, dtype=torch.bool)
    return structure_to_block_mask(select_blocks(q[None], k[None], config, scale).structure)[0]


def _assert_same_blocks(padded_mask, b, alone, grid_b: BlockGrid, grid: BlockGrid):
    """Sequence b's rows of the padded-grid mask are its alone mask shifted; every other entry is False."""
    shift = grid.num_blocks - grid_b.num_blocks
    row0 = grid_b.first_query_block + shift - grid.first_query_block
    mine = padded_mask[b]
    expected = torch.zeros_like(mine)
    expected[:, row0 : row0 + grid_b.num_query_blocks, shift:] = alone
    assert torch.equal(mine, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packing", list(PACKINGS))
def test_varlen_equals_each_sequence_alone(packing, dtype):
    lengths = PACKINGS[packing]
    seqs, (q, k, v), cu_q, cu_k = _pack(lengths, 4, 2, 32, dtype, seed=len(packing))
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, **SMALL)
    scale = 32 ** -0.5
    max_q, max_k = max(a for a, _ in lengths), max(b for _, b in lengths)
    out, stats = flexprefill_attention_varlen_with_stats(q, k, v, cu_q, cu_k, max_q, max_k, config)
    assert out.shape == q.shape and out.dtype == dtype and not stats.dense
    selection = select_blocks_varlen(q, k, cu_q, cu_k, max_q, max_k, config, scale)
    padded_mask = structure_to_block_mask(selection.structure)
    # Alone, short sequences run SDPA over their own keys; here the padded view's: summation order differs.
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # test_operator.py's REL_TOL
    for b, (qb, kb, vb) in enumerate(seqs):
        grid_b = BlockGrid(qb.shape[0], kb.shape[0], config.block_size)
        _assert_same_blocks(padded_mask, b, _alone_block_mask(qb, kb, config, scale), grid_b, selection.structure.grid)
        alone, alone_stats = flexprefill_attention_with_stats(qb[None], kb[None], vb[None], config)
        assert relative_error(out[cu_q[b] : cu_q[b + 1]], alone[0]) < tol
        assert torch.equal(stats.query_aware[b], alone_stats.query_aware[0])
        assert torch.equal(stats.computed_blocks[b], alone_stats.computed_blocks[0])
        torch.testing.assert_close(stats.computed_fraction[b], alone_stats.computed_fraction[0])
        torch.testing.assert_close(stats.js_distance[b], alone_stats.js_distance[0], equal_nan=True, rtol=tol, atol=tol)


@pytest.mark.parametrize("packing", list(PACKINGS))
def test_packings_exercise_both_patterns_and_sparsity(packing):
    # Guards the test above against passing trivially: each packing selects sparsely and uses both patterns.
    lengths = PACKINGS[packing]
    _, (q, k, v), cu_q, cu_k = _pack(lengths, 4, 2, 32, torch.float64, seed=len(packing))
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, **SMALL)
    max_q, max_k = max(a for a, _ in lengths), max(b for _, b in lengths)
    _, stats = flexprefill_attention_varlen_with_stats(q, k, v, cu_q, cu_k, max_q, max_k, config)
    assert stats.computed_fraction.min() < 0.5
    assert stats.query_aware.any() and (~stats.query_aware & torch.isfinite(stats.js_distance)).any()


def test_all_decode_rows_and_all_short_run_dense():
    config = FlexPrefillConfig(**SMALL)
    for lengths in ([(1, 300), (1, 5), (1, 129)], [(100, 100), (2, 128), (60, 90)]):
        seqs, (q, k, v), cu_q, cu_k = _pack(lengths, 4, 2, 16, torch.float64, seed=3)
        max_q, max_k = max(a for a, _ in lengths), max(b for _, b in lengths)
        out, stats = flexprefill_attention_varlen_with_stats(q, k, v, cu_q, cu_k, max_q, max_k, config)
        assert stats.dense
        for b, (qb, kb, vb) in enumerate(seqs):
            alone, alone_stats = flexprefill_attention_with_stats(qb[None], kb[None], vb[None], config)
            torch.testing.assert_close(out[cu_q[b] : cu_q[b + 1]], alone[0], rtol=1e-10, atol=1e-12)
            assert torch.equal(stats.computed_blocks[b], alone_stats.computed_blocks[0])


def test_rows_past_the_last_sequence_and_empty_sequences_output_zero():
    # Sequences (300, 300), (0, 0) and (50, 200), then 7 rows of no sequence (continuous batching's padding).
    seqs, (q, k, v), _, _ = _pack([(300, 300), (50, 200)], 2, 1, 16, torch.float64, seed=4)
    cu_q = torch.tensor([0, 300, 300, 350], dtype=torch.int32)
    cu_k = torch.tensor([0, 300, 300, 500], dtype=torch.int32)
    extra = torch.randn(7, 2, 16, dtype=torch.float64)
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, **SMALL)
    out = flexprefill_attention_varlen(torch.cat([q, extra]), k, v, cu_q, cu_k, 300, 300, config)
    assert (out[350:] == 0).all()
    for rows, (qb, kb, vb) in zip(((0, 300), (300, 350)), seqs):
        alone = flexprefill_attention_with_stats(qb[None], kb[None], vb[None], config)[0]
        torch.testing.assert_close(out[rows[0] : rows[1]], alone[0], rtol=1e-10, atol=1e-12)


def test_batch_of_zero_sequences():
    q, k, v = torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    zero = torch.zeros(1, dtype=torch.int32)
    out, stats = flexprefill_attention_varlen_with_stats(q, k, v, zero, zero, 1, 1)
    assert (out == 0).all() and stats.computed_blocks.shape == (0, 2)


# ---------------------------------------------------------------- the packed Triton kernel (interpreter on CPU)

def _padded_view(x, cu, lens, length):
    out = torch.zeros((len(lens), length) + x.shape[1:], dtype=x.dtype)
    for b, n in enumerate(lens):
        out[b, length - n :] = x[cu[b] : cu[b] + n]
    return out


def _random_padded_structure(lengths, q_heads, block, seed):
    """A random block mask on the padded grid, legal for every sequence: its own causal blocks from its sink,
    its diagonal always; rows before its first query block empty. Returns (structure, per-sequence masks)."""
    max_q, max_k = max(a for a, _ in lengths), max(b for _, b in lengths)
    grid = BlockGrid(max_q, max_k, block)
    g = seeded(seed)
    mask = torch.zeros(len(lengths), q_heads, grid.num_query_blocks, grid.num_blocks, dtype=torch.bool)
    for b, (q_len, k_len) in enumerate(lengths):
        grid_b = BlockGrid(q_len, k_len, block)
        shift = grid.num_blocks - grid_b.num_blocks
        row0 = grid_b.first_query_block + shift - grid.first_query_block
        rows = torch.arange(grid_b.num_query_blocks)[:, None] + grid_b.first_query_block
        cols = torch.arange(grid_b.num_blocks)[None, :]
        own = torch.rand(q_heads, grid_b.num_query_blocks, grid_b.num_blocks, generator=g) < 0.5
        own = (own & (cols <= rows)) | (cols == rows)
        mask[b, :, row0 : row0 + grid_b.num_query_blocks, shift:] = own
    return block_mask_to_structure(mask, grid), mask


KERNEL_PACKINGS = {
    "prefills-gqa2-fp16": ([(200, 200), (70, 70), (130, 260)], 4, 2, 32, 64, torch.float16),
    "decode-and-cache-bf16": ([(1, 150), (90, 300), (1, 1), (64, 64)], 2, 1, 16, 64, torch.bfloat16),
    "b128-d96-fp16": ([(300, 300), (1, 40), (20, 170)], 2, 2, 96, 128, torch.float16),
}


@needs_interpreter
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("case", list(KERNEL_PACKINGS))
def test_packed_kernel_equals_alone_and_reference(case):
    lengths, hq, hkv, d, block, dtype = KERNEL_PACKINGS[case]
    g = seeded(len(case))
    total_q, total_k = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q = torch.randn(total_q, hq, d, generator=g).to(dtype)
    k, v = (torch.randn(total_k, hkv, d, generator=g).to(dtype) for _ in range(2))
    cu_q = torch.tensor([0] + [a for a, _ in lengths]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [b for _, b in lengths]).cumsum(0).to(torch.int32)
    structure, mask = _random_padded_structure(lengths, hq, block, seed=7)
    out = block_sparse_attention_triton_packed(q, k, v, structure, cu_q, cu_k)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()

    grid = structure.grid
    q_lens, k_lens = [a for a, _ in lengths], [b for _, b in lengths]
    key_start = varlen_key_start(cu_k, grid.k_len)
    qp, kp, vp = _padded_view(q, cu_q, q_lens, grid.q_len), _padded_view(k, cu_k, k_lens, grid.k_len), \
        _padded_view(v, cu_k, k_lens, grid.k_len)
    scale = d ** -0.5
    ref, _ = block_sparse_attention_reference(qp, kp, vp, structure, scale, key_start)
    low, _ = block_sparse_attention_reference(qp, kp, vp, structure, scale, key_start, dtype=dtype)
    for b, (q_len, k_len) in enumerate(lengths):
        mine = out[cu_q[b] : cu_q[b + 1]].double()
        want, want_low = ref[b, grid.q_len - q_len :], low[b, grid.q_len - q_len :].double()
        err, torch_err = (mine - want).abs().max().item(), (want_low - want).abs().max().item()
        floor = torch.finfo(dtype).eps * want.abs().max().item()
        assert err <= 2 * torch_err + floor, f"sequence {b}: error {err:.3g} vs torch's {torch_err:.3g}"
        # Alone through the padded kernel, on the same blocks: bit for bit the same arithmetic.
        grid_b = BlockGrid(q_len, k_len, block)
        shift = grid.num_blocks - grid_b.num_blocks
        row0 = grid_b.first_query_block + shift - grid.first_query_block
        own = mask[b : b + 1, :, row0 : row0 + grid_b.num_query_blocks, shift:]
        alone = block_sparse_attention_triton(
            q[None, cu_q[b] : cu_q[b + 1]], k[None, cu_k[b] : cu_k[b + 1]], v[None, cu_k[b] : cu_k[b + 1]],
            block_mask_to_structure(own.contiguous(), grid_b),
        )
        assert torch.equal(out[cu_q[b] : cu_q[b + 1]], alone[0]), f"sequence {b} differs from its call alone"


@needs_interpreter
@pytest.mark.usefixtures("poison_empty")
def test_packed_kernel_on_the_full_causal_structure_is_dense_attention():
    lengths = [(150, 150), (1, 100), (40, 190)]
    g = seeded(5)
    q = torch.randn(191, 2, 16, generator=g).half()
    k, v = (torch.randn(440, 1, 16, generator=g).half() for _ in range(2))
    cu_q = torch.tensor([0, 150, 151, 191], dtype=torch.int32)
    cu_k = torch.tensor([0, 150, 250, 440], dtype=torch.int32)
    grid = BlockGrid(150, 190, 64)
    key_start = varlen_key_start(cu_k, 190)
    structure = full_causal_structure(grid, 2, grid.sink_block(key_start), 190 - cu_q.diff().long())
    assert structure.indices.untyped_storage().nbytes() == 3 * grid.num_blocks * 4  # O(B * nb), not per head/row
    out = block_sparse_attention_triton_packed(q, k, v, structure, cu_q, cu_k)
    for b, (q_len, k_len) in enumerate(lengths):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = q[rows].double(), k[keys].double(), v[keys].double()
        logits = torch.einsum("qhd,khd->hqk", qb, kb.expand(-1, 2, -1)) / 4
        causal = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
        want = torch.einsum("hqk,khd->qhd", logits.masked_fill(~causal, -math.inf).softmax(-1), vb.expand(-1, 2, -1))
        torch.testing.assert_close(out[cu_q[b] : cu_q[b + 1]].double(), want, rtol=0, atol=2e-3)


@needs_interpreter
def test_representative_scores_with_query_start_match_torch():
    # Rows before query_start (a packed sequence's cache in the padded view) are no representative queries.
    g = seeded(6)
    q = torch.randn(2, 100, 4, 16, generator=g).half()
    k = torch.randn(2, 300, 2, 16, generator=g).half()
    grid = BlockGrid(100, 300, 64)
    key_start = torch.tensor([0, 120])
    query_start = torch.tensor([290, 250])  # 10 and 50 queries: fewer than the 64 representative rows
    key_valid = torch.arange(300)[None, :] >= key_start[:, None]
    want = representative_scores(q, k, grid, 0.25, key_valid, query_start)
    got = representative_scores_triton(q, k, grid, 0.25, key_start, query_start=query_start)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, 4), rtol=1e-4, atol=1e-4)
    # The same as each sequence's own scores alone (its last 10 / 50 queries over its own keys).
    # a_v is indexed by key position (shifted by the padding), a_s by diagonal offset (not shifted).
    a_v, a_s = representative_scores(q[1:, 50:], k[1:, 120:], BlockGrid(50, 180, 64), 0.25,
                                     torch.ones(1, 180, dtype=torch.bool))
    torch.testing.assert_close(want[0, 1, :, 120:], a_v[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(want[1, 1, :, :180], a_s[0], rtol=1e-6, atol=1e-7)
    assert (want[0, 1, :, :120] == 0).all() and (want[1, 1, :, 180:] == 0).all()


@needs_interpreter
@pytest.mark.usefixtures("poison_empty")
def test_representative_scores_read_packed_keys_in_place():
    # Packed keys laid at key_start.. of the view: the same positions and tiles as the padded view, so the same
    # arithmetic, bit for bit. Sequence 0 is shorter than the view: its positions before key_start lie before
    # the tensor's first row, and are never read.
    g = seeded(8)
    lengths = [(20, 130), (64, 300), (1, 1)]
    cu_k = torch.tensor([0, 130, 430, 431], dtype=torch.int32)
    k = torch.randn(431, 2, 16, generator=g).half()
    q = torch.randn(3, 64, 4, 16, generator=g).half()
    grid = BlockGrid(64, 300, 64)
    key_start = varlen_key_start(cu_k, 300)
    query_start = torch.tensor([300 - a for a, _ in lengths])
    padded = torch.zeros(3, 300, 2, 16, dtype=torch.float16)
    for b, (_, n) in enumerate(lengths):
        padded[b, 300 - n :] = k[cu_k[b] : cu_k[b + 1]]
    want = representative_scores_triton(q, padded, grid, 0.25, key_start, query_start=query_start)
    got = representative_scores_triton(q, k, grid, 0.25, key_start, query_start=query_start, cu_seqlens_k=cu_k)
    assert torch.equal(got, want)


@needs_interpreter
def test_varlen_selection_triton_backends_equal_torch():
    lengths = [(300, 300), (40, 250), (1, 90)]
    _, (q, k, _), cu_q, cu_k = _pack(lengths, 4, 2, 32, torch.float16, seed=9)
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, **SMALL)
    torch_sel = select_blocks_varlen(q, k, cu_q, cu_k, 300, 300, config, 0.2, scores_backend="torch",
                                     structure_backend="torch")
    triton_sel = select_blocks_varlen(q, k, cu_q, cu_k, 300, 300, config, 0.2, scores_backend="triton",
                                      structure_backend="triton")
    assert torch.equal(structure_to_block_mask(triton_sel.structure), structure_to_block_mask(torch_sel.structure))
    assert torch.equal(triton_sel.structure.counts, torch_sel.structure.counts)


@needs_interpreter
def test_empty_sequences_read_no_key_in_the_packed_scores(monkeypatch):
    # An empty sequence in the middle and one at the end, k sized exactly (cu_seqlens_k[B] == total_k): the packed
    # scores kernel must read none of another sequence's keys (nor past the end of k). The kernel reads the keys
    # key_start..n-1 of each sequence at packed rows cu_seqlens_k[b] + t - key_start[b], so an empty sequence must
    # be handed key_start == n (no key), not a clamped n - 1 (one key: the next sequence's first, or past the end).
    # Such a read adds no score (an empty sequence has no query row), so the start itself is what is checked.
    from flexprefill_hf.ops.selection import scores_triton

    lengths = [(300, 300), (40, 250)]
    _, (q, k, _), _, _ = _pack(lengths, 4, 2, 32, torch.float16, seed=10)
    cu_q = torch.tensor([0, 300, 300, 340, 340], dtype=torch.int32)
    cu_k = torch.tensor([0, 300, 300, 550, 550], dtype=torch.int32)
    seen = []
    real = scores_triton.representative_scores_triton

    def spy(*args, **kwargs):
        seen.append((args[4].clone(), real(*args, **kwargs)))  # (key_start, scores)
        return seen[-1][1]

    monkeypatch.setattr(scores_triton, "representative_scores_triton", spy)
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, **SMALL)
    sel = select_blocks_varlen(q, k, cu_q, cu_k, 300, 300, config, 0.2, scores_backend="triton",
                               structure_backend="triton")
    ((key_start, scores),) = seen  # [B], [2, B, Hq, n]
    assert key_start.tolist() == [0, 300, 50, 300]
    for b in (1, 3):
        assert (scores[:, b] == 0).all()
        assert (sel.structure.counts[b] == 0).all()
    assert (scores[:, 0].sum(-1) > 0).all() and (scores[:, 2].sum(-1) > 0).all()


# ---------------------------------------------------------------- bad input

def _good():
    q, k, v = torch.randn(10, 2, 16), torch.randn(12, 1, 16), torch.randn(12, 1, 16)
    return dict(q=q, k=k, v=v, cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen_q=6, max_seqlen_k=7)


BAD = [
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), TypeError,
     "cu_seqlens_q has dtype torch.int64; expected torch.int32"),
    (dict(cu_seqlens_k=[0, 5, 12]), TypeError, "cu_seqlens_k has type list"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError, "cu_seqlens_q is not monotone"),
    (dict(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q has 3 entries but cu_seqlens_k has 2; expected equal lengths"),
    (dict(cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)), ValueError, r"cu_seqlens_q has shape \(1, 3\)"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\] == 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 13], dtype=torch.int32)), ValueError, "cu_seqlens_k out of range"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 10], dtype=torch.int32)), ValueError, "expected q_len_b <= k_len_b"),
    (dict(max_seqlen_k=6), ValueError, "cu_seqlens_k has a sequence longer than max_seqlen_k = 6"),
    (dict(max_seqlen_q=5.0), TypeError, "max_seqlen_q=5.0 has type float; expected an int"),
    (dict(max_seqlen_q=0), ValueError, "max_seqlen_q=0 is not supported"),
    (dict(q=torch.randn(1, 10, 2, 16)), ValueError, r"q has shape \(1, 10, 2, 16\); expected 3 dims"),
    (dict(q=torch.randn(10, 3, 16), k=torch.randn(12, 2, 16), v=torch.randn(12, 2, 16)), ValueError,
     "multiple of the KV heads"),
    (dict(v=torch.randn(12, 1, 8)), ValueError, r"k has shape \(12, 1, 16\) but v has \(12, 1, 8\)"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_input_names_the_argument(change, error, message):
    args = {**_good(), **change}
    with pytest.raises(error, match=message):
        flexprefill_attention_varlen(**args)
    check_varlen_inputs(**_good())  # the good arguments pass


def test_packed_kernel_refuses_fp32_and_a_structure_of_another_batch():
    args = _good()
    structure = full_causal_structure(BlockGrid(6, 7, 64), 2, torch.zeros(2, dtype=torch.long),
                                      torch.tensor([3, 1]))
    with pytest.raises(TypeError, match="q has dtype torch.float32"):
        block_sparse_attention_triton_packed(args["q"], args["k"], args["v"], structure, args["cu_seqlens_q"],
                                             args["cu_seqlens_k"])
    half = {n: args[n].half() for n in ("q", "k", "v")}
    bad = BlockStructure(structure.indices[:1], structure.counts[:1], structure.grid)
    with pytest.raises(ValueError, match=r"structure.indices is torch.int32 of shape \(1, 2, 1, 1\)"):
        block_sparse_attention_triton_packed(half["q"], half["k"], half["v"], bad, args["cu_seqlens_q"],
                                             args["cu_seqlens_k"])


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_varlen_equals_padded_batch(dtype):
    # Full prefills of different lengths: the left-padded batch is the other way to run them together.
    lengths = [(4096, 4096), (2500, 2500), (1, 3000), (200, 200), (1800, 3600)]
    seqs, (q, k, v), cu_q, cu_k = _pack(lengths, 8, 2, 128, torch.float32, seed=11)
    q, k, v, cu_q, cu_k = (t.cuda() for t in (q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k))
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, cuda_dense_below=0)
    out, stats = flexprefill_attention_varlen_with_stats(q, k, v, cu_q, cu_k, 4096, 4096, config)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    prefills = [b for b, (a, n) in enumerate(lengths) if a == n]
    n_max = max(lengths[b][1] for b in prefills)
    padded = [torch.zeros(len(prefills), n_max, *t.shape[1:], dtype=dtype, device="cuda") for t in (q, k, v)]
    for row, b in enumerate(prefills):
        n = lengths[b][1]
        for dst, src, cu in zip(padded, (q, k, v), (cq, ck, ck)):
            dst[row, n_max - n :] = src[cu[b] : cu[b] + n]
    key_start = torch.tensor([n_max - lengths[b][1] for b in prefills], device="cuda")
    want, want_stats = flexprefill_attention_with_stats(*padded, config, key_start=key_start)
    for row, b in enumerate(prefills):
        n = lengths[b][1]
        # Same padded inputs to the selection, same blocks, same kernel arithmetic: equal bit for bit.
        assert torch.equal(stats.computed_blocks[b], want_stats.computed_blocks[row])
        assert torch.equal(out[cq[b] : cq[b + 1]], want[row, n_max - n :])
    # The decode rows (dense alone: SDPA, here the kernel over the full causal set) and the prefill on a cache.
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1.6e-2, atol=1.6e-2)
    for b, (a, n) in enumerate(lengths):
        if a != n:
            alone, alone_stats = flexprefill_attention_with_stats(
                q[None, cq[b] : cq[b + 1]], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]], config
            )
            torch.testing.assert_close(out[cq[b] : cq[b + 1]], alone[0], **tol)
            assert torch.equal(stats.computed_blocks[b], alone_stats.computed_blocks[0])


# ---------------------------------------------------------------- transformers' continuous batching

def _generate_batch(model, prompts, new_tokens=4, cb_config=None):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        outputs = model.generate_batch(prompts, config, continuous_batching_config=cb_config, progress_bar=False)
    return [outputs[f"req_{i}"].generated_tokens for i in range(len(prompts))]


@pytest.fixture
def varlen_calls(monkeypatch):
    """The stats of every varlen call, recorded by wrapping the operator the CB attention function calls."""
    import flexprefill_hf.ops.varlen as varlen

    calls, real = [], varlen.flexprefill_attention_varlen_with_stats

    def recording(*args, **kwargs):
        out, stats = real(*args, **kwargs)
        calls.append((args[3].shape[0] - 1, args[5], stats))  # sequences, max_seqlen_q: no host sync (CUDA graphs)
        return out, stats

    monkeypatch.setattr(varlen, "flexprefill_attention_varlen_with_stats", recording)
    return calls


def test_generate_batch_runs_flexprefill_with_packed_prompts_and_decode_rows(varlen_calls):
    from hf_tiny import EXACT, random_ids, tiny_model

    from flexprefill_hf.integration import unpatch_model
    from flexprefill_hf.integration.continuous_batching import cb_attention_name, patch_model_for_continuous_batching

    model = tiny_model("llama").eval()
    prompts = [random_ids(n, seed=i)[0].tolist() for i, n in enumerate((300, 40, 200))]
    want = _generate_batch(model, prompts)  # transformers' sdpa under continuous batching
    patch_model_for_continuous_batching(model, **EXACT)
    assert model.config._attn_implementation == cb_attention_name()
    got = _generate_batch(model, prompts)
    assert got == want  # gamma = 1, tau = 0: exact
    # The prompts went in packed, sparse (300 and 200 tokens are above the 128-token threshold); decode
    # steps are packed rows of one query each, dense.
    prefill = [c for c in varlen_calls if c[1] > 1]
    assert prefill and all(batch == 3 and not stats.dense for batch, _, stats in prefill)
    decode = [c for c in varlen_calls if c[1] == 1]
    assert decode and all(stats.dense for _, _, stats in decode)
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


def test_generate_batch_gives_each_prompt_what_generate_gives_it_alone(varlen_calls):
    from hf_tiny import SPARSE, random_ids, tiny_model

    from flexprefill_hf.integration import patch_model
    from flexprefill_hf.integration.continuous_batching import patch_model_for_continuous_batching

    model = tiny_model("llama", seed=1).eval()
    prompts = [random_ids(n, seed=10 + i)[0] for i, n in enumerate((420, 90, 260))]
    patch_model(model, gamma=0.9, tau=0.1, **SPARSE)
    with torch.no_grad():
        alone = [model.generate(p[None], max_new_tokens=4, do_sample=False, pad_token_id=0)[0, len(p) :].tolist()
                 for p in prompts]
    patch_model_for_continuous_batching(model, gamma=0.9, tau=0.1, **SPARSE)
    assert _generate_batch(model, [p.tolist() for p in prompts]) == alone
    # Not trivially: the packed prefill really dropped blocks.
    assert any(not stats.dense and (stats.computed_fraction < 1).any() for _, _, stats in varlen_calls)


def test_model_patched_for_continuous_batching_still_generates_a_padded_batch_and_records():
    # The same model keeps serving generate(): its mask function must be registered under the CB name too, or a
    # left-padded batch would get no mask at all; record_stats must accept the CB implementation.
    from hf_tiny import EXACT, random_ids, tiny_model

    import flexprefill_hf as fp
    from flexprefill_hf.integration.continuous_batching import patch_model_for_continuous_batching

    model = tiny_model("llama", seed=2).eval()
    short, long = random_ids(150, seed=3), random_ids(400, seed=4)
    with torch.no_grad():
        alone = model(short).logits[0, -1]
        batch = torch.cat([torch.zeros(1, 250, dtype=short.dtype), short], dim=1)
        mask = torch.cat([torch.zeros(1, 250, dtype=torch.long), torch.ones(1, 150, dtype=torch.long)], dim=1)
        patch_model_for_continuous_batching(model, **EXACT)
        with fp.record_stats(model):
            out = model(torch.cat([batch, long]), attention_mask=torch.cat([mask, torch.ones_like(mask)])).logits
        stats = fp.last_stats(model)
    fp.unpatch_model(model)
    torch.testing.assert_close(out[0, -1], alone, rtol=1e-4, atol=1e-4)
    assert all(s is not None for s in stats)


class _FakePagedCache:
    """The paged cache of transformers < 5.23 as the attention function sees it: ``update`` takes the new tokens
    [1, Hkv, new, D] and returns every request's keys packed [total_k, Hkv, D] (here: fixed, recorded)."""

    def __init__(self, k, v):
        self.k, self.v, self.calls = k, v, []

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        self.calls.append((key_states.shape, layer_idx, read_index, write_index))
        return self.k, self.v


def test_paged_function_takes_the_contract_before_transformers_5_23(monkeypatch):
    # Before 5.23 the function gets the new tokens, the cache, read/write indices and flash-attn's length names
    # (per layer type as a dict); from 5.23 the keys already read from the cache and max_length_*.
    from types import SimpleNamespace

    from flexprefill_hf.integration.continuous_batching import flexprefill_paged_attention_forward

    lengths = [(300, 300), (1, 200), (120, 260)]
    _, (q, k, v), cu_q, cu_k = _pack(lengths, 4, 2, 32, torch.float32, seed=5)
    module = SimpleNamespace(layer_idx=0, config=None, sliding_window=None)
    query = q.transpose(0, 1)[None]  # [1, Hq, total_q, D]
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, block_size=64, min_budget=64, dense_threshold=128)
    import flexprefill_hf.integration.continuous_batching as cb

    monkeypatch.setattr(cb, "layer_config", lambda module: config)
    new = torch.zeros(1, 2, 421, 32)  # the new tokens: what update writes
    cache = _FakePagedCache(k, v)
    old_style, _ = flexprefill_paged_attention_forward(
        module, query, new, new, None, scaling=None, cu_seq_lens_q=cu_q,
        cu_seq_lens_k={"full_attention": cu_k}, max_seqlen_q=300, max_seqlen_k={"full_attention": 300},
        cache=cache, read_index=["r"], write_index=["w"],
    )
    new_style, _ = flexprefill_paged_attention_forward(
        module, query, k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, scaling=None, cu_seq_lens_q=cu_q,
        cu_seq_lens_k=cu_k, max_length_q=300, max_length_k=300,
    )
    assert cache.calls == [(new.shape, 0, ["r"], ["w"])]
    assert torch.equal(old_style, new_style)
    want = flexprefill_attention_varlen(q, k, v, cu_q, cu_k, 300, 300, config)
    assert torch.equal(new_style[0], want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_varlen_replays_in_a_cuda_graph_on_new_lengths():
    # transformers' continuous batching captures its forward in CUDA graphs and replays them on new batches of
    # the same padded sizes: no host sync, no autotuning in the capture, lengths read on the device only.
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, cuda_dense_below=0)
    first, second = [(3000, 3000), (1, 2000), (900, 2600)], [(2000, 2000), (1, 3000), (1500, 2500)]
    _, (q, k, v), cu_q, cu_k = _pack(first, 8, 2, 128, torch.float32, seed=12)
    _, (q2, k2, v2), cu_q2, cu_k2 = _pack(second, 8, 2, 128, torch.float32, seed=13)
    rows, keys = max(q.shape[0], q2.shape[0]), max(k.shape[0], k2.shape[0])

    def static(t, n):  # same shapes for both batches: rows past the last sequence are padding
        return torch.cat([t, t.new_zeros((n - t.shape[0],) + t.shape[1:])]).to("cuda", torch.bfloat16)

    sq, sk, sv = static(q, rows), static(k, keys), static(v, keys)
    scq, sck = cu_q.cuda(), cu_k.cuda()

    def run():
        return flexprefill_attention_varlen(sq, sk, sv, scq, sck, 3000, 3000, config)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (and autotuning) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for batch in ((q, k, v, cu_q, cu_k), (q2, k2, v2, cu_q2, cu_k2)):
        sq.copy_(static(batch[0], rows)), sk.copy_(static(batch[1], keys)), sv.copy_(static(batch[2], keys))
        scq.copy_(batch[3]), sck.copy_(batch[4])
        graph.replay()
        eager = run()  # autotuned tiles: the same blocks, another summation order
        torch.cuda.synchronize()
        assert relative_error(captured, eager) < 1.6e-2 and (captured[int(batch[3][-1]) :] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_generate_batch_runs_the_packed_kernel(varlen_calls):
    # On CUDA continuous batching captures CUDA graphs by default for a "flash" implementation (no mask), after a
    # warmup at the cache's largest size: a cache of 64 pages keeps that warmup small (the default cache on a
    # GPU of 139 GiB: benchmarks/check_cb_gpu.py).
    from transformers import ContinuousBatchingConfig

    from hf_tiny import EXACT, random_ids, tiny_model

    from flexprefill_hf.integration.continuous_batching import patch_model_for_continuous_batching

    model = tiny_model("llama").to("cuda", torch.float16).eval()
    prompts = [random_ids(n, seed=20 + i)[0].tolist() for i, n in enumerate((900, 60, 500))]
    bounded = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=1024)
    want = _generate_batch(model, prompts, new_tokens=3, cb_config=bounded)
    patch_model_for_continuous_batching(model, cuda_dense_below=0, **EXACT)
    got = _generate_batch(model, prompts, new_tokens=3, cb_config=bounded)
    # gamma = 1: the prefill is exact up to fp16 rounding, so the first token (an argmax) agrees.
    assert [g[0] for g in got] == [w[0] for w in want]
    assert any(not stats.dense for _, _, stats in varlen_calls)


def test_block_means_in_row_chunks_equal_one_pass(monkeypatch):
    import flexprefill_hf.ops.varlen as varlen

    lengths = PACKINGS["random-a"]
    _, (q, _, _), cu_q, _ = _pack(lengths, 4, 2, 32, torch.float32, seed=1)
    grid = BlockGrid(max(a for a, _ in lengths), max(b for _, b in lengths), 64)
    whole = varlen._block_means(q, cu_q, cu_q.diff().long(), grid, grid.first_query_block)
    monkeypatch.setattr(varlen, "_SEGMENT_CHUNK_BYTES", 7 * 4 * 32 * 4)  # 7 rows a chunk
    assert torch.equal(varlen._block_means(q, cu_q, cu_q.diff().long(), grid, grid.first_query_block), whole)
    # Against the definition: a block's mean over its sequence's rows (end-aligned: the last block holds the
    # last 64 rows of every sequence), and 0 for blocks before a sequence's first query.
    for b in range(len(lengths)):
        rows = q[cu_q[b] : cu_q[b + 1]]
        torch.testing.assert_close(whole[b, :, -1], rows[-64:].mean(0), rtol=1e-5, atol=1e-6)
    assert (whole[2, :, 0] == 0).all()  # 240 queries: 4 blocks of the 9 hold none


@needs_interpreter
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize(
    "packing,block,head_dim,dtype",
    [
        ("one-long-many-short", 64, 32, torch.float16),
        ("decode-rows-and-prefills", 128, 16, torch.bfloat16),
        ("q-shorter-than-k", 64, 96, torch.float32),
    ],
)
def test_segment_means_kernel_equals_index_add(packing, block, head_dim, dtype):
    # The Triton block means (varlen_triton.py) against varlen._block_means, for q (blocks from the first query
    # block) and k, on rows read through the strides continuous batching hands over ([1, H, total, D]
    # transposed), with rows past the last sequence and an empty sequence.
    from flexprefill_hf.ops.varlen_triton import segment_block_means_triton

    import flexprefill_hf.ops.varlen as varlen

    lengths = PACKINGS[packing] + [(0, 0)]
    _, (q, k, _), cu_q, cu_k = _pack(lengths, 3, 1, head_dim, torch.float32, seed=block + head_dim)
    grid = BlockGrid(max(a for a, _ in lengths), max(b for _, b in lengths), block)
    for x, cu, first in ((q, cu_q, grid.first_query_block), (k, cu_k, 0)):
        x = torch.cat([x, torch.randn(5, *x.shape[1:])]).to(dtype)  # 5 rows of no sequence
        strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # [total, H, D] with the head stride largest
        want = varlen._block_means(strided, cu, cu.diff().long(), grid, first)
        got = segment_block_means_triton(strided, cu, grid, first)
        assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got[-1] == 0).all()  # the empty sequence


def test_segment_means_kernel_runs_on_cuda_by_default(monkeypatch):
    import flexprefill_hf.ops.varlen as varlen
    import flexprefill_hf.ops.varlen_triton as varlen_triton

    assert varlen.SEGMENT_MEANS_TRITON is True  # timed on the H200: 0.77-0.84x a varlen call's time
    called = []
    monkeypatch.setattr(varlen_triton, "segment_block_means_triton", lambda *a: called.append(a))
    lengths = [(100, 100), (40, 200)]
    _, (q, _, _), cu_q, _ = _pack(lengths, 2, 1, 16, torch.float16, seed=3)
    grid = BlockGrid(100, 200, 64)
    varlen._segment_means(q, cu_q, cu_q.diff().long(), grid, grid.first_query_block)
    assert not called  # CPU tensors: the index_add_ version
    if torch.cuda.is_available():
        varlen._segment_means(q.cuda(), cu_q.cuda(), cu_q.diff().long().cuda(), grid, grid.first_query_block)
        assert len(called) == 1


def test_the_packing_maps_are_inverse():
    """_left_padded lays the packed rows into the left-padded view (sequence b in its last lens[b] positions, the rest
    0) and _packed_positions sends each packed row to its place there: gathering back gives every row exactly,
    rows past cu_seqlens[B] are flagged, and a window of the view (``first``) is the same rows."""
    from flexprefill_hf.ops import varlen

    lens = torch.tensor([3, 0, 5, 1])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    total = int(cu[-1]) + 2  # two rows of no sequence
    x = torch.randn(total, 2, 4, generator=seeded(3))
    view = varlen._left_padded(x, cu, lens, 6)  # [B, 6, 2, 4]
    seq, position, real = varlen._packed_positions(cu, lens, total, 6)
    assert real.tolist() == [True] * 9 + [False] * 2
    assert seq[real].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 3]
    assert position[real].tolist() == [3, 4, 5, 1, 2, 3, 4, 5, 5]
    torch.testing.assert_close(view[seq[real], position[real]], x[real], rtol=0, atol=0)
    real_positions = torch.arange(6)[None, :] >= (6 - lens)[:, None]  # [B, 6]
    assert (view[~real_positions] == 0).all() and real_positions.sum() == 9
    torch.testing.assert_close(varlen._left_padded(x, cu, lens, 6, first=4), view[:, 4:], rtol=0, atol=0)
