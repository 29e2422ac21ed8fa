"""The fused Triton compose-and-pack kernel against the PyTorch composition: equal structures, exactly."""

import math

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.block_structure import causal_pair_count, causal_pair_index
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.selection import select, select_blocks
from flexprefill_hf.ops.selection.compose import MaskParts, compose_structure_torch
from flexprefill_hf.ops.selection.compose_triton import compose_structure_triton
from flexprefill_hf.testing import structured_qkv

from helpers import seeded

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_parts(batch, q_heads, grid, starts, short, seed):
    """Fresh random selection parts, densities varied per head so that masks range from sparse to full."""
    g = seeded(seed)
    nb = grid.num_blocks
    density = torch.rand(batch, q_heads, 1, generator=g) * 0.6
    vertical = torch.rand(batch, q_heads, nb, generator=g) < density
    slash = torch.rand(batch, q_heads, nb, generator=g) < density
    estimate = torch.rand(batch, q_heads, causal_pair_count(grid), generator=g) < density
    query_aware = torch.rand(batch, q_heads, generator=g) < 0.5
    sink = grid.sink_block(torch.tensor(starts))
    parts = MaskParts(*(t.to(DEVICE) for t in (vertical, slash, query_aware, torch.tensor(short), sink)))
    return parts, estimate.to(DEVICE)


def _fresh_outputs(batch, q_heads, grid):
    """Fresh structure buffers (sentinel-filled under the poison_empty fixture)."""
    indices = torch.empty(batch, q_heads, grid.num_query_blocks, grid.num_blocks, dtype=torch.int32, device=DEVICE)
    counts = torch.empty(batch, q_heads, grid.num_query_blocks, dtype=torch.int32, device=DEVICE)
    return indices, counts


@pytest.mark.parametrize(
    "batch,q_len,k_len,q_heads,block,starts,short,chunk,block_n",
    [
        (1, 700, 700, 3, 64, [0], [False], 3, 16),  # nb = 11: one loop step, nb not a power of two
        (2, 1300, 1300, 4, 64, [0, 333], [False, False], 2, 16),  # nb = 21 > block_n, head chunks of 2
        (2, 150, 1100, 2, 128, [0, 700], [False, True], 2, 16),  # q_len < k_len, a short (dense) sequence
        (1, 77, 2500, 2, 64, [5], [False], 1, 16),  # one query block row on a long cache, nb = 40
        (2, 2300, 2300, 2, 128, [1000, 2299], [False, False], 2, None),  # sink past the first query rows
    ],
)
def test_compose_structure_triton_equals_torch(
    batch, q_len, k_len, q_heads, block, starts, short, chunk, block_n, poison_empty
):
    grid = BlockGrid(q_len, k_len, block)
    parts, estimate = _random_parts(batch, q_heads, grid, starts, short, seed=k_len)
    want, want_counts = _fresh_outputs(batch, q_heads, grid)
    got, got_counts = _fresh_outputs(batch, q_heads, grid)
    assert (got < -1).all()  # poisoned: every entry the kernel leaves unwritten stays visible
    for h0 in range(0, q_heads, chunk):
        part = estimate[:, h0 : h0 + chunk].contiguous()
        compose_structure_torch(parts, part, grid, want, want_counts, h0)
        compose_structure_triton(parts, part, grid, got, got_counts, h0, block_n=block_n)
    assert torch.equal(got_counts, want_counts)
    assert torch.equal(got, want)
    assert (want_counts < grid.num_blocks).any() and (want_counts > 0).any()


def test_causal_pair_index_is_the_row_major_triangle():
    grid = BlockGrid(150, 1100, 128)  # first query block 7, two query blocks
    index = causal_pair_index(grid, "cpu")
    mask = torch.zeros(grid.num_query_blocks, grid.num_blocks, dtype=torch.bool)
    mask.view(-1)[index] = True
    i = torch.arange(grid.first_query_block, grid.num_blocks)[:, None]
    assert torch.equal(mask, torch.arange(grid.num_blocks)[None, :] <= i)
    assert len(index) == causal_pair_count(grid) and (index.diff() > 0).all()


@pytest.mark.parametrize(
    "batch,q_len,k_len,hq,hkv,block,starts",
    [
        (2, 1000, 1000, 4, 2, 64, [0, 300]),  # GQA, left padding, mixed patterns
        (1, 200, 1150, 3, 1, 128, None),  # prefix cache, a length not a multiple of the block
    ],
)
@pytest.mark.parametrize("one_head_per_chunk", [False, True])
@pytest.mark.parametrize("backend", ["triton", "compose"])
def test_select_blocks_structure_backends_agree(
    batch, q_len, k_len, hq, hkv, block, starts, one_head_per_chunk, backend, monkeypatch, poison_empty
):
    q, k, _ = structured_qkv(batch, k_len, hq, hkv, 16, q_len=q_len, generator=seeded(k_len), dtype=torch.float32)
    q, k = q.to(DEVICE), k.to(DEVICE)
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, block_size=block, min_budget=block)
    key_start = None if starts is None else torch.tensor(starts, device=DEVICE)
    scale = 1 / math.sqrt(16)
    if one_head_per_chunk:
        monkeypatch.setattr(select, "_MASK_CHUNK_BYTES", 1)
    a = select_blocks(q, k, config, scale, key_start, scores_backend="torch", structure_backend="torch")
    b = select_blocks(q, k, config, scale, key_start, scores_backend="torch", structure_backend=backend)
    assert torch.equal(a.structure.indices, b.structure.indices)
    assert torch.equal(a.structure.counts, b.structure.counts)
    assert torch.equal(a.query_aware, b.query_aware)
    if batch > 1:  # the case is meant to exercise both patterns
        assert a.query_aware.any() and not a.query_aware.all()


@pytest.mark.parametrize("argument", ["scores_backend", "structure_backend"])
def test_unknown_backend_is_rejected(argument):
    q = torch.randn(1, 300, 2, 16)
    allowed = "'triton', 'compose', 'torch' or None" if argument == "structure_backend" else "'triton', 'torch' or None"
    with pytest.raises(ValueError, match=f"{argument}='cuda' is not supported; expected {allowed}"):
        select_blocks(q, q, FlexPrefillConfig(block_size=64, min_budget=64), 0.25, **{argument: "cuda"})
