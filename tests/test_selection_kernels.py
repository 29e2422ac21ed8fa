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


@pytest.mark.parametrize(
    "batch,q_len,k_len,hq,hkv,d,block,starts,dtype",
    [
        (1, 333, 333, 4, 2, 64, 64, None, torch.float16),
        (2, 77, 300, 3, 1, 32, 64, [0, 100], torch.bfloat16),
        (1, 1000, 1000, 7, 1, 128, 128, None, torch.float16),
        (2, 1, 200, 2, 1, 16, 64, [5, 190], torch.float16),
        (1, 130, 700, 4, 4, 96, 128, None, torch.bfloat16),
        (1, 64, 1100, 2, 1, 32, 64, None, torch.float16),  # more than 1024 offsets: two slash programs
    ],
)
@pytest.mark.parametrize("splits", [None, 5])
def test_representative_scores_match_torch(
    batch, q_len, k_len, hq, hkv, d, block, starts, dtype, splits, monkeypatch, poison_empty
):
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
    # Fresh memory is poisoned (NaN): the kernels must write every output and read no scratch they did not write.
    before = len(poison_empty.shapes)
    got_v, got_s = representative_scores_triton(q, k, grid, scale, key_start, splits=splits)
    assert (2, batch, hq, k_len) in poison_empty.shapes[before:]  # the output itself came poisoned
    # Same half-precision inputs, fp32 arithmetic in both: only the summation order differs.
    torch.testing.assert_close(got_v, want_v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_s, want_s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_v.sum(-1), torch.ones_like(got_v.sum(-1)), rtol=1e-4, atol=1e-4)


def test_selection_with_triton_scores_equals_torch_scores():
    q, k, _ = structured_qkv(2, 600, 4, 2, 64, dtype=torch.float16, generator=seeded(2))
    q, k = q.to(DEVICE), k.to(DEVICE)
    config = FlexPrefillConfig(gamma=0.9, tau=0.3, block_size=64, min_budget=64)
    key_start = torch.tensor([0, 70], device=DEVICE)
    a = select_blocks(q, k, config, 0.125, key_start, scores_backend="torch")
    b = select_blocks(q, k, config, 0.125, key_start, scores_backend="triton")
    assert torch.equal(structure_to_block_mask(a.structure), structure_to_block_mask(b.structure))
    assert torch.equal(a.query_aware, b.query_aware)
