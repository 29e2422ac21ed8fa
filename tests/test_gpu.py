"""GPU-only properties of the prefill path: no host synchronisation, CUDA-graph capture, torch.compile."""

import math
import subprocess
import sys

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig, flexprefill_attention, flexprefill_attention_with_stats
from flexprefill_hf.ops import backends, reference
from flexprefill_hf.ops.attention.block_sparse_fa4 import block_sparse_attention_fa4, fa4_available
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.testing import structured_qkv

from helpers import relative_error, seeded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = FlexPrefillConfig(gamma=0.9, tau=0.1, block_size=128, min_budget=512, cuda_dense_below=0)


def _inputs(n=4096, batch=1, dtype=torch.bfloat16):
    return structured_qkv(batch, n, 8, 2, 128, dtype=dtype, device="cuda", generator=seeded(0))


def test_prefill_path_has_no_host_sync():
    q, k, v = _inputs(batch=2)
    key_start = torch.tensor([0, 300], device="cuda")
    flexprefill_attention(q, k, v, CONFIG, key_start=key_start)  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flexprefill_attention(q, k, v, CONFIG, key_start=key_start)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sparse_output_close_to_dense_on_structured_input():
    q, k, v = _inputs()
    out = flexprefill_attention(q, k, v, FlexPrefillConfig(gamma=1.0, tau=0.0, block_size=128, min_budget=512, cuda_dense_below=0))
    want, _ = reference.dense_attention_reference(q.double(), k.double(), v.double(), 1 / math.sqrt(128))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert relative_error(out, want) <= 2 * relative_error(dense, want) + 1e-3


@pytest.mark.parametrize("kernel", ["triton", "fa4"])
def test_cuda_graph_capture_and_replay(kernel, monkeypatch):
    """Capture, then replay on new inputs. FA4 (forced at this length) gives the eager output bit for bit; the
    Triton kernel runs its fixed capture tile there (the autotuner's timing runs cannot be captured), so its
    replay is held to the float64 reference with the tolerance rule of the eager call."""
    if kernel == "fa4":
        if not (torch.cuda.get_device_capability() >= (9, 0) and fa4_available()):
            pytest.skip("needs flash_attn.cute on a GPU of compute capability >= 9.0")
        monkeypatch.setattr(backends, "FA4_SPARSE_FROM", 0)
    q, k, v = _inputs()
    structure = select_blocks(q, k, CONFIG, 1 / math.sqrt(128)).structure
    assert backends.choose_sparse_backend(q, k, structure, None)[0] == kernel
    eager = flexprefill_attention(q, k, v, CONFIG)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            flexprefill_attention(q, k, v, CONFIG)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flexprefill_attention(q, k, v, CONFIG)
    fresh_q, fresh_k, fresh_v = structured_qkv(1, 4096, 8, 2, 128, dtype=q.dtype, device="cuda", generator=seeded(1))
    q.copy_(fresh_q), k.copy_(fresh_k), v.copy_(fresh_v)
    graph.replay()
    torch.cuda.synchronize()
    want = flexprefill_attention(q, k, v, CONFIG)
    assert not torch.equal(captured, eager)
    if kernel == "fa4":
        torch.testing.assert_close(captured, want, rtol=0, atol=0)
        return
    scale = 1 / math.sqrt(128)
    structure = select_blocks(q, k, CONFIG, scale).structure
    ref, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale)
    floor = torch.finfo(q.dtype).eps * ref.abs().max().item()
    eager_err = (want.double() - ref).abs().max().item()
    assert (captured.double() - ref).abs().max().item() <= 2 * eager_err + floor


def test_short_prompts_route_dense_on_cuda():
    q, k, v = _inputs(n=2048)
    _, stats = flexprefill_attention_with_stats(q, k, v, CONFIG.replace(cuda_dense_below=4096))
    assert stats.dense
    _, stats = flexprefill_attention_with_stats(q, k, v, CONFIG)
    assert not stats.dense


def test_torch_compile_fullgraph():
    q, k, v = _inputs()

    def run(q, k, v):
        out, stats = flexprefill_attention_with_stats(q, k, v, CONFIG)
        return out, stats.query_aware, stats.computed_blocks

    out, query_aware, blocks = torch.compile(run, fullgraph=True)(q, k, v)
    want_out, want_query_aware, want_blocks = run(q, k, v)
    assert torch.equal(query_aware, want_query_aware) and torch.equal(blocks, want_blocks)
    # The same choices per head. Inductor may tune the kernel's tiles differently (another summation order,
    # other bf16 roundings of the probabilities: up to 3e-3 apart on the H200), so both are compared with
    # float64 on eager's structure: the compiled output must be as accurate as the eager one.
    scale = 1 / math.sqrt(q.shape[-1])
    structure = select_blocks(q, k, CONFIG, scale).structure
    assert torch.equal(structure.counts.sum(-1, dtype=torch.int32), want_blocks)
    ref, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale, None)
    eager_err = (want_out.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    floor = torch.finfo(q.dtype).eps * ref.abs().max().item()
    assert err <= 2 * eager_err + floor, f"compiled error {err:.3g} vs eager {eager_err:.3g} (floor {floor:.3g})"


def test_key_start_out_of_range_is_a_device_side_assert():
    """On CUDA the range check is torch._assert_async (no host sync): the failure surfaces at a later CUDA call
    (the next synchronisation at the latest) with the check's message. Run in a child process: a device assert
    ruins the context."""
    code = (
        "import torch, flexprefill_hf as f\n"
        "q = torch.randn(1, 4096, 8, 128, device='cuda', dtype=torch.bfloat16)\n"
        "k = torch.randn(1, 4096, 2, 128, device='cuda', dtype=torch.bfloat16)\n"
        "cfg = f.FlexPrefillConfig(cuda_dense_below=0)\n"
        "f.flexprefill_attention(q, k, k, cfg, key_start=torch.tensor([5000], device='cuda'))\n"
        "print('returned', flush=True)\n"
        "torch.cuda.synchronize()\n"
        "print('synchronised', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "synchronised" not in done.stdout, done.stdout + done.stderr
    assert "expected 0 <= key_start[b] <= k_len = 4096" in done.stderr, done.stderr[-2000:]


def test_batch_zero_on_the_sparse_route():
    q, k, v = _inputs()
    out, stats = flexprefill_attention_with_stats(q[:0], k[:0], v[:0], CONFIG)
    assert out.shape == (0,) + q.shape[1:] and not stats.dense and stats.computed_blocks.shape == (0, 8)


@pytest.mark.parametrize("k_len,dense", [(512, True), (513, False)], ids=["at-threshold", "one-past"])
def test_dense_threshold_on_cuda(k_len, dense):
    """CONFIG's threshold is 512 keys: 512 runs dense, 513 the Triton path; both match their float64 oracle
    within twice the error of torch's own bf16 attention."""
    assert CONFIG.effective_dense_threshold == 512
    q, k, v = _inputs(n=k_len, batch=2)
    key_start = torch.tensor([0, 77], device="cuda")
    out, stats = flexprefill_attention_with_stats(q, k, v, CONFIG, key_start=key_start)
    assert stats.dense is dense
    scale = 1 / math.sqrt(128)
    if dense:
        want, _ = reference.dense_attention_reference(q, k, v, scale, key_start)
        low, _ = reference.dense_attention_reference(q, k, v, scale, key_start, dtype=q.dtype)
    else:
        structure = select_blocks(q, k, CONFIG, scale, key_start).structure
        want, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale, key_start)
        low, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale, key_start, dtype=q.dtype)
    err = (out.double() - want).abs().max().item()
    floor = torch.finfo(q.dtype).eps * want.abs().max().item()
    assert err <= 2 * (low.double() - want).abs().max().item() + floor


def test_logits_beyond_fp16_range_on_cuda():
    q, k, v = _inputs(dtype=torch.float16)
    q, k = q * 100, k * 100
    out = flexprefill_attention(q, k, v, CONFIG)
    assert torch.isfinite(out).all()
    scale = 1 / math.sqrt(128)
    structure = select_blocks(q, k, CONFIG, scale).structure
    want, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale)
    in_fp32, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale, dtype=torch.float32)
    err = (out.double() - want).abs().max().item()
    assert err <= 2 * (in_fp32.double() - want).abs().max().item() + torch.finfo(q.dtype).eps * want.abs().max().item()


# The operator's backends on the GPU (issue 9): flash-attn-4 where ops/backends picks it.
needs_fa4 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) and fa4_available()),
    reason="needs flash_attn.cute on a GPU of compute capability >= 9.0",
)


@needs_fa4
def test_torch_compile_runs_fa4_inside_the_custom_op(monkeypatch):
    """Under torch.compile the sparse route is one custom op (ops/compiled.py) that runs the eager code: FA4
    included, so the compiled output equals the eager one bit for bit."""
    from flexprefill_hf.ops.attention import block_sparse_fa4

    monkeypatch.setattr(backends, "FA4_SPARSE_FROM", 0)
    calls = []
    real = block_sparse_fa4._block_sparse_attention_fa4
    monkeypatch.setattr(block_sparse_fa4, "_block_sparse_attention_fa4", lambda *a: calls.append(1) or real(*a))
    q, k, v = _inputs()
    eager = flexprefill_attention(q, k, v, CONFIG)
    assert calls == [1]
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flexprefill_attention(q, k, v, CONFIG), fullgraph=True)(q, k, v)
    assert calls == [1, 1]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@needs_fa4
@pytest.mark.parametrize("n", [4096, 4000])  # aligned: one FA4 call; not: sliced pieces merged by LSE
def test_sparse_route_runs_fa4_exactly_and_without_host_sync(n, monkeypatch):
    monkeypatch.setattr(backends, "FA4_SPARSE_FROM", 0)  # these lengths run the Triton kernel by default
    q, k, v = _inputs(n=n)
    scale = 1 / math.sqrt(128)
    structure = select_blocks(q, k, CONFIG, scale).structure
    assert backends.choose_sparse_backend(q, k, structure, None)[0] == "fa4"
    out = flexprefill_attention(q, k, v, CONFIG)  # JIT-compiles the variants first
    torch.testing.assert_close(out, block_sparse_attention_fa4(q, k, v, structure, softmax_scale=scale), rtol=0, atol=0)
    want, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale)
    low, _ = reference.block_sparse_attention_reference(q, k, v, structure, scale, dtype=q.dtype)
    floor = torch.finfo(q.dtype).eps * want.abs().max().item()
    assert (out.double() - want).abs().max().item() <= 2 * (low.double() - want).abs().max().item() + floor
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flexprefill_attention(q, k, v, CONFIG)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_fa4
def test_dense_route_runs_fa4_and_decode_runs_plain_sdpa():
    q, k, v = _inputs(n=2048)
    scale = 1 / math.sqrt(128)
    config = CONFIG.replace(cuda_dense_below=4096)
    assert backends.choose_dense_backend(q, k, None) == "fa4"
    out = flexprefill_attention(q, k, v, config)
    torch.testing.assert_close(out, backends.dense_attention(q, k, v, scale, None, backend="fa4"), rtol=0, atol=0)
    one = q[:, -1:]
    assert backends.choose_dense_backend(one, k, None) == "sdpa"
    want = torch.nn.functional.scaled_dot_product_attention(
        one.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(flexprefill_attention(one, k, v, config), want, rtol=0, atol=0)


def test_operator_checks_the_kernels_head_dim_itself():
    """The operator calls the kernels through their unchecked launchers, so on a sparse CUDA call it checks their
    head dims itself (before the selection); the dense route (SDPA) takes any head dim."""
    q, k, v = structured_qkv(1, 1024, 4, 2, 60, dtype=torch.bfloat16, device="cuda", generator=seeded(0))
    with pytest.raises(ValueError, match=r"head_dim=60 is not supported; expected a multiple of 8 in \[16, 256\]"):
        flexprefill_attention(q, k, v, CONFIG)
    out, stats = flexprefill_attention_with_stats(q[:, :512], k[:, :512], v[:, :512], CONFIG)  # at the threshold
    want, _ = reference.dense_attention_reference(q[:, :512], k[:, :512], v[:, :512], 1 / math.sqrt(60))
    assert stats.dense and relative_error(out, want) < 1.6e-2
