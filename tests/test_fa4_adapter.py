"""The flash-attn-4 adapter (ops/attention/block_sparse_fa4.py) and the backend choice (ops/backends.py).

On CPU: the mapping from our end-aligned block structure onto FA4's tiles, run through an emulation of FA4's
documented semantics (tiles from token 0; a masked tile gets the bottom-right causal mask, a full tile no mask
at all, which is stricter than SM90 where every tile is causally masked), must reproduce the float64 reference
exactly (to float64 rounding) on every length; and the decisions of ``supports`` / ``choose_*_backend``.
On the GPU (``-m gpu``, skipped without flash_attn.cute): the real kernel against the float64 reference with
the Triton kernel's oracle (max error at most twice torch's own in the same dtype, plus one unit of the dtype
at the largest output), over edge shapes, and under CUDA-graph capture.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from flexprefill_hf.ops import backends
from flexprefill_hf.ops.attention import block_sparse_fa4 as fa4
from flexprefill_hf.ops.block_structure import block_mask_to_structure
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.reference import block_sparse_attention_reference, masked_attention_reference

TILE = 128


def random_structure(batch, heads, grid: BlockGrid, density: float, seed: int, keep_diagonal=True, keep_sink=True):
    """A random block structure; by default with the diagonal and block 0 (what select_blocks guarantees)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(grid.num_query_blocks)[:, None] + grid.first_query_block
    cols = torch.arange(grid.num_blocks)[None, :]
    # Blocks after the diagonal are allowed in a structure (they see nothing causally): include some.
    mask = torch.rand(batch, heads, grid.num_query_blocks, grid.num_blocks, generator=gen) < density
    if keep_diagonal:
        mask |= cols == rows
    if keep_sink:
        mask |= cols == 0
    return block_mask_to_structure(mask, grid)


def emulate_fa4(softmax_scale):
    """attend(q, k, v, lists, causal) in float64 with FA4's tile semantics (see the module docstring)."""

    def attend(q, k, v, lists, causal):
        batch, sq, heads, _ = q.shape
        sk = k.shape[1]
        row = torch.arange(sq)[:, None]
        col = torch.arange(sk)[None, :]
        causal_mask = col <= row + (sk - sq)  # bottom-right
        if lists is None:
            mask = (causal_mask if causal else torch.ones(sq, sk, dtype=torch.bool))[None, None]
        else:
            assert causal
            mask_cnt, mask_idx, full_cnt, full_idx = lists
            m_tiles, n_tiles = -(-sq // TILE), -(-sk // TILE)
            for t in lists:
                assert t.dtype == torch.int32 and t.is_contiguous()
            assert mask_cnt.shape == full_cnt.shape == (batch, heads, m_tiles)
            assert mask_idx.shape[:3] == full_idx.shape[:3] == (batch, heads, m_tiles)
            assert full_idx.shape[3] <= n_tiles and mask_idx.shape[3] <= n_tiles

            def tiles(cnt, idx):
                out = torch.zeros(batch, heads, m_tiles, n_tiles + 1, dtype=torch.bool)
                slot = torch.arange(idx.shape[-1])
                listed = slot < cnt[..., None]
                assert ((idx >= 0) & (idx < n_tiles))[listed].all(), "a listed tile outside the keys"
                out.scatter_(-1, torch.where(listed, idx, n_tiles).long(), True)
                return out[..., :n_tiles]

            masked, full = tiles(mask_cnt, mask_idx), tiles(full_cnt, full_idx)
            assert not (masked & full).any(), "a tile listed twice"
            expand = lambda t: t.repeat_interleave(TILE, 2).repeat_interleave(TILE, 3)[:, :, :sq, :sk]
            mask = (expand(masked) & causal_mask) | expand(full)
        return masked_attention_reference(q, k, v, mask, softmax_scale)

    return attend


def test_fa4_available_is_false_when_the_import_fails_and_never_raises(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError, whether or not the package is installed.
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)
    fa4.fa4_available.cache_clear()
    try:
        assert fa4.fa4_available() is False
    finally:
        fa4.fa4_available.cache_clear()


@pytest.mark.parametrize(
    "q_len,k_len",
    [
        (256, 256),  # aligned: one call
        (384, 1024),  # cache a multiple of the block: one call
        (300, 300),  # partial block 0: main + block 0
        (100, 100),  # a single partial block: block 0 only
        (1000, 1000),
        (1, 1000),  # one query row (decode shape)
        (5, 700),  # head rows only
        (130, 1000),  # head + main + block 0
        (200, 1024),  # head + main, no partial key block
        (299, 300),  # cache 1 < r: the head rows lie in block 0
        (129, 257),
    ],
)
@pytest.mark.parametrize("keep_sink", [True, False])
def test_pieces_reproduce_the_reference_exactly(q_len, k_len, keep_sink):
    grid = BlockGrid(q_len, k_len, TILE)
    batch, q_heads, kv_heads, d = 2, 4, 2, 16
    gen = torch.Generator().manual_seed(q_len * 7919 + k_len)
    q = torch.randn(batch, q_len, q_heads, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, k_len, kv_heads, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, k_len, kv_heads, d, generator=gen, dtype=torch.float64)
    # Some rows keep neither the diagonal nor block 0: empty rows must come out 0.
    structure = random_structure(batch, q_heads, grid, 0.3, seed=k_len, keep_diagonal=keep_sink, keep_sink=keep_sink)
    scale = d**-0.5
    out, lse = fa4.run_pieces(q, k, v, structure, emulate_fa4(scale), with_lse=True)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, structure, scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)
    out_only, none = fa4.run_pieces(q, k, v, structure, emulate_fa4(scale), with_lse=False)
    assert none is None
    torch.testing.assert_close(out_only, ref_out, atol=1e-12, rtol=1e-10)


def test_split_geometry():
    assert fa4.Fa4Split.of(BlockGrid(4096, 8192, 128)).aligned
    split = fa4.Fa4Split.of(BlockGrid(8000, 8000, 128))
    assert (split.r, split.s, split.shift, split.has_head) == (8000 % 128, 8000 % 128, 1, False)
    split = fa4.Fa4Split.of(BlockGrid(300, 4400, 128))  # the offset 4100 is not a multiple of the block
    assert split.r == 4400 % 128 and split.shift == 1 and split.has_head
    assert (4400 - 300 + split.s - split.r) % 128 == 0  # the head piece's keys end on a block boundary


def test_lists_on_an_aligned_grid():
    """Aligned grid: the diagonal is the masked tile, the listed blocks before it the full tiles, later ones dropped."""
    grid = BlockGrid(256, 512, 128)  # rows are grid blocks 2 and 3
    mask = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    mask[0, 0, 0, [0, 2, 3]] = True  # block 3 lies after row 0's diagonal (2)
    mask[0, 0, 1, [1]] = True  # diagonal 3 not listed
    s = block_mask_to_structure(mask, grid)
    mask_cnt, mask_idx, full_cnt, full_idx = fa4.fa4_block_lists(s.indices, s.counts, 2, 0, 4)
    assert mask_cnt.tolist() == [[[1, 0]]]
    assert mask_idx[..., 0].tolist() == [[[2, 3]]]
    assert full_cnt.tolist() == [[[1, 1]]]
    assert full_idx.tolist() == [[[[0, -1, -1, -1], [1, -1, -1, -1]]]]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(device_type="cpu"), "needs CUDA"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(capability=(8, 0)), "compute capability"),
        (dict(block_size=64), "block_size=64"),
        (dict(head_dim=256), "head_dim=256"),
        (dict(head_dim=72 + 4), "head_dim=76"),
        (dict(padded=True), "left padding"),
        (dict(compiling=True), "torch.compile"),
    ],
)
def test_unsupported_reasons(kwargs, fragment):
    case = dict(device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, block_size=128, head_dim=128, padded=False)
    assert fa4.unsupported_reason(fa4.KernelCase(**case)) is None
    for d in (16, 64, 96, 128):
        assert fa4.unsupported_reason(fa4.KernelCase(**{**case, "head_dim": d})) is None
    assert fa4.unsupported_reason(fa4.KernelCase(**{**case, "capability": (10, 0)})) is None
    case.update(kwargs)
    reason = fa4.unsupported_reason(fa4.KernelCase(**case))
    assert reason is not None and fragment in reason


def test_supports_says_no_on_cpu_without_importing_flash_attn():
    q = torch.zeros(1, 256, 2, 64, dtype=torch.bfloat16)
    structure = random_structure(1, 2, BlockGrid(256, 256, 128), 0.5, seed=0)
    ok, reason = fa4.supports(q, q, structure)
    assert not ok and "CUDA" in reason
    assert backends.choose_sparse_backend(q, q, structure, None)[0] == "torch"


@pytest.mark.parametrize(
    "case,expected",
    [
        (dict(), "fa4"),
        (dict(fa4=False), "triton"),
        (dict(capability=(8, 9)), "triton"),
        (dict(padded=True), "triton"),
        (dict(block_size=64), "triton"),
        (dict(head_dim=256), "triton"),
        (dict(compiling=True), "triton"),
        (dict(short=True), "triton"),
        (dict(short=True, fa4=False), "triton"),
        (dict(short=True, dtype=torch.float32), "torch"),
        (dict(dtype=torch.float32), "torch"),
        (dict(device_type="cpu"), "torch"),
    ],
)
def test_sparse_backend_decision(case, expected):
    base = dict(device_type="cuda", capability=(9, 0), dtype=torch.float16, block_size=128, head_dim=64, padded=False)
    available, short = case.pop("fa4", True), case.pop("short", False)
    name, reason = backends.sparse_backend_for(fa4.KernelCase(**{**base, **case}), fa4=available, short=short)
    assert name == expected and reason
    if short and expected == "triton" and available:
        assert "FA4_SPARSE_FROM" in reason


@pytest.mark.parametrize(
    "case,expected",
    [
        (dict(), "fa4"),
        (dict(fa4=False), "sdpa_cudnn"),
        (dict(fa4=False, q_len=1), "sdpa"),
        (dict(q_len=1), "sdpa"),  # decode: no mask at all, the call transformers' sdpa makes
        (dict(fa4=False, q_len=100), "sdpa_lower_right"),
        (dict(q_len=100), "fa4"),
        (dict(compiling=True), "sdpa_cudnn"),
        (dict(padded=True), "masked"),
        (dict(padded=True, q_len=1), "masked"),
        (dict(capability=(8, 0)), "sdpa_cudnn"),
        (dict(head_dim=256, q_len=100), "sdpa_lower_right"),
        (dict(dtype=torch.float32), "sdpa_cudnn"),
        (dict(device_type="cpu"), "sdpa"),
        (dict(device_type="cpu", q_len=100), "masked"),
    ],
)
def test_dense_backend_decision(case, expected):
    base = dict(device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, head_dim=128, q_len=4096,
                k_len=4096, padded=False, fa4=True)
    assert backends.dense_backend_for(**{**base, **case}) == expected


@pytest.mark.parametrize("q_len,k_len", [(1, 300), (77, 300), (300, 300)])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_attention_matches_the_reference_on_cpu(q_len, k_len, padded):
    gen = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, q_len, 4, 32, generator=gen)
    k = torch.randn(2, k_len, 2, 32, generator=gen)
    v = torch.randn(2, k_len, 2, 32, generator=gen)
    key_start = torch.tensor([0, 17]) if padded else None
    from flexprefill_hf.ops.reference import dense_attention_reference

    ref, _ = dense_attention_reference(q, k, v, 32**-0.5, key_start)
    # The chosen backend, and every other one valid for the case, called explicitly.
    if padded:
        valid = ["masked"]
    elif q_len == 1:
        valid = ["sdpa", "masked", "sdpa_lower_right"]
    elif q_len == k_len:
        valid = ["sdpa", "sdpa_cudnn", "masked"]
    else:
        valid = ["masked", "sdpa_lower_right"]
    assert backends.choose_dense_backend(q, k, key_start) in valid
    for name in [None] + valid:
        out = backends.dense_attention(q, k, v, 32**-0.5, key_start, backend=name)
        assert out.shape == q.shape and torch.isfinite(out).all()  # padding rows are 0, not NaN
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5, msg=f"backend {name}")


# ---------------------------------------------------------------------------------------------
# GPU: the real kernel
# ---------------------------------------------------------------------------------------------

needs_fa4 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) and fa4.fa4_available()),
    reason="needs flash_attn.cute on a GPU of compute capability >= 9.0",
)


def _gpu_case(batch, q_len, k_len, q_heads, kv_heads, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, d, generator=gen).to("cuda", dtype)
    k = torch.randn(batch, k_len, kv_heads, d, generator=gen).to("cuda", dtype)
    v = torch.randn(batch, k_len, kv_heads, d, generator=gen).to("cuda", dtype)
    grid = BlockGrid(q_len, k_len, TILE)
    structure = random_structure(batch, q_heads, grid, 0.3, seed=seed)
    structure = type(structure)(structure.indices.cuda(), structure.counts.cuda(), grid)
    return q, k, v, structure


def _assert_matches_reference(out, q, k, v, structure, scale):
    ref, _ = block_sparse_attention_reference(q, k, v, structure, scale)
    low, _ = block_sparse_attention_reference(q, k, v, structure, scale, dtype=q.dtype)
    torch_err = (low.double() - ref).abs().max().item()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    err = (out.double() - ref).abs().max().item()
    floor = torch.finfo(q.dtype).eps * ref.abs().max().item()
    assert err <= 2 * torch_err + floor, f"FA4 error {err:.3g} vs torch's {torch_err:.3g} (floor {floor:.3g})"


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize(
    "batch,q_len,k_len,q_heads,kv_heads,d",
    [
        (1, 1024, 1024, 8, 2, 128),  # aligned, GQA 4
        (2, 1000, 1000, 8, 1, 64),  # partial block 0, GQA 8, batch 2
        (1, 300, 4400, 4, 1, 128),  # offset not a multiple of the block: head + main + block 0
        (2, 2048, 8192, 8, 2, 64),  # prefill on an aligned cache
        (1, 1, 4096, 4, 1, 128),  # a single query row
        (2, 777, 1333, 16, 2, 128),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fa4_kernel_matches_the_reference(batch, q_len, k_len, q_heads, kv_heads, d, dtype):
    q, k, v, structure = _gpu_case(batch, q_len, k_len, q_heads, kv_heads, d, dtype, seed=q_len + k_len)
    scale = d**-0.5
    out = fa4.block_sparse_attention_fa4(q, k, v, structure, softmax_scale=scale)
    _assert_matches_reference(out, q, k, v, structure, scale)
    out2, lse = fa4.block_sparse_attention_fa4_with_lse(q, k, v, structure, softmax_scale=scale)
    _, ref_lse = block_sparse_attention_reference(q, k, v, structure, scale)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.gpu
@needs_fa4
def test_fa4_kernel_reads_hf_transposed_views():
    q, k, v, structure = _gpu_case(1, 1000, 1000, 8, 2, 128, torch.bfloat16, seed=3)
    # [B, H, N, D] storage viewed as [B, N, H, D], as Hugging Face hands them over.
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = fa4.block_sparse_attention_fa4(qt, kt, vt, structure)
    _assert_matches_reference(out, q, k, v, structure, 128**-0.5)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("q_len,k_len", [(2048, 2048), (1000, 1000)])
def test_fa4_kernel_under_cuda_graph_capture(q_len, k_len):
    q, k, v, structure = _gpu_case(1, q_len, k_len, 8, 2, 128, torch.bfloat16, seed=11)
    eager = fa4.block_sparse_attention_fa4(q, k, v, structure)  # also compiles the kernel variants
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fa4.block_sparse_attention_fa4(q, k, v, structure)
    q.copy_(torch.randn_like(q))  # replay must read the new inputs
    graph.replay()
    torch.cuda.synchronize()
    _assert_matches_reference(captured, q, k, v, structure, 128**-0.5)
    assert not torch.equal(captured, eager)


@pytest.mark.gpu
@needs_fa4
def test_fa4_refuses_left_padding():
    q, k, v, structure = _gpu_case(2, 256, 256, 4, 1, 64, torch.bfloat16, seed=5)
    key_start = torch.tensor([0, 3], device="cuda")
    name, reason = backends.choose_sparse_backend(q, k, structure, key_start)
    assert name == "triton" and "left padding" in reason
    with pytest.raises(ValueError, match="left padding"):
        fa4.block_sparse_attention_fa4(q, k, v, structure, key_start=key_start)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "q_len,k_len,backend",
    [
        (1, 4096, None), (1, 4096, "sdpa"),
        (4096, 4096, None), (4096, 4096, "sdpa_cudnn"), (4096, 4096, "sdpa"), (4096, 4096, "fa4"),
        (1000, 3000, None), (1000, 3000, "sdpa_lower_right"), (1000, 3000, "masked"), (1000, 3000, "fa4"),
    ],
)
def test_dense_backends_on_gpu(q_len, k_len, backend):
    if backend == "fa4" and not (torch.cuda.get_device_capability() >= (9, 0) and fa4.fa4_available()):
        pytest.skip("needs flash_attn.cute on a GPU of compute capability >= 9.0")
    gen = torch.Generator().manual_seed(q_len)
    q = torch.randn(1, q_len, 8, 128, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, k_len, 2, 128, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(1, k_len, 2, 128, generator=gen).to("cuda", torch.bfloat16)
    from flexprefill_hf.ops.reference import dense_attention_reference

    out = backends.dense_attention(q, k, v, 128**-0.5, None, backend=backend)
    ref, _ = dense_attention_reference(q, k, v, 128**-0.5)
    low, _ = dense_attention_reference(q, k, v, 128**-0.5, dtype=torch.bfloat16)
    err, torch_err = (out.double() - ref).abs().max().item(), (low.double() - ref).abs().max().item()
    assert not math.isnan(err)
    assert err <= 2 * torch_err + torch.finfo(torch.bfloat16).eps * ref.abs().max().item(), (err, torch_err)


def test_the_case_knows_when_torch_compile_traces():
    q = torch.zeros(1, 256, 2, 64)
    structure = random_structure(1, 2, BlockGrid(256, 256, 128), 0.5, seed=0)
    assert not fa4.KernelCase.of(q, structure, None).compiling
    traced = torch.compile(
        lambda x: x + int(fa4.KernelCase.of(x, structure, None).compiling), backend="eager", fullgraph=True
    )
    assert traced(q).eq(1).all()


def test_dense_attention_refuses_an_unknown_backend():
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="backend='flash3' is not a dense backend"):
        backends.dense_attention(q, q, q, 0.25, None, backend="flash3")
