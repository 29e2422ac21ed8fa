"""The sparse route under torch.compile: one custom op (ops/compiled.py) whose fake matches the real op, and a
compiled call (fullgraph) that equals the eager one exactly. On CPU the op runs the PyTorch path; on CUDA the
same op runs the kernels (tests/test_gpu.py::test_torch_compile_fullgraph)."""

from __future__ import annotations

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig, flexprefill_attention, flexprefill_attention_with_stats
from flexprefill_hf.ops import compiled

from helpers import random_qkv

CONFIG = FlexPrefillConfig(block_size=64, min_budget=64, gamma=0.9)


def test_the_op_takes_every_config_field_in_order():
    import dataclasses
    import inspect

    names = tuple(field.name for field in dataclasses.fields(FlexPrefillConfig))
    assert compiled.CONFIG_FIELDS == names
    assert tuple(inspect.signature(compiled.sparse_prefill._init_fn).parameters)[5:] == names
    config = FlexPrefillConfig(gamma=0.8, tau=0.2, block_size=64, min_budget=128, max_budget=4096,
                               dense_threshold=300, cuda_dense_below=1000)
    assert compiled._config(*compiled.config_fields(config)) == config


@pytest.mark.parametrize("padded", [False, True])
def test_the_fake_matches_the_real_op(padded):
    """torch.library.opcheck: schema, fake tensor shapes/dtypes/strides against the real outputs, no aliasing."""
    q, k, v = random_qkv(2, 150, 333, 4, 2, 16, seed=11)
    key_start = torch.tensor([0, 40]) if padded else None
    torch.library.opcheck(compiled.sparse_prefill, (q, k, v, key_start, 0.25, *compiled.config_fields(CONFIG)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_sparse_route_equals_eager(padded):
    """fullgraph=True (no graph break) and the same output and statistics, bit for bit, on a prefill on a cache
    with HF's transposed views as inputs."""
    q, k, v = random_qkv(2, 150, 333, 4, 2, 16, seed=12)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # HF's [B, H, N, D] views
    key_start = torch.tensor([0, 40]) if padded else None

    def run(q, k, v):
        out, stats = flexprefill_attention_with_stats(q, k, v, CONFIG, key_start=key_start)
        return out, stats.query_aware, stats.js_distance, stats.computed_blocks, stats.computed_fraction

    torch._dynamo.reset()
    got = torch.compile(run, backend="aot_eager", fullgraph=True)(q, k, v)
    want = run(q, k, v)
    assert not want[0].isnan().any() and want[3].sum() > 0
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    plain = torch.compile(lambda q, k, v: flexprefill_attention(q, k, v, CONFIG, key_start=key_start),
                          backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(plain(q, k, v), want[0], rtol=0, atol=0)


def test_the_op_is_what_compiled_code_calls(monkeypatch):
    """Under compile the sparse route goes through the op (the eager route never does)."""
    calls = []
    from flexprefill_hf.ops import flexprefill as operator

    original = operator.sparse_route
    monkeypatch.setattr(operator, "sparse_route", lambda *a, **kw: calls.append(torch.compiler.is_compiling())
                        or original(*a, **kw))
    q, k, v = random_qkv(1, 333, 333, 4, 2, 16, seed=13)
    flexprefill_attention(q, k, v, CONFIG)
    assert calls == [False]
    torch._dynamo.reset()
    torch.compile(lambda q, k, v: flexprefill_attention(q, k, v, CONFIG), backend="aot_eager", fullgraph=True)(q, k, v)
    # Traced through the fake, then run once for real inside the op, where nothing is being compiled.
    assert calls == [False, False]


def test_a_config_first_seen_inside_the_trace():
    """A config compiled before any eager call (an id registry failed there on the H200: dynamo deferred its
    update past the op's first call), and a model that switches configs gets each one's selection."""
    q, k, v = random_qkv(1, 1000, 1000, 4, 2, 16, seed=14)
    current = {"config": FlexPrefillConfig(block_size=64, min_budget=64, gamma=0.5078125)}  # never used before

    def run(q, k, v):
        return flexprefill_attention_with_stats(q, k, v, current["config"])[1].computed_blocks

    torch._dynamo.reset()
    step = torch.compile(run, backend="aot_eager", fullgraph=True)
    first = step(q, k, v)
    assert torch.equal(first, run(q, k, v))
    current["config"] = current["config"].replace(gamma=0.99, tau=0.0)  # more blocks, vertical-slash only
    second = step(q, k, v)
    assert torch.equal(second, run(q, k, v)) and not torch.equal(second, first)


def test_dynamic_shapes_take_new_lengths_without_a_graph_break():
    """compile(dynamic=True): prompts of other lengths (and a prefill on a cache) through the same graph, each
    equal to eager; the fake's shapes follow the symbolic sizes."""
    torch._dynamo.reset()
    step = torch.compile(lambda q, k, v: flexprefill_attention(q, k, v, CONFIG), backend="aot_eager", fullgraph=True,
                         dynamic=True)
    for seed, (q_len, k_len) in enumerate([(333, 333), (400, 400), (150, 420)]):
        q, k, v = random_qkv(1, q_len, k_len, 4, 2, 16, seed=20 + seed)
        torch.testing.assert_close(step(q, k, v), flexprefill_attention(q, k, v, CONFIG), rtol=0, atol=0)
