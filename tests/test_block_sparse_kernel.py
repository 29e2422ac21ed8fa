"""Block-sparse attention (the Triton kernel and its PyTorch twin) against the float64 reference on one structure.

Oracle (flash-attention's): the max error against ``block_sparse_attention_reference`` in float64 must be at
most twice the error of the same reference computed in the input dtype, plus a floor of one unit of the input
dtype at the largest output (the final cast alone may cost half of that, and torch's own error can be that
small). Fresh memory is poisoned (the ``poison_empty`` fixture) so that an element never written fails.
"""

from __future__ import annotations

import pytest
import torch

from flexprefill_hf.ops.attention.block_sparse_torch import block_sparse_attention_torch
from flexprefill_hf.ops.attention.block_sparse_triton import (
    TileConfig,
    block_sparse_attention_triton,
    block_sparse_attention_triton_with_lse,
)
from flexprefill_hf.ops.block_structure import block_mask_to_structure
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.reference import block_sparse_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poison_empty")


def generate_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen)
    return [t.to(device, dtype) for t in (q, k, v)]


def generate_block_mask(batch, heads, grid: BlockGrid, density: float, seed=0, device=DEVICE) -> torch.Tensor:
    """Random block-causal bool mask [B, H, nqb, nb] that always holds the diagonal block."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(grid.num_query_blocks)[:, None] + grid.first_query_block
    cols = torch.arange(grid.num_blocks)[None, :]
    mask = torch.rand(batch, heads, grid.num_query_blocks, grid.num_blocks, generator=gen) < density
    return ((mask & (cols <= rows)) | (cols == rows)).to(device)


def reference_error(q, k, v, structure, scale, key_start, low_dtype=None):
    """(float64 reference out, lse) and the error torch makes computing the same in ``low_dtype`` (q's)."""
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, structure, scale, key_start)
    low_out, _ = block_sparse_attention_reference(q, k, v, structure, scale, key_start, dtype=low_dtype or q.dtype)
    return ref_out, ref_lse, (low_out.double() - ref_out).abs().max().item()


def assert_close_to_reference(out, lse, q, k, v, structure, scale=None, key_start=None, low_dtype=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ref_out, ref_lse, torch_err = reference_error(q, k, v, structure, scale, key_start, low_dtype)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "NaN/Inf in the output (an element was never written, or 0/0)"
    err = (out.double() - ref_out).abs().max().item()
    floor = torch.finfo(q.dtype).eps * ref_out.abs().max().item()
    assert err <= 2 * torch_err + floor, f"error {err:.3g} vs torch's {torch_err:.3g} (floor {floor:.3g})"
    if lse is not None:
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        # The scores are exact products summed in fp32: the lse is fp32-accurate whatever the input dtype.
        torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)


# batch, q_len, k_len, q_heads, kv_heads, head_dim, block_size, dtype, key_start, density
CASES = {
    "k200-d64-fp16": (1, 200, 200, 4, 4, 64, 64, torch.float16, None, 0.5),
    "k333-gqa3-d96-bf16": (1, 333, 333, 6, 2, 96, 64, torch.bfloat16, None, 0.5),
    "q77-k333-gqa3-d128-b128-fp16": (1, 77, 333, 3, 1, 128, 128, torch.float16, None, 0.5),
    "q1-k333-gqa7-bf16": (1, 1, 333, 7, 1, 64, 64, torch.bfloat16, None, 1.0),
    "q1-k1000-gqa7-d96-b128-fp16": (1, 1, 1000, 14, 2, 96, 128, torch.float16, None, 0.5),
    "k1000-gqa4-d128-b128-bf16-leftpad": (2, 1000, 1000, 4, 1, 128, 128, torch.bfloat16, [0, 150], 0.4),
    "q300-k1000-gqa4-d80-fp16-leftpad": (2, 300, 1000, 4, 1, 80, 64, torch.float16, [0, 150], 0.3),
    "k256-d256-b128-bf16": (1, 256, 256, 2, 2, 256, 128, torch.bfloat16, None, 1.0),
    "k1024-dense-gqa2-fp16": (1, 1024, 1024, 2, 1, 64, 64, torch.float16, None, 1.0),
    "k2048-d128-b128-bf16": (1, 2048, 2048, 2, 2, 128, 128, torch.bfloat16, None, 0.3),
    "k2048-fp16-leftpad": (2, 2048, 2048, 1, 1, 64, 64, torch.float16, [700, 0], 0.15),
}


def _case_inputs(case, seed=0):
    batch, q_len, k_len, q_heads, kv_heads, head_dim, block_size, dtype, key_start, density = case
    q, k, v = generate_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed=seed)
    grid = BlockGrid(q_len, k_len, block_size)
    structure = block_mask_to_structure(generate_block_mask(batch, q_heads, grid, density, seed=seed), grid)
    if key_start is not None:
        key_start = torch.tensor(key_start, device=DEVICE)
    return q, k, v, structure, key_start


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(case, poison_empty):
    q, k, v, structure, key_start = _case_inputs(case)
    out, lse = block_sparse_attention_triton_with_lse(q, k, v, structure, key_start=key_start)
    # The outputs came from the poisoned allocator.
    assert poison_empty.allocated(q.shape, q.dtype) and poison_empty.allocated(lse.shape, torch.float32)
    assert_close_to_reference(out, lse, q, k, v, structure, key_start=key_start)
    if key_start is not None:
        # Queries inside the left padding see no key at all.
        k_len, q_len = k.shape[1], q.shape[1]
        for b, start in enumerate(key_start.tolist()):
            rows = slice(0, max(0, start - (k_len - q_len)))
            assert (out[b, rows] == 0).all() and (lse[b, :, rows] == float("-inf")).all()


# The PyTorch twin (the operator's CPU path) on the same cases; it runs on CPU in any dtype.
TORCH_CASES = {name: CASES[name] for name in (
    "k333-gqa3-d96-bf16", "q77-k333-gqa3-d128-b128-fp16", "q1-k333-gqa7-bf16", "q300-k1000-gqa4-d80-fp16-leftpad",
    "k2048-fp16-leftpad",
)}


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["case-dtype", "fp32"])
@pytest.mark.parametrize("case", TORCH_CASES.values(), ids=TORCH_CASES.keys())
def test_torch_twin_matches_reference(case, dtype):
    case = case[:7] + ((dtype or case[7]),) + case[8:]
    q, k, v, structure, key_start = _case_inputs(case, seed=5)
    out = block_sparse_attention_torch(q, k, v, structure, q.shape[-1] ** -0.5, key_start)
    assert_close_to_reference(out, None, q, k, v, structure, key_start=key_start)


# Tiles smaller than the block: a program covers part of a query block and loops over key sub-tiles.
SUBTILE_CASES = {
    "q77-k333-64x64": (77, 333, 64, 64, torch.float16, [0, 40]),
    "q10-k333-64x32": (10, 333, 64, 32, torch.bfloat16, None),
    "q333-k333-32x64": (333, 333, 32, 64, torch.float16, [0, 150]),
    # Tiles as large as the block: the pointer loop without prefetch runs only pinned (the GPU tunes it).
    "q333-k333-128x128": (333, 333, 128, 128, torch.bfloat16, [0, 150]),
}


@pytest.mark.parametrize("prefetch", [False, True], ids=["pointers", "prefetch"])
@pytest.mark.parametrize("case", SUBTILE_CASES.values(), ids=SUBTILE_CASES.keys())
def test_subtiles_match_reference(case, prefetch):
    q_len, k_len, block_m, block_n, dtype, key_start = case
    q, k, v = generate_inputs(2, q_len, k_len, 4, 2, 96, dtype, seed=1)
    grid = BlockGrid(q_len, k_len, 128)
    structure = block_mask_to_structure(generate_block_mask(2, 4, grid, 0.5, seed=1), grid)
    if key_start is not None:
        key_start = torch.tensor(key_start, device=DEVICE, dtype=torch.int32)
    tiles = TileConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2, prefetch_index=prefetch)
    out, lse = block_sparse_attention_triton_with_lse(q, k, v, structure, key_start=key_start, tile_config=tiles)
    assert_close_to_reference(out, lse, q, k, v, structure, key_start=key_start)


def test_empty_block_list_gives_zero_rows():
    q, k, v = generate_inputs(1, 333, 333, 4, 2, 64, torch.float16)
    grid = BlockGrid(333, 333, 64)
    mask = generate_block_mask(1, 4, grid, 0.5)
    mask[0, 1, 3] = False  # query head 1, query block row 3: nothing to compute
    mask[0, 3, 0] = False  # the partial first block
    structure = block_mask_to_structure(mask, grid)
    assert structure.counts[0, 1, 3] == 0 and structure.counts[0, 3, 0] == 0
    out, lse = block_sparse_attention_triton_with_lse(q, k, v, structure)
    assert_close_to_reference(out, lse, q, k, v, structure)
    rows = (torch.arange(333, device=DEVICE) + grid.pad) // 64
    assert (out[0, rows == 3, 1] == 0).all() and (lse[0, 1, rows == 3] == float("-inf")).all()
    assert (out[0, rows == 0, 3] == 0).all()
    assert (out[0, rows == 3, 0] != 0).any()


def test_softmax_scale_and_plain_output():
    q, k, v = generate_inputs(1, 200, 200, 2, 1, 64, torch.float16)
    grid = BlockGrid(200, 200, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 2, grid, 0.5), grid)
    out = block_sparse_attention_triton(q, k, v, structure, softmax_scale=0.3)
    assert isinstance(out, torch.Tensor)
    assert_close_to_reference(out, None, q, k, v, structure, scale=0.3)
    out_lse, _ = block_sparse_attention_triton_with_lse(q, k, v, structure, softmax_scale=0.3)
    assert torch.equal(out, out_lse)


def test_strided_inputs_equal_contiguous():
    """Hugging Face hands over [B, H, N, D] tensors transposed; a last-dim stride is read too."""
    batch, n, q_heads, kv_heads, d = 2, 200, 4, 2, 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, q_heads, n, d, generator=gen).to(DEVICE, torch.float16).transpose(1, 2)
    k = torch.randn(batch, kv_heads, n, d, generator=gen).to(DEVICE, torch.float16).transpose(1, 2)
    v = torch.randn(batch, n, kv_heads, 2 * d, generator=gen).to(DEVICE, torch.float16)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    grid = BlockGrid(n, n, 64)
    structure = block_mask_to_structure(generate_block_mask(batch, q_heads, grid, 0.6), grid)
    key_start = torch.tensor([0, 30], device=DEVICE)
    out = block_sparse_attention_triton(q, k, v, structure, key_start=key_start)
    expected = block_sparse_attention_triton(q.contiguous(), k.contiguous(), v.contiguous(), structure, key_start=key_start)
    assert torch.equal(out, expected)
    assert_close_to_reference(out, None, q, k, v, structure, key_start=key_start)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logits_beyond_fp16_range_give_finite_correct_output(dtype):
    """q and k scaled by 100: q.k reaches ~1e5, past fp16's 65504. The kernel sums scores in fp32, so the
    yardstick is torch computing in fp32 (in fp16 torch itself overflows), with the input dtype's floor."""
    q, k, v = generate_inputs(1, 300, 300, 4, 2, 64, dtype, seed=11)
    q, k = q * 100, k * 100
    grid = BlockGrid(300, 300, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 4, grid, 0.6, seed=11), grid)
    key_start = torch.tensor([20], device=DEVICE)
    out, lse = block_sparse_attention_triton_with_lse(q, k, v, structure, key_start=key_start)
    assert torch.isfinite(lse[:, :, 20:]).all()
    assert_close_to_reference(out, None, q, k, v, structure, key_start=key_start, low_dtype=torch.float32)


def test_all_equal_keys_average_the_visible_values():
    """Every key equal: each row's weights are uniform over its visible keys, whatever the scores' size."""
    q, k, v = generate_inputs(1, 260, 260, 2, 1, 64, torch.float16, seed=4)
    k = k[:, :1].expand_as(k) * 3
    grid = BlockGrid(260, 260, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 2, grid, 0.5, seed=4), grid)
    out, lse = block_sparse_attention_triton_with_lse(q, k, v, structure)
    assert_close_to_reference(out, lse, q, k, v, structure)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_nan_in_a_query_row_stays_in_that_row():
    """NaN is not masked out (documented): a NaN query row gives a NaN output row and leaves the others exact."""
    q, k, v = generate_inputs(1, 200, 200, 2, 1, 64, torch.float16, seed=6)
    grid = BlockGrid(200, 200, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 2, grid, 0.7, seed=6), grid)
    clean = block_sparse_attention_triton(q, k, v, structure)
    q[0, 50, 1] = float("nan")
    q[0, 120, 0, 3] = float("inf")
    out = block_sparse_attention_triton(q, k, v, structure)
    assert out[0, 50, 1].isnan().all() and out[0, 120, 0].isnan().all()
    hit = torch.zeros_like(out, dtype=torch.bool)
    hit[0, 50, 1] = hit[0, 120, 0] = True
    assert torch.equal(out[~hit], clean[~hit])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_in_a_value_reaches_the_rows_that_attend_it():
    """A NaN value reaches every row whose computed blocks hold it; query blocks before it never load it."""
    q, k, v = generate_inputs(1, 256, 256, 1, 1, 64, torch.float16, seed=7)
    grid = BlockGrid(256, 256, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 1, grid, 1.0), grid)  # every causal block
    v[0, 130, 0, 5] = float("nan")
    out = block_sparse_attention_triton(q, k, v, structure)
    assert out[0, 130:].isnan().any(-1).all()  # rows 130.. attend key 130
    assert torch.isfinite(out[0, :128]).all()  # query blocks 0 and 1 never compute key block 2


@pytest.mark.parametrize("batch,q_len", [(0, 100), (2, 0)])
def test_empty_batch_or_query_gives_empty_output(batch, q_len):
    q, k, v = generate_inputs(max(batch, 1), max(q_len, 1), 100, 4, 2, 64, torch.float16)
    q, k, v = q[:batch, :q_len], k[:batch], v[:batch]
    grid = BlockGrid(q_len, 100, 64)
    structure = block_mask_to_structure(generate_block_mask(batch, 4, grid, 1.0), grid)
    out, lse = block_sparse_attention_triton_with_lse(q, k, v, structure)
    assert out.shape == (batch, q_len, 4, 64) and lse.shape == (batch, 4, q_len)


def _valid_call():
    q, k, v = generate_inputs(1, 100, 100, 4, 2, 64, torch.float16)
    grid = BlockGrid(100, 100, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 4, grid, 1.0), grid)
    return dict(q=q, k=k, v=v, structure=structure)


def _structure_for(q_len, k_len, block_size, heads=4):
    grid = BlockGrid(q_len, k_len, block_size)
    return block_mask_to_structure(generate_block_mask(1, heads, grid, 1.0), grid)


def _requires_grad(args):
    args["q"] = args["q"].clone().requires_grad_()


BAD_INPUTS = {
    "rank": (lambda a: a.update(q=a["q"][0]), ValueError, r"q has shape \(100, 4, 64\); expected 4 dims"),
    "gqa": (lambda a: a.update(k=a["k"][:, :, :1].expand(-1, -1, 3, -1), v=a["v"][:, :, :1].expand(-1, -1, 3, -1)),
            ValueError, r"q has 4 heads and k has 3; expected the query heads to be a multiple of the KV heads"),
    "dtype-mismatch": (lambda a: a.update(v=a["v"].bfloat16()), TypeError, r"q, k, v dtypes differ"),
    "fp32": (lambda a: a.update(q=a["q"].float(), k=a["k"].float(), v=a["v"].float()), TypeError,
             r"q has dtype torch.float32; expected one of \(torch.float16, torch.bfloat16\)"),
    "q-longer-than-k": (lambda a: a.update(q=torch.cat([a["q"], a["q"]], 1), structure=_structure_for(200, 100, 64)),
                        ValueError, r"q has 200 tokens and k has 100; expected 0 <= q_len <= k_len"),
    "structure-grid": (lambda a: a.update(structure=_structure_for(90, 100, 64)), ValueError,
                       r"structure grid has q_len=90, k_len=100; expected the inputs' q_len=100, k_len=100"),
    "structure-heads": (lambda a: a.update(structure=_structure_for(100, 100, 64, heads=2)), ValueError,
                        r"structure.indices is torch.int32 of shape \(1, 2, 2, 2\); expected torch.int32 of shape \(1, 4, 2, 2\)"),
    "structure-type": (lambda a: a.update(structure="blocks"), TypeError, r"structure has type str; expected a BlockStructure"),
    "block-size": (lambda a: a.update(structure=_structure_for(100, 100, 32)), ValueError,
                   r"block_size=32 is not supported; expected one of \(64, 128\)"),
    "head-dim": (lambda a: a.update(q=a["q"][..., :60], k=a["k"][..., :60], v=a["v"][..., :60]), ValueError,
                 r"head_dim=60 is not supported; expected a multiple of 8 in \[16, 256\]"),
    "head-dim-large": (lambda a: a.update(**{n: a[n].repeat(1, 1, 1, 5) for n in "qkv"}), ValueError,
                       r"head_dim=320 is not supported"),
    "kv-shape": (lambda a: a.update(v=a["v"][:, :50]), ValueError, r"k has shape .* but v has .*; expected equal shapes"),
    "key-start-shape": (lambda a: a.update(key_start=torch.zeros(3, dtype=torch.int64, device=DEVICE)), ValueError,
                        r"key_start has shape \(3,\); expected \(1,\)"),
    "key-start-dtype": (lambda a: a.update(key_start=torch.zeros(1, device=DEVICE)), TypeError,
                        r"key_start is a tensor of dtype torch.float32; expected an int32 or int64 tensor"),
    "key-start-list": (lambda a: a.update(key_start=[0]), TypeError, r"key_start is list; expected an int32 or int64"),
    "softmax-scale": (lambda a: a.update(softmax_scale="0.1"), TypeError, r"softmax_scale='0.1' has type str"),
    "softmax-scale-nan": (lambda a: a.update(softmax_scale=float("nan")), ValueError, r"softmax_scale=nan"),
    "tile-config-type": (lambda a: a.update(tile_config={"block_m": 64}), TypeError,
                         r"tile_config has type dict; expected TileConfig or None"),
    "tile-config-block": (lambda a: a.update(tile_config=TileConfig(block_m=128, block_n=64)), ValueError,
                          r"tile_config block_m=128, block_n=64 do not divide block_size=64"),
    "gradients": (_requires_grad, ValueError, r"does not support gradients"),
}
if DEVICE == "cpu":  # on CUDA the range check is a device-side assert (tests/test_gpu.py)
    BAD_INPUTS["key-start-range"] = (lambda a: a.update(key_start=torch.tensor([101])), ValueError,
                                     r"key_start has value 101: .*expected 0 <= key_start\[b\] <= k_len = 100")
    BAD_INPUTS["key-start-negative"] = (lambda a: a.update(key_start=torch.tensor([-1])), ValueError,
                                        r"key_start has value -1: .*expected 0 <= key_start\[b\] <= k_len")


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_inputs(bad):
    mutate, error, match = bad
    args = _valid_call()
    mutate(args)
    q, k, v, structure = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("structure")
    with pytest.raises(error, match=match):
        block_sparse_attention_triton(q, k, v, structure, **args)


@pytest.mark.parametrize("fields,error,match", [
    (dict(block_m=48), ValueError, r"block_m=48 is not supported; expected one of \(16, 32, 64, 128\)"),
    (dict(block_n=64.0), TypeError, r"block_n=64.0 has type float; expected an int"),
    (dict(num_warps=3), ValueError, r"num_warps=3 is not supported"),
    (dict(num_stages=0), ValueError, r"num_stages=0 is not supported; expected an int >= 1"),
    (dict(prefetch_index=1), TypeError, r"prefetch_index=1 has type int; expected a bool"),
])
def test_tile_config_validation(fields, error, match):
    with pytest.raises(error, match=match):
        TileConfig(**fields)


@pytest.mark.parametrize("hopper", [False, True], ids=["other-gpu", "cc-9.0"])
def test_autotune_keeps_a_fitting_candidate_for_every_shape(hopper, monkeypatch):
    """Whatever the head dim, block size and length, tuning keeps a candidate, and every one kept fits the
    block and does not spill the accumulator (the property the pruning exists for; the tables may change)."""
    from flexprefill_hf.ops.attention import block_sparse_triton as bst

    monkeypatch.setattr(bst, "is_hopper", lambda t: hopper)
    for block_d in (16, 32, 64, 128, 256):
        for block_size in (64, 128):
            for bucket in (1, 8, 256):
                kept = bst._prune_configs(bst._ALL_CONFIGS, {"Q": None, "length_bucket": bucket},
                                          BLOCK_SIZE=block_size, BLOCK_D=block_d)
                assert kept
                for c in kept:
                    assert c.kwargs["BLOCK_M"] <= block_size and c.kwargs["BLOCK_N"] <= block_size
                    assert c.kwargs["BLOCK_M"] * block_d <= 64 * 32 * c.num_warps or len(kept) == 1
