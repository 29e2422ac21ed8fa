"""Attention latency on one GPU: FlexPrefill (selection + Triton kernel) against dense SDPA, side by side.

    python benchmarks/bench_attention.py --seq 8192 32768 131072 --inputs random structured --out results.json

For each (N, input, gamma, head_dim): median CUDA-event times of SDPA causal with the cuDNN and the flash
backends, of our selection, of our sparse kernel on that selection, of the whole operator, and of compiled
flex_attention on our own block structure (a peer kernel); the computed fraction of causal blocks; the
relative error against dense; TFLOP/s counted on the (query, key) pairs actually computed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexprefill_hf import FlexPrefillConfig, flexprefill_attention
from flexprefill_hf.ops.attention.block_sparse_triton import block_sparse_attention_triton
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.testing import structured_qkv


def median_ms(fn, warmup=10, rep=50) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def once_ms(fn) -> float:
    """One CUDA-event-timed call after one warm-up: for calls of many seconds (dense at 512K+)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def computed_pairs(structure) -> float:
    """(query, key) token pairs the kernel computes: full blocks plus the causal half of diagonal blocks."""
    grid = structure.grid
    bs = grid.block_size
    blocks = structure.counts.sum().item()
    diagonal = structure.counts.numel()  # every present query block computes its diagonal block
    return (blocks - diagonal) * bs * bs + diagonal * bs * (bs + 1) / 2


def sdpa(q, k, v, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2)


def flex_peer(q, k, v, structure):
    """Compiled flex_attention on our structure: the diagonal as a masked block, the others as full blocks."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    grid = structure.grid
    assert grid.pad == 0 and grid.q_len == grid.k_len, "the peer needs N a multiple of the block size"
    counts, indices = structure.counts, structure.indices.clamp_min(0)
    diag = torch.arange(grid.num_blocks, device=q.device, dtype=torch.int32).expand_as(counts)
    partial = torch.zeros_like(indices)  # the diagonal, in a list as wide as the full one
    partial[..., 0] = diag

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = BlockMask.from_kv_blocks(
        torch.ones_like(counts), partial, counts - 1, indices.contiguous(),
        BLOCK_SIZE=grid.block_size, mask_mod=causal,
    )
    compiled = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=True).transpose(1, 2)


def run_case(n, inputs, gamma, head_dim, dtype, q_heads, kv_heads, with_flex, long_from, no_dense_from):
    torch.manual_seed(n)
    torch.cuda.reset_peak_memory_stats()
    if inputs == "random":
        q = torch.randn(1, n, q_heads, head_dim, device="cuda", dtype=dtype)
        k = torch.randn(1, n, kv_heads, head_dim, device="cuda", dtype=dtype)
        v = torch.randn(1, n, kv_heads, head_dim, device="cuda", dtype=dtype)
    else:
        q, k, v = structured_qkv(1, n, q_heads, kv_heads, head_dim, dtype=dtype, device="cuda",
                                 generator=torch.Generator(device="cuda").manual_seed(n))
    config = FlexPrefillConfig(gamma=gamma, tau=0.1, block_size=128, min_budget=1024, cuda_dense_below=0)
    scale = 1.0 / math.sqrt(head_dim)
    row = dict(n=n, inputs=inputs, gamma=gamma, head_dim=head_dim, dtype=str(dtype).replace("torch.", ""))

    timer = once_ms if n >= long_from else median_ms
    with_dense = n < no_dense_from
    if with_dense:
        dense = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
        row["cudnn_ms"] = timer(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
    if n < long_from:  # the flash backend is ~1.7x slower than cuDNN everywhere: skip it at long N
        row["flash_ms"] = median_ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
    torch.cuda.synchronize()
    sel = select_blocks(q, k, config, scale)
    row["select_ms"] = timer(lambda: select_blocks(q, k, config, scale))
    row["kernel_ms"] = timer(lambda: block_sparse_attention_triton(q, k, v, sel.structure, softmax_scale=scale))
    row["total_ms"] = timer(lambda: flexprefill_attention(q, k, v, config))
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    pairs = computed_pairs(sel.structure) * 1.0
    row["fraction"] = sel.structure.counts.sum().item() / (sel.causal_blocks.sum().item() * q_heads)
    row["query_aware"] = sel.query_aware.float().mean().item()
    row["kernel_tflops"] = 4 * head_dim * pairs / row["kernel_ms"] / 1e9
    if with_dense:
        out = flexprefill_attention(q, k, v, config)
        row["rel_err"] = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        full_pairs = n * (n + 1) / 2 * q_heads
        row["cudnn_tflops"] = 4 * head_dim * full_pairs / row["cudnn_ms"] / 1e9
        row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["total_ms"]
        del out, dense
    if n < long_from:  # the same code path at every length; one more call costs seconds at 1M
        torch.cuda.set_sync_debug_mode("error")
        try:
            flexprefill_attention(q, k, v, config)
            row["host_sync_free"] = True
        except RuntimeError:
            row["host_sync_free"] = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if with_flex:
        try:
            peer = flex_peer(q, k, v, sel.structure)
            peer()
            row["flex_ms"] = median_ms(peer)
            row["flex_tflops"] = 4 * head_dim * pairs / row["flex_ms"] / 1e9
        except Exception as exc:  # the peer is optional; say why it is missing
            row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    del q, k, v, sel
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--inputs", nargs="+", default=["random", "structured"], choices=["random", "structured"])
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.9])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--flex", action="store_true", help="also time compiled flex_attention on our structure")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--long-from", type=int, default=524288,
                        help="from this N on, time one call (after a warm-up) instead of a median, skip flash")
    parser.add_argument("--no-dense-from", type=int, default=1 << 40,
                        help="from this N on, skip dense SDPA (and the error and speed-up against it)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    env = dict(
        date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(), argv=sys.argv,
    )
    print(json.dumps(env), flush=True)
    rows = []
    for n in args.seq:
        for inputs in args.inputs:
            for gamma in args.gamma:
                for head_dim in args.head_dim:
                    row = run_case(n, inputs, gamma, head_dim, dtype, args.q_heads, args.kv_heads, args.flex,
                                   args.long_from, args.no_dense_from)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "w") as f:
                            json.dump(dict(env=env, rows=rows), f, indent=1)
    cols = ["n", "inputs", "gamma", "head_dim", "cudnn_ms", "flash_ms", "select_ms", "kernel_ms", "total_ms",
            "flex_ms", "fraction", "rel_err", "peak_gib", "cudnn_tflops", "kernel_tflops", "flex_tflops", "speedup_vs_cudnn",
            "host_sync_free"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = []
        for c in cols:
            value = row.get(c, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
