"""End-to-end behaviour of the public operator (its PyTorch path on CPU) and of its configuration.
The operator's and the configuration's bad input are rows of test_bad_input.py.

Oracles are the float64 references (``ops/reference.py``) on fresh random inputs; tolerances follow the dtype.
"""

import math

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig, flexprefill_attention, flexprefill_attention_with_stats
from flexprefill_hf.ops import reference
from flexprefill_hf.ops.attention.dense import dense_attention_torch
from flexprefill_hf.ops.block_structure import structure_to_block_mask
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.testing import structured_qkv

from helpers import random_qkv, relative_error, seeded

SMALL = dict(block_size=64, min_budget=64)  # dense threshold max(2 * 64, 64) = 128 keys
# Relative (Frobenius) error allowed against float64, by input dtype: a few units of its rounding.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize(
    "batch,q_len,k_len,hq,hkv,d,starts",
    [(1, 700, 700, 4, 4, 32, None), (2, 333, 1000, 6, 2, 16, [0, 210]), (2, 500, 500, 7, 1, 16, [130, 0])],
)
def test_gamma_one_tau_zero_equals_dense(batch, q_len, k_len, hq, hkv, d, starts, poison_empty):
    q, k, v = random_qkv(batch, q_len, k_len, hq, hkv, d, seed=q_len)
    key_start = None if starts is None else torch.tensor(starts)
    out, stats = flexprefill_attention_with_stats(q, k, v, FlexPrefillConfig(gamma=1.0, tau=0.0, **SMALL), key_start=key_start)
    want, _ = reference.dense_attention_reference(q, k, v, 1 / math.sqrt(d), key_start)
    assert not stats.dense
    assert torch.equal(stats.computed_fraction, torch.ones_like(stats.computed_fraction))
    assert relative_error(out, want) < 1e-5
    if key_start is not None:  # padding query rows are exactly zero
        for b, s in enumerate(starts):
            assert (out[b, : max(0, s - (k_len - q_len))] == 0).all()


def test_sparse_output_matches_reference_on_same_selection(poison_empty):
    q, k, v = structured_qkv(2, 900, 8, 2, 32, q_len=600, generator=seeded(4))
    key_start = torch.tensor([0, 170])
    config = FlexPrefillConfig(gamma=0.9, tau=0.2, **SMALL)
    out, stats = flexprefill_attention_with_stats(q, k, v, config, key_start=key_start)
    sel = select_blocks(q, k, config, 1 / math.sqrt(32), key_start)
    want, _ = reference.block_sparse_attention_reference(q, k, v, sel.structure, 1 / math.sqrt(32), key_start)
    assert relative_error(out, want) < 1e-5
    assert (stats.computed_fraction < 1).any()


def test_short_turn_on_a_cache_matches_reference_on_same_selection(poison_empty):
    """q_len < block: the representative rows are all the new queries; padding is masked."""
    q, k, v = structured_qkv(2, 900, 4, 2, 32, q_len=5, generator=seeded(8))
    key_start = torch.tensor([300, 0])
    config = FlexPrefillConfig(gamma=0.9, tau=0.2, **SMALL)
    out = flexprefill_attention(q, k, v, config, key_start=key_start)
    sel = select_blocks(q, k, config, 1 / math.sqrt(32), key_start)
    want, _ = reference.block_sparse_attention_reference(q, k, v, sel.structure, 1 / math.sqrt(32), key_start)
    assert relative_error(out, want) < 1e-5


def test_every_real_row_keeps_sink_and_diagonal_and_has_keys():
    q, k, v = structured_qkv(2, 1100, 4, 2, 32, generator=seeded(6))
    key_start = torch.tensor([0, 333])
    config = FlexPrefillConfig(gamma=0.6, tau=0.1, **SMALL)
    sel = select_blocks(q, k, config, 1 / math.sqrt(32), key_start)
    grid = sel.structure.grid
    mask = structure_to_block_mask(sel.structure)
    for b, start in enumerate([0, 333]):
        sink = grid.block_of_key(start)
        i = torch.arange(sink, grid.num_blocks)
        assert mask[b][:, i, i].all() and mask[b][:, i, sink].all()
    out = flexprefill_attention(q, k, v, config, key_start=key_start)
    assert torch.isfinite(out).all()
    # Real rows attend at least their own key, so none is all-zero.
    assert (out[0].abs().sum(-1) > 0).all() and (out[1, 333:].abs().sum(-1) > 0).all()


def test_error_shrinks_as_gamma_grows():
    q, k, v = structured_qkv(1, 1536, 8, 2, 32, generator=seeded(1))
    want, _ = reference.dense_attention_reference(q, k, v, 1 / math.sqrt(32))
    errors, fractions = [], []
    for gamma in (0.6, 0.8, 0.9, 0.95, 0.99, 1.0):
        out, stats = flexprefill_attention_with_stats(q, k, v, FlexPrefillConfig(gamma=gamma, tau=0.0, **SMALL))
        errors.append(relative_error(out, want))
        fractions.append(float(stats.computed_fraction.mean()))
    # On this input every step of gamma keeps more blocks and strictly lowers the error (measured:
    # 0.28, 0.23, 0.20, 0.17, 0.10, then fp32 rounding at gamma = 1).
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert all(later > earlier for earlier, later in zip(fractions, fractions[1:])), fractions
    assert errors[-1] < 1e-5 and fractions[0] < 0.7


def test_left_padded_batch_equals_each_sequence_alone():
    """The end-aligned grid gives a padded sequence the blocks it gets alone, hence the same output."""
    q, k, v = structured_qkv(2, 1000, 4, 2, 32, generator=seeded(9))
    config = FlexPrefillConfig(gamma=0.85, tau=0.2, **SMALL)
    pad = 230
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    for t in (qp, kp, vp):
        t[1, pad:] = t[1, :-pad].clone()
        t[1, :pad] = torch.randn_like(t[1, :pad]) * 100  # garbage that must not leak
    out, stats = flexprefill_attention_with_stats(qp, kp, vp, config, key_start=torch.tensor([0, pad]))
    alone, alone_stats = flexprefill_attention_with_stats(q[1:, :-pad], k[1:, :-pad], v[1:, :-pad], config)
    torch.testing.assert_close(out[1, pad:], alone[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.query_aware[1], alone_stats.query_aware[0])
    assert torch.equal(stats.computed_blocks[1], alone_stats.computed_blocks[0])
    assert (out[1, :pad] == 0).all()


def test_prefill_on_cache_matches_the_rows_of_a_full_prefill_when_dense():
    q, k, v = random_qkv(1, 1000, 1000, 4, 2, 16, seed=3)
    config = FlexPrefillConfig(gamma=1.0, tau=0.0, **SMALL)
    full = flexprefill_attention(q, k, v, config)
    tail = flexprefill_attention(q[:, 700:], k, v, config)
    torch.testing.assert_close(tail, full[:, 700:], rtol=1e-5, atol=1e-6)


def test_dense_routes_and_stats():
    q, k, v = random_qkv(2, 1, 900, 4, 2, 16, seed=2)
    out, stats = flexprefill_attention_with_stats(q, k, v, FlexPrefillConfig(**SMALL), key_start=torch.tensor([0, 50]))
    want, _ = reference.dense_attention_reference(q, k, v, 0.25, torch.tensor([0, 50]))
    assert stats.dense and relative_error(out, want) < 1e-5
    assert torch.isnan(stats.js_distance).all() and torch.equal(stats.computed_fraction, torch.ones(2, 4))
    q, k, v = random_qkv(1, 128, 128, 2, 2, 16, seed=2)  # at the threshold (2 * block_size)
    out, stats = flexprefill_attention_with_stats(q, k, v, FlexPrefillConfig(**SMALL))
    assert stats.dense and relative_error(out, reference.dense_attention_reference(q, k, v, 0.25)[0]) < 1e-5


def test_float64_and_strided_inputs():
    q, k, v = random_qkv(1, 600, 600, 4, 2, 16, dtype=torch.float64, seed=12)
    # Hugging Face layout: [B, H, N, D] contiguous, viewed as [B, N, H, D].
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, **SMALL)
    torch.testing.assert_close(flexprefill_attention(qt, kt, vt, config), flexprefill_attention(q, k, v, config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("q_len,starts", [(90, [250, 0]), (300, [0, 17]), (300, None)])
def test_torch_dense_attention_matches_reference(q_len, starts, dtype, poison_empty):
    q, k, v = random_qkv(2, q_len, 300, 6, 3, 16, dtype=dtype, seed=7)
    key_start = None if starts is None else torch.tensor(starts)
    out = dense_attention_torch(q, k, v, 0.3, key_start)
    want, _ = reference.dense_attention_reference(q, k, v, 0.3, key_start)
    assert out.dtype == dtype and relative_error(out, want) < REL_TOL[dtype]


def test_config_budgets_in_blocks_and_defaults():
    config = FlexPrefillConfig()
    assert (config.gamma, config.tau, config.block_size, config.min_budget) == (0.95, 0.1, 128, 1024)
    assert config.min_budget_blocks == 8 and config.max_budget_blocks is None
    assert config.effective_dense_threshold == 1024
    small = FlexPrefillConfig(block_size=64, min_budget=100, max_budget=200)
    assert (small.min_budget_blocks, small.max_budget_blocks, small.effective_dense_threshold) == (2, 4, 128)
    assert small.replace(gamma=0.5).gamma == 0.5
    with pytest.raises(TypeError, match="unknown FlexPrefillConfig field"):
        small.replace(gama=0.5)


def _sparse_reference(q, k, v, config, scale, key_start=None):
    """float64 output of block-sparse attention on the selection the operator makes."""
    structure = select_blocks(q, k, config, scale, key_start).structure
    return reference.block_sparse_attention_reference(q, k, v, structure, scale, key_start)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k_len,dense", [(128, True), (129, False)], ids=["at-threshold", "one-past"])
def test_dense_threshold_routes_and_both_routes_are_correct(k_len, dense, dtype, poison_empty):
    """SMALL's threshold is 128 keys: exactly 128 runs dense, 129 sparse; each equals its float64 oracle."""
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, **SMALL)
    assert config.effective_dense_threshold == 128
    q, k, v = random_qkv(2, k_len - 7, k_len, 4, 2, 16, dtype=dtype, seed=k_len)
    key_start = torch.tensor([0, 9])
    out, stats = flexprefill_attention_with_stats(q, k, v, config, key_start=key_start)
    assert stats.dense is dense
    want = (reference.dense_attention_reference(q, k, v, 0.25, key_start)[0] if dense
            else _sparse_reference(q, k, v, config, 0.25, key_start))
    assert relative_error(out, want) < REL_TOL[dtype]


@pytest.mark.parametrize("k_len", [100, 700], ids=["dense-route", "sparse-route"])
def test_batch_zero_gives_empty_output_and_stats(k_len):
    q, k, v = random_qkv(1, k_len, k_len, 4, 2, 16)
    config = FlexPrefillConfig(**SMALL)
    out, stats = flexprefill_attention_with_stats(q[:0], k[:0], v[:0], config, key_start=torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, k_len, 4, 16) and out.dtype == q.dtype
    assert stats.dense is (k_len <= 128)
    for t in (stats.query_aware, stats.js_distance, stats.computed_blocks, stats.computed_fraction):
        assert t.shape == (0, 4)


def test_no_grad_and_inference_mode_are_accepted():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 300, 300, 2, 1, 16, seed=5))
    config = FlexPrefillConfig(**SMALL)
    with torch.no_grad():
        out = flexprefill_attention(q, k, v, config)
    with torch.inference_mode():
        again = flexprefill_attention(q, k, v, config)
    assert not out.requires_grad and torch.equal(out, again)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logits_beyond_fp16_range_give_finite_correct_output(dtype):
    """q and k scaled by 100 (q.k ~ 1e5 > fp16's 65504): finite output, as accurate as torch in fp32 on the
    same blocks plus the input dtype's rounding."""
    q, k, v = random_qkv(1, 400, 400, 4, 2, 32, dtype=dtype, seed=21)
    q, k = q * 100, k * 100
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, **SMALL)
    out, stats = flexprefill_attention_with_stats(q, k, v, config)
    assert not stats.dense and torch.isfinite(out).all()
    structure = select_blocks(q, k, config, 32 ** -0.5).structure
    want, _ = reference.block_sparse_attention_reference(q, k, v, structure, 32 ** -0.5)
    in_fp32, _ = reference.block_sparse_attention_reference(q, k, v, structure, 32 ** -0.5, dtype=torch.float32)
    err = (out.double() - want).abs().max().item()
    yardstick = (in_fp32.double() - want).abs().max().item()
    assert err <= 2 * yardstick + torch.finfo(dtype).eps * want.abs().max().item()


@pytest.mark.parametrize("k_len", [100, 600], ids=["dense-route", "sparse-route"])
def test_all_equal_keys(k_len):
    """Every key equal: each real row averages the values it may see (uniform weights)."""
    q, k, v = random_qkv(2, k_len, k_len, 4, 2, 16, seed=13)
    k = k[:, :1].expand_as(k).contiguous()
    key_start = torch.tensor([0, 31])
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, **SMALL)
    out, stats = flexprefill_attention_with_stats(q, k, v, config, key_start=key_start)
    assert torch.isfinite(out).all() and stats.dense is (k_len <= 128)
    want = (reference.dense_attention_reference(q, k, v, 0.25, key_start)[0] if stats.dense
            else _sparse_reference(q, k, v, config, 0.25, key_start))
    assert relative_error(out, want) < REL_TOL[torch.float32]


@pytest.mark.parametrize("k_len", [100, 600], ids=["dense-route", "sparse-route"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_query_row_stays_in_that_row(k_len, bad):
    """Documented: NaN/Inf are not masked; a non-finite query row (outside the representative block) makes
    that output row NaN and leaves every other row, and the selection, exactly as without it."""
    q, k, v = random_qkv(1, k_len, k_len, 4, 2, 16, seed=17)
    config = FlexPrefillConfig(gamma=0.9, tau=0.0, **SMALL)
    clean, clean_stats = flexprefill_attention_with_stats(q, k, v, config)
    q[0, 40, 2, 3] = bad
    out, stats = flexprefill_attention_with_stats(q, k, v, config)
    assert out[0, 40, 2].isnan().all()
    hit = torch.zeros_like(out, dtype=torch.bool)
    hit[0, 40, 2] = True
    assert torch.equal(out[~hit], clean[~hit])
    assert torch.equal(stats.computed_blocks, clean_stats.computed_blocks)


def test_nan_in_a_value_reaches_the_rows_that_attend_it():
    """Not masked out, not hidden: a NaN value reaches its attending rows (the kernel test checks the rows
    that never compute its block)."""
    q, k, v = random_qkv(1, 600, 600, 2, 1, 16, seed=19)
    v[0, 300, 0, 0] = float("nan")
    out = flexprefill_attention(q, k, v, FlexPrefillConfig(gamma=1.0, tau=0.0, **SMALL))  # every causal block
    # Documented: every row that attends key 300 is NaN (earlier rows of the same chunk may be too).
    assert out[0, 300:].isnan().any(-1).all()


# A sequence of padding only (key_start == k_len: an empty prompt in a left-padded batch) is valid: its rows
# have no real key, so they output 0, its statistics count no block, and the other sequences are unaffected.
@pytest.mark.parametrize(
    "q_len,k_len,dense",
    [(100, 100, True), (1, 100, True), (40, 120, True), (700, 700, False), (300, 900, False)],
    ids=["dense", "decode", "dense-on-cache", "sparse", "sparse-on-cache"],
)
def test_sequence_of_padding_only_outputs_zero_and_leaves_the_others_alone(q_len, k_len, dense, poison_empty):
    q, k, v = structured_qkv(3, k_len, 4, 2, 32, q_len=q_len, generator=seeded(q_len + k_len))
    starts = [37, k_len, 0]
    key_start = torch.tensor(starts)
    config = FlexPrefillConfig(gamma=0.9, tau=0.2, **SMALL)
    scale = 1 / math.sqrt(32)
    out, stats = flexprefill_attention_with_stats(q, k, v, config, key_start=key_start)
    assert stats.dense == dense
    assert (out[1] == 0).all()
    assert (stats.computed_blocks[1] == 0).all() and (stats.computed_fraction[1] == 0).all()
    assert (stats.computed_blocks[[0, 2]] > 0).all()
    # The other two sequences, alone: the same output (to rounding), statistics and selection.
    keep = [0, 2]
    alone, alone_stats = flexprefill_attention_with_stats(q[keep], k[keep], v[keep], config,
                                                          key_start=key_start[keep])
    assert relative_error(out[keep], alone) < 1e-6
    assert torch.equal(stats.computed_blocks[keep], alone_stats.computed_blocks)
    if dense:
        want, _ = reference.dense_attention_reference(q, k, v, scale, key_start)
    else:
        sel = select_blocks(q, k, config, scale, key_start)
        alone_sel = select_blocks(q[keep], k[keep], config, scale, key_start[keep])
        assert torch.equal(sel.structure.counts[keep], alone_sel.structure.counts)
        assert torch.equal(sel.structure.indices[keep], alone_sel.structure.indices)
        want, _ = reference.block_sparse_attention_reference(q, k, v, sel.structure, scale, key_start)
    assert (want[1] == 0).all()
    assert relative_error(out, want) < REL_TOL[torch.float32]


def test_batch_of_padding_only_outputs_zero():
    """Every sequence empty (an all-zero attention mask): zeros on both routes and for decode."""
    for q_len, k_len in ((100, 100), (1, 300), (600, 600)):
        q, k, v = random_qkv(2, q_len, k_len, 4, 2, 16, seed=k_len)
        out, stats = flexprefill_attention_with_stats(q, k, v, FlexPrefillConfig(**SMALL),
                                                      key_start=torch.tensor([k_len, k_len], dtype=torch.int32))
        assert (out == 0).all() and (stats.computed_blocks == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len,k_len", [(333, 333), (90, 400)])
def test_triton_kernel_and_selection_with_a_sequence_of_padding_only(q_len, k_len, dtype, poison_empty):
    """The Triton kernels (the interpreter on CPU, the GPU in CI's GPU job): the fully padded sequence gets zeros
    from the attention kernel, and the Triton selection gives the torch selection's structure."""
    pytest.importorskip("triton")
    from flexprefill_hf.ops.attention.block_sparse_triton import block_sparse_attention_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in structured_qkv(3, k_len, 4, 2, 32, q_len=q_len, generator=seeded(k_len)))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    key_start = torch.tensor([k_len, 50, 0], device=device)
    config = FlexPrefillConfig(gamma=0.9, tau=0.2, **SMALL)
    scale = 1 / math.sqrt(32)
    sel = select_blocks(q.float(), k.float(), config, scale, key_start, scores_backend="torch",
                        structure_backend="torch")
    out = block_sparse_attention_triton(q, k, v, sel.structure, softmax_scale=scale, key_start=key_start)
    want, _ = reference.block_sparse_attention_reference(q, k, v, sel.structure, scale, key_start)
    assert (out[0] == 0).all() and (want[0] == 0).all()
    assert relative_error(out, want) < REL_TOL[dtype]
    triton_sel = select_blocks(q, k, config, scale, key_start, scores_backend="triton", structure_backend="triton")
    torch_sel = select_blocks(q, k, config, scale, key_start, scores_backend="torch", structure_backend="torch")
    # The padded sequence runs dense (short) on both: the same structure there, exactly.
    assert torch.equal(triton_sel.structure.counts[0], torch_sel.structure.counts[0])
    assert torch.equal(triton_sel.structure.indices[0], torch_sel.structure.indices[0])


def test_on_cuda_a_short_sequence_in_a_long_padded_batch_runs_dense_as_it_would_alone():
    # Alone, a prompt under cuda_dense_below runs dense on CUDA. Padded into a batch with a long one it takes the
    # sparse route, where the selection's per-sequence `short` rule must mark it dense (all causal blocks).
    from flexprefill_hf.ops.flexprefill import selection_config

    config = FlexPrefillConfig(gamma=0.5, tau=0.1, block_size=64, min_budget=64, cuda_dense_below=700)
    assert selection_config(config, on_cuda=False) is config
    on_cuda = selection_config(config, on_cuda=True)
    assert on_cuda.effective_dense_threshold == 699 and selection_config(config, on_cuda=True) is on_cuda
    q, k, _ = random_qkv(2, 1024, 1024, 4, 2, 32, seed=21)
    key_start = torch.tensor([0, 1024 - 600])  # sequence 1: 600 real keys, under cuda_dense_below
    scale = 1 / math.sqrt(32)
    sparse = select_blocks(q, k, config, scale, key_start)
    routed = select_blocks(q, k, on_cuda, scale, key_start)
    full = routed.structure.counts[1].sum(-1)  # the causal triangle from its sink
    assert (full == routed.causal_blocks[1]).all()
    assert (sparse.structure.counts[1].sum(-1) < full).any()  # without the rule it would have been sparse
    assert torch.equal(routed.structure.indices[0], sparse.structure.indices[0])  # the long one is unchanged


@pytest.mark.parametrize("starts", [None, [0, 70]])
def test_operator_calls_the_kernel_unchecked_and_equals_its_public_launcher(starts, monkeypatch, poison_empty):
    """The operator validates once, then calls the Triton kernel's unchecked launcher (every sparse call routed to
    "triton" here, so the interpreter runs it on CPU): the launcher's checks do not run again, and the output is
    the public launcher's (which checks) on the same blocks, exactly."""
    pytest.importorskip("triton")
    from flexprefill_hf.ops import flexprefill as operator
    from flexprefill_hf.ops.attention import block_sparse_triton as bst

    calls = []
    real_check = bst.check_attention_inputs

    def counted_check(*args, **kwargs):
        calls.append(args)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(bst, "check_attention_inputs", counted_check)
    monkeypatch.setattr(operator, "choose_sparse_backend", lambda *args: ("triton", "forced by the test"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device, torch.float16) for t in random_qkv(2, 300, 300, 4, 2, 32, seed=31))
    key_start = None if starts is None else torch.tensor(starts, device=device)
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, **SMALL)
    out = flexprefill_attention(q, k, v, config, softmax_scale=0.2, key_start=key_start)
    assert calls == []
    structure = select_blocks(q, k, config, 0.2, key_start).structure
    assert (structure.counts.sum(-1) < structure.grid.num_blocks * (structure.grid.num_blocks + 1) // 2).any()
    want = bst.block_sparse_attention_triton(q, k, v, structure, softmax_scale=0.2, key_start=key_start)
    assert len(calls) == 1
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("q_len,k_len", [(300, 300), (90, 400)])
def test_dense_route_and_a_full_selection_give_the_same_stats(q_len, k_len):
    """One stats builder for both routes: gamma = 1, tau = 0 selects every causal block, and the dense route counts
    the same blocks per head, fraction 1 -- a padded sequence included; a sequence of padding only counts 0."""
    q, k, v = random_qkv(3, q_len, k_len, 4, 2, 16, seed=q_len)
    key_start = torch.tensor([0, 70, k_len])
    _, sparse = flexprefill_attention_with_stats(q, k, v, FlexPrefillConfig(gamma=1.0, tau=0.0, **SMALL),
                                                 key_start=key_start)
    _, dense = flexprefill_attention_with_stats(q, k, v, FlexPrefillConfig(dense_threshold=k_len, **SMALL),
                                                key_start=key_start)
    assert dense.dense and not sparse.dense
    assert dense.computed_blocks.dtype == sparse.computed_blocks.dtype == torch.int32
    assert torch.equal(sparse.computed_blocks, dense.computed_blocks)
    assert (dense.computed_blocks[:2] > 0).all() and (dense.computed_blocks[2] == 0).all()
    assert torch.equal(sparse.computed_fraction, dense.computed_fraction)
    assert torch.equal(dense.computed_fraction, torch.tensor([[1.0], [1.0], [0.0]]).expand(3, 4))
    assert torch.isnan(dense.js_distance).all() and not dense.query_aware.any()
    assert not torch.isnan(sparse.js_distance[:2]).any()
