"""Attention latency on one GPU: FlexPrefill (selection + block-sparse kernel) against dense, side by side.

    python benchmarks/bench_attention.py --seq 8192 32768 131072 --inputs random structured clustered --out r.json
    python benchmarks/bench_attention.py --device cpu --tiny      # smoke run: arguments, inputs, table (no GPU)

For each (N, input, gamma, head_dim), in one process: median CUDA-event times of dense causal attention by
SDPA-cuDNN, SDPA-flash and flash-attn-4 (``fa4_dense_ms``, when ``flash_attn.cute`` imports); of our selection;
of the block-sparse forward on that selection by our Triton kernel (``kernel_ms``) and by flash-attn-4
(``fa4_sparse_ms``); of the whole operator (``total_ms``: selection plus the kernel ``ops/backends.py`` picks,
named in ``sparse_backend``); optionally of compiled flex_attention on our structure (a peer kernel). Also the
computed fraction of causal blocks, the relative error against dense, TFLOP/s on the (query, key) pairs
actually computed, and the operator's speed-up over cuDNN and over the best dense backend (``best_dense``).

Inputs: ``random`` (Gaussian), ``structured`` and ``clustered`` (``flexprefill_hf.testing``: sinks, a local band
and vertical stripes, isolated or in runs of 16 keys).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexprefill_hf import FlexPrefillConfig, flexprefill_attention
from flexprefill_hf.ops import backends
from flexprefill_hf.ops.runtime import compute_capability
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.testing import clustered_qkv, structured_qkv

INPUTS = ("random", "structured", "clustered")
ON_GPU = True  # set by main() from --device


def median_ms(fn, warmup=10, rep=50) -> float:
    """Median ms of fn(): triton's do_bench (CUDA events, rep in ms) on the GPU; perf_counter on the CPU."""
    if ON_GPU:
        import triton

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def once_ms(fn) -> float:
    """One CUDA-event-timed call after one warm-up: for calls of many seconds (dense at 512K+)."""
    if not ON_GPU:
        return median_ms(fn)
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
    if not ON_GPU:  # the CPU smoke run: SDPA's own choice
        backend = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
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


def make_inputs(inputs, n, q_heads, kv_heads, head_dim, dtype, device):
    if inputs == "random":
        gen = torch.Generator(device=device).manual_seed(n)
        q = torch.randn(1, n, q_heads, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(1, n, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(1, n, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        return q, k, v
    make = structured_qkv if inputs == "structured" else clustered_qkv
    return make(1, n, q_heads, kv_heads, head_dim, dtype=dtype, device=device,
                generator=torch.Generator(device=device).manual_seed(n))


def fa4_dense(q, k, v, scale):
    from flash_attn.cute.interface import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)[0]


def run_case(n, inputs, gamma, head_dim, dtype, q_heads, kv_heads, with_flex, long_from, no_dense_from, device,
             with_flash=True):
    torch.manual_seed(n)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    q, k, v = make_inputs(inputs, n, q_heads, kv_heads, head_dim, dtype, device)
    config = FlexPrefillConfig(gamma=gamma, tau=0.1, block_size=128, min_budget=1024, cuda_dense_below=0)
    scale = 1.0 / math.sqrt(head_dim)
    row = dict(n=n, inputs=inputs, gamma=gamma, head_dim=head_dim, dtype=str(dtype).replace("torch.", ""))

    timer = once_ms if n >= long_from else median_ms
    with_dense = n < no_dense_from
    # FA4 where ops/backends would use it (Hopper+, fp16/bf16, head dim it takes, flash_attn.cute imports).
    fa4_dense_ok = ON_GPU and backends.dense_backend_for(
        "cuda", compute_capability(q), dtype, head_dim, n, n, False) == "fa4"
    dense_ms = {}
    if with_dense:
        dense = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
        dense_ms["cudnn"] = row["cudnn_ms"] = timer(lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION))
        if fa4_dense_ok:
            dense_ms["fa4"] = row["fa4_dense_ms"] = timer(lambda: fa4_dense(q, k, v, scale))
    if with_flash and n < long_from and ON_GPU:  # ~1.7x slower than cuDNN everywhere: skipped at long N
        dense_ms["flash"] = row["flash_ms"] = median_ms(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
    if ON_GPU:
        torch.cuda.synchronize()
    sel = select_blocks(q, k, config, scale)
    row["select_ms"] = timer(lambda: select_blocks(q, k, config, scale))
    row["sparse_backend"] = backends.choose_sparse_backend(q, k, sel.structure, None)[0]
    if ON_GPU:
        from flexprefill_hf.ops.attention import block_sparse_fa4
        from flexprefill_hf.ops.attention.block_sparse_triton import block_sparse_attention_triton

        row["kernel_ms"] = timer(lambda: block_sparse_attention_triton(q, k, v, sel.structure, softmax_scale=scale))
        if block_sparse_fa4.supports(q, k, sel.structure)[0]:
            row["fa4_sparse_ms"] = timer(
                lambda: block_sparse_fa4.block_sparse_attention_fa4(q, k, v, sel.structure, softmax_scale=scale))
    row["total_ms"] = timer(lambda: flexprefill_attention(q, k, v, config))
    if ON_GPU:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    pairs = computed_pairs(sel.structure) * 1.0
    row["fraction"] = sel.structure.counts.sum().item() / (sel.causal_blocks.sum().item() * q_heads)
    row["query_aware"] = sel.query_aware.float().mean().item()
    for name in ("kernel", "fa4_sparse"):
        if f"{name}_ms" in row:
            row[f"{name}_tflops"] = 4 * head_dim * pairs / row[f"{name}_ms"] / 1e9
    if with_dense:
        out = flexprefill_attention(q, k, v, config)
        row["rel_err"] = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        full_pairs = n * (n + 1) / 2 * q_heads
        row["cudnn_tflops"] = 4 * head_dim * full_pairs / row["cudnn_ms"] / 1e9
        if "fa4_dense_ms" in row:
            row["fa4_dense_tflops"] = 4 * head_dim * full_pairs / row["fa4_dense_ms"] / 1e9
        best = min(dense_ms, key=dense_ms.get)
        row["best_dense"], row["best_dense_ms"] = best, dense_ms[best]
        row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["total_ms"]
        row["speedup_vs_best_dense"] = dense_ms[best] / row["total_ms"]
        del out, dense
    if n < long_from and ON_GPU:  # the same code path at every length; one more call costs seconds at 1M
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
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


COLUMNS = ["n", "inputs", "gamma", "head_dim", "cudnn_ms", "fa4_dense_ms", "flash_ms", "select_ms", "kernel_ms",
           "fa4_sparse_ms", "total_ms", "sparse_backend", "flex_ms", "fraction", "rel_err", "peak_gib", "cudnn_tflops",
           "fa4_dense_tflops", "kernel_tflops", "fa4_sparse_tflops", "flex_tflops", "speedup_vs_cudnn",
           "best_dense", "speedup_vs_best_dense", "host_sync_free"]


def print_table(rows, cols=COLUMNS) -> None:
    cols = [c for c in cols if any(c in row for row in rows)]  # drop columns no row has (CPU, no FA4)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = []
        for c in cols:
            value = row.get(c, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.9])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--flex", action="store_true", help="also time compiled flex_attention on our structure")
    parser.add_argument("--no-flash", action="store_true", help="skip SDPA's flash backend (never the fastest)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--long-from", type=int, default=524288,
                        help="from this N on, time one call (after a warm-up) instead of a median, skip flash")
    parser.add_argument("--no-dense-from", type=int, default=1 << 40,
                        help="from this N on, skip dense SDPA (and the error and speed-up against it)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu (with --tiny) only checks that the script runs: PyTorch paths, no kernels")
    parser.add_argument("--tiny", action="store_true",
                        help="N 512 (dense route) and 2200 (sparse, partial block), 4/2 heads, d 32, fp32 (smoke run)")
    args = parser.parse_args(argv)
    global ON_GPU
    ON_GPU = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        args.seq, args.head_dim, args.q_heads, args.kv_heads, dtype = [512, 2200], [32], 4, 2, torch.float32
    env = dict(
        date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name() if ON_GPU else "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(), argv=sys.argv,
        fa4=ON_GPU and backends.fa4_available(),
    )
    if ON_GPU:
        import triton

        env["triton"] = triton.__version__
    print(json.dumps(env), flush=True)
    rows = []
    for n in args.seq:
        for inputs in args.inputs:
            for gamma in args.gamma:
                for head_dim in args.head_dim:
                    row = run_case(n, inputs, gamma, head_dim, dtype, args.q_heads, args.kv_heads, args.flex,
                                   args.long_from, args.no_dense_from, args.device, not args.no_flash)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "w") as f:
                            json.dump(dict(env=env, rows=rows), f, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
