"""The block-sparse attention kernel against ``reference.block_sparse_attention`` on the same structure.

Oracle (flash-attention's): the kernel's max error against the float64 reference must be at most twice the
error of the same reference computed in the input dtype, plus a floor of one unit of the input dtype at the
largest output (the final cast alone may cost half of that, and torch's own error can be that small).
Fresh memory is poisoned with NaN so that an element the kernel never writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
import triton

from flexprefill_hf.ops import reference
from flexprefill_hf.ops.block_sparse_attention import (
    _block_sparse_attention_fwd,
    block_sparse_attention,
    block_sparse_attention_with_lse,
)
from flexprefill_hf.ops.block_structure import block_mask_to_structure
from flexprefill_hf.ops.grid import BlockGrid

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Fill every floating-point ``torch.empty`` with NaN; returns the list of shapes allocated."""
    real_empty = torch.empty
    shapes = []

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        shapes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return shapes


def generate_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def generate_block_mask(batch, heads, grid: BlockGrid, density: float, seed=0) -> torch.Tensor:
    """Random block-causal bool mask [B, H, nqb, nb] that always holds the diagonal block."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(grid.num_query_blocks)[:, None] + grid.first_query_block
    cols = torch.arange(grid.num_blocks)[None, :]
    mask = torch.rand(batch, heads, grid.num_query_blocks, grid.num_blocks, generator=gen) < density
    return ((mask & (cols <= rows)) | (cols == rows)).to(DEVICE)


def reference_pair(q, k, v, structure, scale, key_start):
    """(float64 reference out, lse) and the error torch makes computing the same in q.dtype."""
    ref_out, ref_lse = reference.block_sparse_attention_reference(q, k, v, structure, scale, key_start)
    low_out, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale, key_start, dtype=q.dtype)
    torch_err = (low_out.double() - ref_out).abs().max().item()
    return ref_out, ref_lse, torch_err


def assert_close_to_reference(out, lse, q, k, v, structure, scale=None, key_start=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ref_out, ref_lse, torch_err = reference_pair(q, k, v, structure, scale, key_start)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "NaN in the output (an element was never written, or 0/0)"
    err = (out.double() - ref_out).abs().max().item()
    floor = torch.finfo(q.dtype).eps * ref_out.abs().max().item()
    assert err <= 2 * torch_err + floor, f"kernel error {err:.3g} vs torch's {torch_err:.3g} (floor {floor:.3g})"
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


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference(case, poisoned_empty):
    batch, q_len, k_len, q_heads, kv_heads, head_dim, block_size, dtype, key_start, density = case
    q, k, v = generate_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype)
    grid = BlockGrid(q_len, k_len, block_size)
    structure = block_mask_to_structure(generate_block_mask(batch, q_heads, grid, density), grid)
    if key_start is not None:
        key_start = torch.tensor(key_start, device=DEVICE)
    out, lse = block_sparse_attention_with_lse(q, k, v, structure, key_start=key_start)
    # The outputs came from the poisoned allocator.
    assert tuple(q.shape) in poisoned_empty and (batch, q_heads, q_len) in poisoned_empty
    assert_close_to_reference(out, lse, q, k, v, structure, key_start=key_start)
    if key_start is not None:
        # Queries inside the left padding see no key at all.
        for b, start in enumerate(key_start.tolist()):
            rows = slice(0, max(0, start - (k_len - q_len)))
            assert (out[b, rows] == 0).all() and (lse[b, :, rows] == float("-inf")).all()


# Tiles smaller than the block: a program covers part of a query block and loops over key sub-tiles.
SUBTILE_CASES = {
    "q77-k333-64x64": (77, 333, 64, 64, torch.float16, [0, 40]),
    "q10-k333-64x32": (10, 333, 64, 32, torch.bfloat16, None),
    "q333-k333-32x64": (333, 333, 32, 64, torch.float16, [0, 150]),
    # Tiles as large as the block: the pointer loop without prefetch runs only pinned (the GPU tunes it).
    "q333-k333-128x128": (333, 333, 128, 128, torch.bfloat16, [0, 150]),
}


# K/V loads: pointers, pointers with the block index loaded one iteration ahead, tensor descriptors.
LOAD_VARIANTS = {"pointers": (False, False), "prefetch": (False, True), "tma-prefetch": (True, True)}


@pytest.mark.parametrize("loads", LOAD_VARIANTS.values(), ids=LOAD_VARIANTS.keys())
@pytest.mark.parametrize("case", SUBTILE_CASES.values(), ids=SUBTILE_CASES.keys())
def test_subtiles_match_reference(case, loads):
    q_len, k_len, block_m, block_n, dtype, key_start = case
    q, k, v = generate_inputs(2, q_len, k_len, 4, 2, 96, dtype, seed=1)
    grid = BlockGrid(q_len, k_len, 128)
    structure = block_mask_to_structure(generate_block_mask(2, 4, grid, 0.5, seed=1), grid)
    if key_start is not None:
        key_start = torch.tensor(key_start, device=DEVICE, dtype=torch.int32)
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n})
    use_tma, prefetch = loads
    out, lse = _block_sparse_attention_fwd(
        q, k, v, structure, None, key_start, True, config, use_tma=use_tma, prefetch_index=prefetch
    )
    assert_close_to_reference(out, lse, q, k, v, structure, key_start=key_start)


def test_empty_block_list_gives_zero_rows():
    q, k, v = generate_inputs(1, 333, 333, 4, 2, 64, torch.float16)
    grid = BlockGrid(333, 333, 64)
    mask = generate_block_mask(1, 4, grid, 0.5)
    mask[0, 1, 3] = False  # query head 1, query block row 3: nothing to compute
    mask[0, 3, 0] = False  # the partial first block
    structure = block_mask_to_structure(mask, grid)
    assert structure.counts[0, 1, 3] == 0 and structure.counts[0, 3, 0] == 0
    out, lse = block_sparse_attention_with_lse(q, k, v, structure)
    assert_close_to_reference(out, lse, q, k, v, structure)
    rows = (torch.arange(333, device=DEVICE) + grid.pad) // 64
    assert (out[0, rows == 3, 1] == 0).all() and (lse[0, 1, rows == 3] == float("-inf")).all()
    assert (out[0, rows == 0, 3] == 0).all()
    assert (out[0, rows == 3, 0] != 0).any()


def test_softmax_scale_and_plain_output():
    q, k, v = generate_inputs(1, 200, 200, 2, 1, 64, torch.float16)
    grid = BlockGrid(200, 200, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 2, grid, 0.5), grid)
    out = block_sparse_attention(q, k, v, structure, softmax_scale=0.3)
    assert isinstance(out, torch.Tensor)
    assert_close_to_reference(out, None, q, k, v, structure, scale=0.3)
    out_lse, _ = block_sparse_attention_with_lse(q, k, v, structure, softmax_scale=0.3)
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
    out = block_sparse_attention(q, k, v, structure, key_start=key_start)
    expected = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), structure, key_start=key_start)
    assert torch.equal(out, expected)
    assert_close_to_reference(out, None, q, k, v, structure, key_start=key_start)


def _valid_call():
    q, k, v = generate_inputs(1, 100, 100, 4, 2, 64, torch.float16)
    grid = BlockGrid(100, 100, 64)
    structure = block_mask_to_structure(generate_block_mask(1, 4, grid, 1.0), grid)
    return dict(q=q, k=k, v=v, structure=structure)


def _structure_for(q_len, k_len, block_size, heads=4):
    grid = BlockGrid(q_len, k_len, block_size)
    return block_mask_to_structure(generate_block_mask(1, heads, grid, 1.0), grid)


BAD_INPUTS = {
    "rank": (lambda a: a.update(q=a["q"][0]), ValueError, r"q must have 4 dimensions"),
    "gqa": (lambda a: a.update(k=a["k"][:, :, :1].expand(-1, -1, 3, -1), v=a["v"][:, :, :1].expand(-1, -1, 3, -1)),
            ValueError, r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    "dtype-mismatch": (lambda a: a.update(v=a["v"].bfloat16()), TypeError, r"share a dtype"),
    "fp32": (lambda a: a.update(q=a["q"].float(), k=a["k"].float(), v=a["v"].float()), TypeError,
             r"q.dtype=torch.float32 is not supported; expected torch.float16 or torch.bfloat16"),
    "q-longer-than-k": (lambda a: a.update(q=torch.cat([a["q"], a["q"]], 1), structure=_structure_for(200, 100, 64)),
                        ValueError, r"q_len=200 must not exceed k_len=100"),
    "structure-grid": (lambda a: a.update(structure=_structure_for(90, 100, 64)), ValueError,
                       r"structure grid has q_len=90, k_len=100"),
    "structure-heads": (lambda a: a.update(structure=_structure_for(100, 100, 64, heads=2)), ValueError,
                        r"structure.indices must be int32 of shape \(1, 4, 2, 2\), got torch.int32 of shape \(1, 2, 2, 2\)"),
    "block-size": (lambda a: a.update(structure=_structure_for(100, 100, 32)), ValueError,
                   r"block_size=32 is not supported; expected one of \(64, 128\)"),
    "head-dim": (lambda a: a.update(q=a["q"][..., :60], k=a["k"][..., :60], v=a["v"][..., :60]), ValueError,
                 r"head_dim=60 is not supported"),
    "head-dim-large": (lambda a: a.update(**{n: a[n].repeat(1, 1, 1, 5) for n in "qkv"}), ValueError,
                       r"head_dim=320 is not supported"),
    "kv-shape": (lambda a: a.update(v=a["v"][:, :50]), ValueError, r"k and v must have the same shape"),
    "key-start-shape": (lambda a: a.update(key_start=torch.zeros(3, dtype=torch.int64, device=DEVICE)), ValueError,
                        r"key_start must have shape \(1,\)"),
    "key-start-dtype": (lambda a: a.update(key_start=torch.zeros(1, device=DEVICE)), TypeError,
                        r"key_start must be an int32 or int64 tensor"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_inputs(bad):
    mutate, error, match = bad
    args = _valid_call()
    mutate(args)
    structure, key_start = args.pop("structure"), args.pop("key_start", None)
    with pytest.raises(error, match=match):
        block_sparse_attention(args["q"], args["k"], args["v"], structure, key_start=key_start)


@pytest.mark.parametrize("block_d,block_size,bucket,expected", [
    (128, 128, 256, {(128, 128, 8, 3, True)}),  # long, d 128: the measured winner (128x64/4 warps would spill)
    (64, 128, 1024, {(128, 128, 8, 3, True), (128, 64, 4, 3, False)}),  # long, d 64: both winners
    (256, 128, 256, None),  # neither winner fits d 256: the ordinary candidates stay
    (128, 64, 256, None),  # 128-row tiles do not fit block 64: likewise
])
def test_autotune_candidates(block_d, block_size, bucket, expected):
    from flexprefill_hf.ops import block_sparse_attention as bsa

    def prune(length_bucket):
        return bsa._prune_configs(bsa._GPU_CONFIGS, {"length_bucket": length_bucket}, BLOCK_SIZE=block_size, BLOCK_D=block_d)

    kept, short = prune(bucket), prune(1)
    assert kept and all(c.kwargs["BLOCK_M"] <= block_size and c.kwargs["BLOCK_N"] <= block_size for c in kept)
    if expected is None:
        assert kept == short
    else:
        assert {bsa._config_tuple(c) for c in kept} == expected and len(short) > len(kept)
