"""The suite's methods: spec parsing, the two baselines' block patterns against hand-built ones, and the
methods applied to a tiny model (restored afterwards, left padding exact, ablations' patterns)."""

from __future__ import annotations

import types

import pytest
import torch

from flexprefill_hf.eval.methods import (
    EVAL_ATTENTION_NAME,
    PATTERN_ATTRIBUTE,
    QUERY_AWARE,
    RECORDER_ATTRIBUTE,
    STREAMING,
    VERTICAL_SLASH,
    Method,
    Recorder,
    StreamingPattern,
    VerticalSlashPattern,
    apply_method,
    eval_attention_forward,
    parse_methods,
    summarize,
)
from flexprefill_hf.eval.runner import left_pad
from flexprefill_hf.ops.block_structure import block_mask_to_structure
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.reference import (
    block_sparse_attention_reference,
    pool_key_scores,
    pool_offset_scores,
    representative_attention,
    slash_scores,
    vertical_scores,
)

from hf_tiny import SPARSE, VOCAB, tiny_model


def test_parse_methods_expands_sweeps():
    methods = parse_methods(["dense", "flexprefill:gamma=0.8|0.9,tau=0.2", "streaming:window=256|512", "vertical_slash"])
    assert [m.label for m in methods] == [
        "dense",
        "flexprefill[gamma=0.8,tau=0.2]",
        "flexprefill[gamma=0.9,tau=0.2]",
        "streaming[window=256]",
        "streaming[window=512]",
        "vertical_slash",
    ]
    assert methods[3].config == {"sink": 128, "window": 256, "block_size": 128}
    assert parse_methods(["dense", "dense"]) == [Method("dense")]
    assert parse_methods(["flexprefill:max_budget=none"])[0].params == (("max_budget", None),)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sparse", "'sparse' is not supported"),
        ("dense:gamma=0.9", "dense takes no parameters"),
        ("flexprefill:gamma", "is not key=value"),
        ("flexprefill:gamma=1.5", "gamma=1.5 is not supported"),
        ("flexprefill:colour=1", "'colour' is not a FlexPrefillConfig field"),
        ("flexprefill:block_size=96", "block_size=96 is not supported"),
        ("flexprefill:min_budget=1.5", "min_budget='1.5' is not an int"),
        ("flexprefill:preset=nope", "preset='nope' is not known"),
        ("flexprefill_vs_only:tau=0.3", "fixes tau"),
        ("streaming:window=0", "window=0 is not supported"),
        ("streaming:vertical=2", "'vertical' is not a streaming parameter"),
        ("vertical_slash:block_size=32", "block_size=32 is not supported"),
        ("streaming:window=1,window=2", "names a parameter twice"),
        ("streaming:fraction=0.3,window=256", "fraction sets window"),
        ("vertical_slash:fraction=1.5", "fraction=1.5 is not supported"),
        ("vertical_slash:fraction=0.2,slash=3", "fraction sets slash"),
    ],
)
def test_parse_methods_rejects(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_methods([spec])


def _inputs(batch=2, n=300, q_heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, n, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n, dim, generator=g, dtype=torch.float64) * 2  # peaked attention
    v = torch.randn(batch, kv_heads, n, dim, generator=g, dtype=torch.float64)
    return q, k, v


def _run_pattern(pattern, q, k, v, key_start):
    """The eval attention function on a stand-in module; returns (out [B, N, Hq, D], LayerStats)."""
    recorder = Recorder(1)
    module = types.SimpleNamespace(layer_idx=0, **{PATTERN_ATTRIBUTE: pattern, RECORDER_ATTRIBUTE: recorder})
    n = k.shape[2]
    mask = torch.arange(n)[None, :] >= key_start[:, None]  # [B, K] True = real token
    out, weights = eval_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert weights is None
    return out, recorder.layers[0]


def _expected(q, k, v, key_start, grid, keep):
    """Reference output and fractions for the block mask keep(b, h, i, j, sink) on the causal, real blocks."""
    batch, q_heads = q.shape[:2]
    nb = grid.num_blocks
    mask = torch.zeros(batch, q_heads, grid.num_query_blocks, nb, dtype=torch.bool)
    for b in range(batch):
        sink = (int(key_start[b]) + grid.pad) // grid.block_size
        for h in range(q_heads):
            for t, i in enumerate(range(grid.first_query_block, nb)):
                for j in range(sink, i + 1):
                    mask[b, h, t, j] = keep(b, h, i, j, sink) or j == i or j == sink
    structure = block_mask_to_structure(mask, grid)
    out, _ = block_sparse_attention_reference(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), structure, 0.25, key_start
    )
    causal = torch.tensor(
        [sum(i - (int(s) + grid.pad) // grid.block_size + 1 for i in range(nb)) for s in key_start], dtype=torch.float64
    )
    return out, mask.sum((-1, -2)) / causal[:, None]


def _real_rows(out, key_start):
    """Rows of real queries only (a padding query's output is 0 by convention, nothing to compare)."""
    return [out[b, int(s) :] for b, s in enumerate(key_start)]


@pytest.mark.parametrize("sink, window", [(64, 64), (1, 130), (128, 10_000)])
def test_streaming_pattern_against_hand_mask(sink, window):
    q, k, v = _inputs()
    key_start = torch.tensor([0, 37])
    grid = BlockGrid(300, 300, 64)  # nb 5, virtual padding 20
    pattern = StreamingPattern(-(-sink // 64), -(-window // 64), 64)
    out, stats = _run_pattern(pattern, q, k, v, key_start)
    sink_blocks, window_blocks = pattern.sink_blocks, pattern.window_blocks
    expected, fraction = _expected(
        q, k, v, key_start, grid, lambda b, h, i, j, s: j < s + sink_blocks or j > i - window_blocks
    )
    for got, want in zip(_real_rows(out, key_start), _real_rows(expected, key_start)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.computed_fraction.double(), fraction, rtol=1e-6, atol=1e-6)
    assert (stats.pattern == STREAMING).all()
    if window >= 300:
        assert (stats.computed_fraction == 1).all()


@pytest.mark.parametrize("vertical, slash", [(1, 1), (2, 0), (0, 2), (5, 5)])
def test_vertical_slash_pattern_against_reference_scores(vertical, slash):
    q, k, v = _inputs(seed=1)
    key_start = torch.tensor([0, 37])
    grid = BlockGrid(300, 300, 64)
    out, stats = _run_pattern(VerticalSlashPattern(vertical, slash, 64), q, k, v, key_start)

    n, r, groups = 300, 64, 2
    chosen = {}
    for b in range(2):
        valid = torch.arange(n) >= key_start[b]
        sink = (int(key_start[b]) + grid.pad) // 64
        positions = torch.arange(n - r, n)
        for h in range(4):
            attn = representative_attention(q[b, h, n - r :], k[b, h // groups], positions, valid, 0.25)
            key_blocks = pool_key_scores(vertical_scores(attn), grid)
            key_blocks[:sink] = -1.0  # padding blocks are never chosen
            offset_blocks = pool_offset_scores(slash_scores(attn, positions), grid)
            chosen[b, h] = (
                set(key_blocks.topk(min(vertical, 5)).indices.tolist()),
                set(offset_blocks.topk(min(slash, 5)).indices.tolist()),
            )
    expected, fraction = _expected(
        q, k, v, key_start, grid, lambda b, h, i, j, s: j in chosen[b, h][0] or (i - j) in chosen[b, h][1]
    )
    for got, want in zip(_real_rows(out, key_start), _real_rows(expected, key_start)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.computed_fraction.double(), fraction, rtol=1e-6, atol=1e-6)
    assert (stats.pattern == VERTICAL_SLASH).all()


@pytest.mark.parametrize("fraction", [0.4, 0.6, 0.9])
def test_streaming_fraction_is_the_narrowest_window_that_reaches_it(fraction):
    q, k, v = _inputs(batch=1, n=640)  # 10 blocks of 64, no padding
    key_start = torch.tensor([0])
    _, stats = _run_pattern(StreamingPattern(1, None, 64, fraction), q, k, v, key_start)
    window = StreamingPattern(1, None, 64, fraction).window(BlockGrid(640, 640, 64))
    assert window > 1  # a window of one block (the diagonal) is the least any pattern computes
    _, narrower = _run_pattern(StreamingPattern(1, window - 1, 64), q, k, v, key_start)
    assert (stats.computed_fraction >= fraction - 1e-6).all()
    assert (narrower.computed_fraction < fraction).all()


@pytest.mark.parametrize("fraction", [0.3, 0.6, 1.0])
def test_vertical_slash_fraction_is_the_smallest_budget_per_head(fraction):
    q, k, v = _inputs(batch=2, n=640, seed=3)
    key_start = torch.tensor([0, 100])
    _, stats = _run_pattern(VerticalSlashPattern(None, None, 64, fraction), q, k, v, key_start)
    # Per head, the share of the smallest fixed budget k = vertical = slash that reaches the fraction.
    fixed = torch.stack(
        [_run_pattern(VerticalSlashPattern(b, b, 64), q, k, v, key_start)[1].computed_fraction for b in range(11)]
    )  # [k, B, Hq]
    reached = fixed >= fraction - 1e-6
    smallest = reached.float().argmax(0)  # first k that reaches it
    expected = fixed.gather(0, smallest[None])[0]
    torch.testing.assert_close(stats.computed_fraction, expected)
    assert (stats.computed_fraction >= fraction - 1e-6).all()
    if fraction == 1.0:
        assert (stats.computed_fraction == 1).all()


def test_decode_step_runs_dense():
    q, k, v = _inputs(batch=1)
    recorder = Recorder(1)
    module = types.SimpleNamespace(layer_idx=0, **{PATTERN_ATTRIBUTE: StreamingPattern(1, 1, 64), RECORDER_ATTRIBUTE: recorder})
    out, _ = eval_attention_forward(module, q[:, :, -1:], k, v, None, scaling=0.25)
    weights = torch.softmax((q[0, :, -1:] @ k[0].repeat_interleave(2, 0).transpose(-1, -2)) * 0.25, -1)  # [Hq, 1, n]
    torch.testing.assert_close(out[0, 0], (weights @ v[0].repeat_interleave(2, 0))[:, 0])
    assert recorder.layers == [None]  # decode is not recorded


@torch.no_grad()
def _logits(model, rows):
    ids, mask, positions = left_pad(rows, 0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("spec", ["streaming:sink=64,window=128,block_size=64", "vertical_slash:vertical=1,slash=1,block_size=64"])
def test_baseline_on_a_model_left_padding_exact_and_restored(spec):
    model = tiny_model("llama", seed=2)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (400, 333)]
    dense = _logits(model, rows)
    (method,) = parse_methods([spec])
    with apply_method(model, method) as recorder:
        assert model.config._attn_implementation == EVAL_ATTENTION_NAME
        batch = _logits(model, rows)
        fractions = summarize(recorder.layer_stats(), 2)
        alone = _logits(model, rows[1:])
    assert model.config._attn_implementation == "sdpa"
    assert not any(PATTERN_ATTRIBUTE in m.__dict__ for m in model.modules())
    # The padded row computes what it computes alone; the sparse pattern really changes the logits.
    torch.testing.assert_close(batch[1, -333:], alone[0], rtol=1e-5, atol=1e-5)
    assert (batch[0] - dense[0]).abs().max() > 1e-3
    assert all(0 < f["computed_fraction"] < 1 for f in fractions)
    torch.testing.assert_close(_logits(model, rows), dense)


@pytest.mark.parametrize("kind, query_aware", [("flexprefill_qa_only", True), ("flexprefill_vs_only", False)])
def test_ablations_force_the_pattern(kind, query_aware):
    model = tiny_model("llama", seed=5)
    rows = [torch.randint(3, VOCAB, (384,), generator=torch.Generator().manual_seed(1)).tolist()]
    (method,) = parse_methods([f"{kind}:block_size={SPARSE['block_size']},min_budget={SPARSE['min_budget']}"])
    with apply_method(model, method) as recorder:
        _logits(model, rows)
        layers = recorder.layer_stats()
    assert layers and all(s is not None for s in layers)
    for stats in layers:
        assert ((stats.pattern == QUERY_AWARE) == query_aware).all()
    assert summarize(layers, 1)[0]["query_aware_share"] == (1.0 if query_aware else 0.0)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the baselines' Triton path")
@pytest.mark.parametrize(
    "pattern",
    [StreamingPattern(1, 2, 64), StreamingPattern(1, None, 128, 0.4), VerticalSlashPattern(2, 2, 64), VerticalSlashPattern(None, None, 128, 0.5)],
)
def test_baselines_on_cuda_run_the_kernel_on_their_blocks(pattern):
    """bf16 on CUDA: the Triton kernel over the pattern's blocks, against the float64 reference on the same blocks."""
    from flexprefill_hf.eval.methods import _limits

    q64, k64, v64 = _inputs(batch=2, n=1000, q_heads=4, kv_heads=2, dim=64, seed=7)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in (q64, k64, v64))
    key_start = torch.tensor([0, 130], device="cuda")
    out, stats = _run_pattern(pattern, q, k, v, key_start)
    grid = BlockGrid(1000, 1000, pattern.block_size)
    sink = (key_start + grid.pad) // grid.block_size
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    always, allowed = _limits(grid, sink)
    mask = (pattern.block_mask(qt, kt, grid, 0.25, sink, key_start.int()) | always) & allowed
    structure = block_mask_to_structure(mask.cpu(), grid)
    expected, _ = block_sparse_attention_reference(
        q.double().cpu().transpose(1, 2), k.double().cpu().transpose(1, 2), v.double().cpu().transpose(1, 2),
        structure, 0.25, key_start.cpu(),
    )
    for got, want in zip(_real_rows(out.double().cpu(), key_start.cpu()), _real_rows(expected, key_start.cpu())):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert ((stats.computed_fraction > 0) & (stats.computed_fraction <= 1)).all()
    if pattern.fraction is not None:
        assert (stats.computed_fraction >= pattern.fraction - 1e-6).all()
