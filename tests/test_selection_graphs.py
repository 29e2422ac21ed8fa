"""The selection replayed from CUDA graphs (ops/selection/graphs.py): the same selection as the eager call, bit for
bit, on every replay with fresh inputs; outputs that later replays leave alone; a bounded cache; no host sync;
eager inside a caller's own capture."""

import math

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.selection import graphs, select_blocks
from flexprefill_hf.testing import structured_qkv

from helpers import seeded

CONFIG = FlexPrefillConfig(gamma=0.9, tau=0.1, block_size=128, min_budget=512, cuda_dense_below=0)
SCALE = 1 / math.sqrt(128)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fresh_graphs(monkeypatch):
    graphs.clear()
    monkeypatch.setattr(graphs, "GRAPHS_BELOW", 1 << 20)
    yield
    graphs.clear()


def _fields(selection):
    return (selection.structure.indices, selection.structure.counts, selection.query_aware,
            selection.js_distance, selection.causal_blocks)


def _assert_same(got, want):
    """Every field equal, bit for bit (NaN distances where the other has NaN)."""
    for a, b in zip(_fields(got), _fields(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _eager(*args, select=select_blocks, **kwargs):
    """The selection with graphs off: what the graphed call must equal."""
    saved, graphs.GRAPHS_BELOW = graphs.GRAPHS_BELOW, None
    try:
        return select(*args, **kwargs)
    finally:
        graphs.GRAPHS_BELOW = saved


def _case(name, seed):
    """(q, k, kwargs) of one call shape with fresh values per seed."""
    g = seeded(seed)
    if name == "aligned":
        q, k, _ = structured_qkv(1, 4096, 8, 2, 128, dtype=torch.bfloat16, device="cuda", generator=g)
        return q, k, {}
    if name == "padded batch":  # 3000 keys (not a multiple of the block), left padding, GQA 4
        q, k, _ = structured_qkv(2, 3000, 8, 2, 128, dtype=torch.bfloat16, device="cuda", generator=g)
        return q, k, dict(key_start=torch.tensor([0, 700], device="cuda"))
    if name == "cache":  # a prefill of 1000 queries on 3000 keys
        q, k, _ = structured_qkv(1, 3000, 8, 2, 128, q_len=1000, dtype=torch.bfloat16, device="cuda", generator=g)
        return q, k, {}
    if name == "query start":  # packed-style call: the first real query per sequence given
        q, k, _ = structured_qkv(2, 2500, 8, 2, 64, q_len=1500, dtype=torch.float16, device="cuda", generator=g)
        return q, k, dict(key_start=torch.tensor([0, 200], device="cuda"),
                          query_start=torch.tensor([1000, 1800], device="cuda"))
    if name == "strided k":  # k as the transposed view a model hands over ([B, H, n, D] storage)
        q, k, _ = structured_qkv(1, 4096, 8, 2, 128, dtype=torch.bfloat16, device="cuda", generator=g)
        return q, k.transpose(1, 2).contiguous().transpose(1, 2), {}
    raise AssertionError(name)


@cuda
@pytest.mark.parametrize("name", ["aligned", "padded batch", "cache", "query start", "strided k"])
def test_graphed_selection_is_the_eager_selection(name, fresh_graphs):
    """Calls 1 (eager, remembered), 2 (capture, replay) and 3-4 (replay), each on fresh values: each equals the
    eager call on its inputs exactly, and a graph is held after the second."""
    scale = 1 / math.sqrt(_case(name, 0)[0].shape[-1])
    results = []
    for call in range(4):
        q, k, kwargs = _case(name, call)
        got = select_blocks(q, k, CONFIG, scale, **kwargs)
        assert len(graphs.cached_keys()) == (0 if call == 0 else 1)
        _assert_same(got, _eager(q, k, CONFIG, scale, **kwargs))
        results.append((got, _eager(q, k, CONFIG, scale, **kwargs)))
    # Later replays wrote into the graph's buffers, not into what earlier calls returned.
    for got, want in results:
        _assert_same(got, want)
    assert not torch.equal(results[2][0].structure.indices, results[3][0].structure.indices)


@cuda
def test_graph_cache_is_bounded_and_keyed_by_shape_and_config(fresh_graphs, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    shapes = [(2048, CONFIG), (2560, CONFIG), (2048, CONFIG.replace(gamma=0.95))]
    for n, config in shapes:
        q, k, _ = structured_qkv(1, n, 8, 2, 128, dtype=torch.bfloat16, device="cuda", generator=seeded(n))
        for _ in range(2):
            _assert_same(select_blocks(q, k, config, SCALE), _eager(q, k, config, SCALE))
    keys = graphs.cached_keys()
    assert len(keys) == 2
    assert [key[0][2] for key in keys] == [2560, 2048] and keys[1][0][4].gamma == 0.95


@cuda
def test_capture_and_replay_make_no_host_sync(fresh_graphs):
    q, k, kwargs = _case("padded batch", 0)
    select_blocks(q, k, CONFIG, SCALE, **kwargs)  # first sighting (compiles the kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        select_blocks(q, k, CONFIG, SCALE, **kwargs)  # capture
        select_blocks(q, k, CONFIG, SCALE, **kwargs)  # replay
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(graphs.cached_keys()) == 1


@cuda
def test_a_callers_capture_takes_the_eager_selection(fresh_graphs):
    q, k, _ = _case("aligned", 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        select_blocks(q, k, CONFIG, SCALE)
    torch.cuda.current_stream().wait_stream(stream)
    held = len(graphs.cached_keys())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = select_blocks(q, k, CONFIG, SCALE)
    assert len(graphs.cached_keys()) == held  # nothing captured inside the caller's capture
    fresh_q, fresh_k, _ = _case("aligned", 1)
    q.copy_(fresh_q), k.copy_(fresh_k)
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(captured, _eager(q, k, CONFIG, SCALE))


def test_no_graphs_on_cpu():
    assert not graphs.wanted(torch.device("cpu"), 4096)


@cuda
def test_graphed_packed_selection_is_the_eager_one(fresh_graphs):
    """select_blocks_varlen (packed keys read in place, cu_seqlens in the graph's inputs): calls 1-3 on fresh values
    of the same packing equal the eager selection exactly."""
    from flexprefill_hf.ops.varlen import select_blocks_varlen

    k_lens, q_lens = [3000, 1200, 2048], [3000, 700, 1]  # a prompt, a prefill on a cache, a decode row
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    for call in range(3):
        g = seeded(10 + call)
        q = torch.randn(sum(q_lens), 8, 128, generator=g).to("cuda", torch.bfloat16)
        k = torch.randn(sum(k_lens), 2, 128, generator=g).to("cuda", torch.bfloat16)
        args = (q, k, cu_q, cu_k, max(q_lens), max(k_lens), CONFIG, SCALE)
        _assert_same(select_blocks_varlen(*args), _eager(*args, select=select_blocks_varlen))
        assert len(graphs.cached_keys()) == (0 if call == 0 else 1)
