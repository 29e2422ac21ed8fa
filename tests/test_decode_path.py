"""The decode fast path and the dense route (issue 9, target 1): what they compute and what they skip.

Decode (q_len == 1) and dense-routed prefills must equal transformers' own sdpa attention (to fp32 rounding),
build no FlexPrefillStats unless a recorder is active, and take no mask path for an unpadded decode step.
Left-padded decode goes through the operator's padding row and must match the float64 reference. Speed is
measured on the GPU by ``benchmarks/bench_decode.py``, not here.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import flexprefill_hf
from flexprefill_hf import FlexPrefillConfig, flexprefill_attention, flexprefill_attention_with_stats
from flexprefill_hf.integration import routing
from flexprefill_hf.integration.layer_config import CONFIG_ATTRIBUTE
from flexprefill_hf.integration.stats import RECORDER_ATTRIBUTE, StatsRecorder
from flexprefill_hf.ops import backends
from flexprefill_hf.ops import flexprefill as operator
from flexprefill_hf.ops.attention import block_sparse_torch
from flexprefill_hf.ops.reference import dense_attention_reference

from hf_tiny import assert_close
from helpers import random_qkv

SMALL = dict(block_size=64, min_budget=64)


class Attention(torch.nn.Module):
    """What transformers' attention functions read off the module."""

    def __init__(self, groups: int, config: FlexPrefillConfig):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.layer_idx = 0
        self.__dict__[CONFIG_ATTRIBUTE] = config


def hf_layout(batch, q_len, k_len, q_heads, kv_heads, d, seed):
    """query [B, Hq, N, D], key/value [B, Hkv, K, D] as transformers hands them over (fp32)."""
    q, k, v = random_qkv(batch, q_len, k_len, q_heads, kv_heads, d, seed=seed)
    return q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


class Counter:
    """Counts calls of the wrapped function (monkeypatched in), so the test sees what ran."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    """Counters on the stats builders and the chunked mask path, patched where the operator calls them."""
    counters = dict(
        dense_stats=Counter(operator._dense_stats),
        stats=Counter(operator.FlexPrefillStats),
        masked=Counter(block_sparse_torch.masked_attention_torch),
    )
    monkeypatch.setattr(operator, "_dense_stats", counters["dense_stats"])
    monkeypatch.setattr(operator, "FlexPrefillStats", counters["stats"])
    monkeypatch.setattr(block_sparse_torch, "masked_attention_torch", counters["masked"])
    return counters


@pytest.mark.parametrize("k_len", [1, 7, 300])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2)])
def test_routed_decode_equals_transformers_sdpa(k_len, q_heads, kv_heads, counted):
    module = Attention(q_heads // kv_heads, FlexPrefillConfig(**SMALL))
    query, key, value = hf_layout(2, 1, k_len, q_heads, kv_heads, 32, seed=k_len + q_heads)
    with torch.no_grad():
        want, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.2)
        out, weights = routing.flexprefill_attention_forward(module, query, key, value, None, scaling=0.2)
    assert weights is None and out.shape == want.shape == (2, 1, q_heads, 32)
    assert_close(out, want, rtol=1e-5)
    ref, _ = dense_attention_reference(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0.2)
    assert_close(out.double(), ref, rtol=1e-5)
    assert counted["stats"].calls == 0 and counted["dense_stats"].calls == 0 and counted["masked"].calls == 0


def test_routed_decode_builds_no_stats_even_inside_record_stats(counted):
    """Decode steps are never recorded, so a recorder does not make them build statistics."""
    module = Attention(2, FlexPrefillConfig(**SMALL))
    recorder = StatsRecorder(1)
    module.__dict__[RECORDER_ATTRIBUTE] = recorder
    query, key, value = hf_layout(1, 1, 200, 4, 2, 16, seed=3)
    with torch.no_grad():
        routing.flexprefill_attention_forward(module, query, key, value, None)
        assert counted["stats"].calls == 0 and recorder.stats == [None]
        # The same module's prefill does record (so the counters above can see a build).
        query, key, value = hf_layout(1, 200, 200, 4, 2, 16, seed=4)
        routing.flexprefill_attention_forward(module, query, key, value, None)
    assert counted["dense_stats"].calls + counted["stats"].calls >= 1 and recorder.stats[0] is not None


@pytest.mark.parametrize("n,threshold", [(64, None), (128, None), (200, 256)])  # SMALL's own threshold: 128
def test_dense_routed_prefill_equals_transformers_sdpa_without_stats(n, threshold, counted):
    config = FlexPrefillConfig(**SMALL, dense_threshold=threshold)
    assert n <= config.effective_dense_threshold
    module = Attention(2, config)
    query, key, value = hf_layout(2, n, n, 4, 2, 32, seed=n)
    with torch.no_grad():
        want, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.2, is_causal=True)
        out, _ = routing.flexprefill_attention_forward(module, query, key, value, None, scaling=0.2)
    assert_close(out, want, rtol=1e-5)
    assert counted["stats"].calls == 0 and counted["dense_stats"].calls == 0 and counted["masked"].calls == 0


def test_operator_no_stats_variant_builds_none_and_with_stats_does(counted):
    config = FlexPrefillConfig(**SMALL)
    q, k, v = random_qkv(2, 1, 500, 4, 2, 16, seed=11)
    out = flexprefill_attention(q, k, v, config)
    assert counted["stats"].calls == 0 and counted["dense_stats"].calls == 0
    q, k, v = random_qkv(1, 600, 600, 4, 2, 16, seed=12)  # the sparse route
    flexprefill_attention(q, k, v, config)
    assert counted["stats"].calls == 0
    out2, stats = flexprefill_attention_with_stats(*random_qkv(2, 1, 500, 4, 2, 16, seed=11), config)
    assert counted["dense_stats"].calls == 1 and stats.dense
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2)])
def test_left_padded_decode_matches_the_reference(q_heads, kv_heads, counted):
    """Through the routing (a [B, K] padding mask) and through the operator (key_start): the padding row only.
    The last sequence is padding only (an all-zero mask row, key_start == k_len): its row is 0."""
    k_len, starts = 300, [0, 17, 299, 300]
    module = Attention(q_heads // kv_heads, FlexPrefillConfig(**SMALL))
    query, key, value = hf_layout(4, 1, k_len, q_heads, kv_heads, 32, seed=q_heads)
    key_start = torch.tensor(starts)
    mask = torch.arange(k_len)[None, :] >= key_start[:, None]  # bool [B, K], True = real
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    ref, _ = dense_attention_reference(q, k, v, 0.2, key_start)
    with torch.no_grad():
        out, _ = routing.flexprefill_attention_forward(module, query, key, value, mask, scaling=0.2)
        direct = flexprefill_attention(q, k, v, softmax_scale=0.2, key_start=key_start)
    assert_close(out.double(), ref, rtol=1e-5)
    assert_close(direct.double(), ref, rtol=1e-5)
    # Sequence 2 has one real key: its output is that key's value, exactly.
    torch.testing.assert_close(out[2, 0], value[2, :, -1].repeat_interleave(q_heads // kv_heads, 0))
    assert (ref[3] == 0).all() and (out[3] == 0).all() and (direct[3] == 0).all()
    assert counted["masked"].calls == 0 and counted["stats"].calls == 0


def test_decode_in_a_patched_model_matches_sdpa_step_by_step():
    """Greedy generation of a tiny Llama, patched against unpatched, unpadded and left-padded: same logits."""
    from hf_tiny import left_pad, random_ids, tiny_model  # noqa: I001 (the tiny models build on import)

    model = tiny_model("llama")
    ids, mask, _ = left_pad([random_ids(40, seed=1)[0], random_ids(25, seed=2)[0]])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        for batch_ids, batch_mask in ((ids[:1], None), (ids, mask)):
            want = model.generate(batch_ids, attention_mask=batch_mask, **kwargs)
            flexprefill_hf.patch_model(model)
            try:
                got = model.generate(batch_ids, attention_mask=batch_mask, **kwargs)
            finally:
                flexprefill_hf.unpatch_model(model)
            assert torch.equal(got.sequences, want.sequences)
            for step_got, step_want in zip(got.logits, want.logits):
                assert_close(step_got, step_want, rtol=1e-4)


def test_decode_attention_gives_zero_for_a_row_of_padding_only():
    """An all-False mask row (no real key): 0 by definition, whatever SDPA's backend makes of it; the other
    rows are untouched."""
    query, key, value = hf_layout(3, 1, 40, 4, 2, 16, seed=22)
    key_mask = torch.arange(40)[None, :] >= torch.tensor([40, 0, 39])[:, None]
    out = backends.decode_attention(query, key, value, 0.3, key_mask)
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1:], backends.decode_attention(query[1:], key[1:], value[1:], 0.3, key_mask[1:]))
    torch.testing.assert_close(out[2], value[2, :, -1:].repeat_interleave(2, 0))


def test_decode_attention_packs_query_heads_under_a_padding_mask():
    """decode_attention with a mask: query heads of one KV head become rows; every head equals its own SDPA."""
    query, key, value = hf_layout(2, 1, 50, 6, 2, 16, seed=21)
    key_mask = torch.arange(50)[None, :] >= torch.tensor([0, 9])[:, None]
    out = backends.decode_attention(query, key, value, 0.3, key_mask)
    rep_k, rep_v = key.repeat_interleave(3, 1), value.repeat_interleave(3, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, rep_k, rep_v, attn_mask=key_mask[:, None, None, :], scale=0.3
    )
    assert_close(out, want, rtol=1e-5)


@pytest.mark.parametrize("q_len,k_len,backend", [(1, 96, "sdpa"), (96, 96, "sdpa_cudnn"), (96, 96, "sdpa")])
def test_dense_route_traces_under_torch_compile(q_len, k_len, backend):
    """Under torch.compile(fullgraph=True) the dense route never picks flash-attn-4 (no custom op to trace) and
    its SDPA calls (cuDNN-first context included) trace without a graph break."""
    q, k, v = random_qkv(1, q_len, k_len, 4, 2, 16, seed=q_len)
    on_h200 = ("cuda", (9, 0), torch.bfloat16, 128, 4096, 4096, False)
    assert backends.dense_backend_for(*on_h200, fa4=True, compiling=True) == "sdpa_cudnn"
    assert backends.dense_backend_for(*on_h200, fa4=True, compiling=False) == "fa4"
    compiled = torch.compile(lambda q, k, v: backends.dense_attention(q, k, v, 0.25, None, backend=backend),
                             backend="eager", fullgraph=True)
    ref, _ = dense_attention_reference(q, k, v, 0.25)
    assert_close(compiled(q, k, v).double(), ref, rtol=1e-5)


def test_operator_decode_under_torch_compile_fullgraph():
    q, k, v = random_qkv(2, 1, 70, 4, 2, 16, seed=5)
    config = FlexPrefillConfig(**SMALL)
    compiled = torch.compile(lambda q, k, v: flexprefill_attention(q, k, v, config), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), flexprefill_attention(q, k, v, config), rtol=0, atol=0)


def test_sparse_route_picks_triton_under_compile_and_fa4_eagerly():
    """The operator's sparse-backend decision on the cases it can meet (plain values: runs without a GPU)."""
    from flexprefill_hf.ops.attention.block_sparse_fa4 import KernelCase

    case = dict(device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, block_size=128, head_dim=128,
                padded=False)
    assert backends.sparse_backend_for(KernelCase(**case), fa4=True)[0] == "fa4"
    name, reason = backends.sparse_backend_for(KernelCase(**case, compiling=True), fa4=True)
    assert name == "triton" and "torch.compile" in reason
    assert backends.sparse_backend_for(KernelCase(**case), fa4=False)[0] == "triton"



def test_the_cached_sparse_backend_decision_is_the_plain_value_one(monkeypatch):
    """On CUDA, choose_sparse_backend caches its decision by (device, dtype, block size, head dim, padding): for
    every such case it is what sparse_backend_for says of the KernelCase with that device's capability."""
    from flexprefill_hf.ops.attention.block_sparse_fa4 import KernelCase

    capabilities = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(backends, "cuda_capability", capabilities.__getitem__)
    backends._cuda_sparse_backend.cache_clear()
    try:
        seen = set()
        for index, capability in capabilities.items():
            for dtype in (torch.bfloat16, torch.float16):
                for block_size, head_dim, padded, short in ((128, 64, False, False), (64, 64, False, False),
                                                            (128, 256, False, False), (128, 128, True, False),
                                                            (128, 128, False, True), (128, 128, False, False)):
                    want = backends.sparse_backend_for(KernelCase("cuda", capability, dtype, block_size, head_dim,
                                                                  padded), short=short)
                    got = backends._cuda_sparse_backend(index, dtype, block_size, head_dim, padded, short)
                    assert got == want
                    seen.add(got[1])
        assert any("compute capability (8, 0)" in reason for reason in seen)
        assert any("FA4_SPARSE_FROM" in reason for reason in seen)
    finally:
        backends._cuda_sparse_backend.cache_clear()
