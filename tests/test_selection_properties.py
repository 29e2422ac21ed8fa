"""Property test: on any small shape, the vectorised selection equals the per-head reference exactly."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops import reference
from flexprefill_hf.ops.attention.block_sparse_torch import block_sparse_attention_torch
from flexprefill_hf.ops.block_structure import structure_to_block_mask
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.testing import structured_qkv

from helpers import seeded


@st.composite
def problems(draw):
    k_len = draw(st.integers(130, 700))
    q_len = draw(st.integers(1, k_len))
    kv_heads = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 3, 4]))
    batch = draw(st.integers(1, 2))
    starts = [draw(st.integers(0, k_len - 1)) if b else 0 for b in range(batch)]
    config = FlexPrefillConfig(
        gamma=draw(st.floats(0.5, 1.0)),
        tau=draw(st.floats(0.0, 0.6)),
        block_size=64,
        min_budget=draw(st.sampled_from([0, 64, 128, 200])),
        max_budget=draw(st.sampled_from([None, 256])),
    )
    return batch, q_len, k_len, kv_heads * groups, kv_heads, starts, config, draw(st.integers(0, 10_000))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_selection_equals_reference_on_random_problems(problem):
    batch, q_len, k_len, q_heads, kv_heads, starts, config, seed = problem
    q, k, _ = structured_qkv(batch, k_len, q_heads, kv_heads, 16, q_len=q_len, generator=seeded(seed), dtype=torch.float64)
    key_start = torch.tensor(starts)
    scale = 1 / math.sqrt(16)
    want_mask, want_qa, want_js = reference.select_blocks_reference(q, k, config, scale, key_start)
    got = select_blocks(q, k, config, scale, key_start)
    assert torch.equal(structure_to_block_mask(got.structure), want_mask)
    assert torch.equal(got.query_aware, want_qa)
    torch.testing.assert_close(got.js_distance, want_js, equal_nan=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_cpu_sparse_attention_equals_reference_on_random_problems(problem):
    batch, q_len, k_len, q_heads, kv_heads, starts, config, seed = problem
    q, k, v = structured_qkv(batch, k_len, q_heads, kv_heads, 16, q_len=q_len, generator=seeded(seed), dtype=torch.float64)
    key_start = torch.tensor(starts)
    scale = 1 / math.sqrt(16)
    got = select_blocks(q, k, config, scale, key_start)
    out = block_sparse_attention_torch(q, k, v, got.structure, scale, key_start)
    want, _ = reference.block_sparse_attention_reference(q, k, v, got.structure, scale, key_start)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
