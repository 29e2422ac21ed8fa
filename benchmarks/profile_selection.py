"""Where the selection's time goes: a torch.profiler table of select_blocks at a few lengths (GPU), or,
on CPU, the number of aten ops one call dispatches (a proxy for its launch count on CUDA).

After ``pip install -e .``:

    python benchmarks/profile_selection.py                  # 8K and 128K, default (Triton) path
    python benchmarks/profile_selection.py --seq 32768 --torch   # the all-PyTorch path
    python benchmarks/profile_selection.py --time --seq 8192 32768 131072   # ms per call, no profiler
    python benchmarks/profile_selection.py --host --seq 8192 16384   # host ms per call, graph replay, cProfile
    python benchmarks/profile_selection.py --time --scratch      # diagonals through the global scratch
    python benchmarks/profile_selection.py --time --seq 131072 --stages triton   # force one stage set
    python benchmarks/profile_selection.py --time --seq 131072 --stages triton --split-from 131072   # split search
    python benchmarks/profile_selection.py --time --seq 32768 131072 --estimate-rows 1   # §4 by rows (default: tiles of 16)
    python benchmarks/profile_selection.py --time --estimate-ieee --k-columns   # the older §4 products and key loads
    TRITON_INTERPRET=1 python benchmarks/profile_selection.py --count-ops   # CPU: aten ops per call

At 8K the CUDA selection is launch-bound (tens of small torch ops around four Triton kernels), so the
ops one call dispatches track its eager time. ``--count-ops`` counts them on CPU tensors with both
backends "triton" (the CUDA path, run by Triton's interpreter): the count does not depend on the
length, so a short sequence (2048, block 128, 8 query / 2 KV heads) stands for 8K x 32 heads. Ops that
the interpreter itself dispatches while it runs a kernel are counted apart (they are no launches on CUDA).
"""

from __future__ import annotations

import argparse
import collections
import math

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.selection import select_blocks


# Ops that never launch a device kernel: allocations and CPU scalars (views are told by ``is_view``).
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "scalar_tensor", "lift_fresh", "detach"}


class _OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active; ``in_kernel`` > 0 files them under the kernels.
    ``launching``: those that would run a device kernel on CUDA (no view, no allocation, no CPU scalar)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.launching = 0
        self.kernel_ops = 0
        self.in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_kernel:
            self.kernel_ops += 1
        else:
            name = str(func.overloadpacket.__name__)
            self.ops[name] += 1
            self.launching += not func.is_view and name not in _NO_LAUNCH
        return func(*args, **(kwargs or {}))


def count_ops(seq: int = 2048, q_heads: int = 8, kv_heads: int = 2, head_dim: int = 128, block: int = 128,
              key_start=None, verbose: bool = True) -> tuple[int, int]:
    """aten ops dispatched by one CPU ``select_blocks`` call with both backends "triton" (fp16 inputs; the
    Triton kernels run in the interpreter, so TRITON_INTERPRET=1 must be set before triton is imported).
    Returns (all aten ops, those of them that launch a kernel on CUDA) outside the kernels; prints the ops
    by name when verbose."""
    import triton.runtime.interpreter as interpreter

    torch.manual_seed(0)
    q = torch.randn(1, seq, q_heads, head_dim, dtype=torch.float16)
    k = torch.randn(1, seq, kv_heads, head_dim, dtype=torch.float16)
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, block_size=block)
    kwargs = dict(scores_backend="triton", structure_backend="triton")
    select_blocks(q, k, config, 1 / math.sqrt(head_dim), key_start, **kwargs)  # warm-up: compile caches
    counter = _OpCounter()
    # The interpreter's own tensor work inside a launch is no device op on CUDA: count it apart.
    launcher = interpreter.InterpretedFunction.run
    kernels = [0]

    def counted_launch(self, *args, **kw):
        kernels[0] += 1
        counter.in_kernel += 1
        try:
            return launcher(self, *args, **kw)
        finally:
            counter.in_kernel -= 1

    interpreter.InterpretedFunction.run = counted_launch
    try:
        with counter:
            select_blocks(q, k, config, 1 / math.sqrt(head_dim), key_start, **kwargs)
    finally:
        interpreter.InterpretedFunction.run = launcher
    total = sum(counter.ops.values())
    if verbose:
        print(f"select_blocks: {total} aten ops outside kernels ({counter.launching} launching: no view, "
              f"allocation or CPU scalar), {kernels[0]} Triton launches "
              f"(seq {seq}, block {block}, {q_heads}/{kv_heads} heads, key_start {key_start is not None})")
        for name, n in counter.ops.most_common():
            print(f"  {n:4d}  {name}")
    return total, counter.launching


def host_profile(q, k, config, backends, iters: int, rows: int) -> None:
    """Host time of eager calls (perf_counter around calls that never wait for the GPU: the queue is far from
    full when the call is host-bound), the GPU's own time (one call captured in a CUDA graph, replayed), then
    cProfile's functions by own time: which Python, torch op or kernel launch the host time is spent in."""
    import cProfile
    import pstats
    import time

    scale = 1 / math.sqrt(q.shape[-1])
    n = k.shape[1]
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(iters):
        select_blocks(q, k, config, scale, **backends)
    host_ms = (time.perf_counter() - begin) * 1e3 / iters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        select_blocks(q, k, config, scale, **backends)
        with torch.cuda.graph(graph, stream=stream):
            select_blocks(q, k, config, scale, **backends)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"n={n}: host {host_ms:.3f} ms per eager call, GPU {start.elapsed_time(end) / iters:.3f} ms per call "
          f"replayed from a CUDA graph ({iters} calls)")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        select_blocks(q, k, config, scale, **backends)
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--torch", action="store_true", help="profile the all-PyTorch path (no Triton kernels)")
    parser.add_argument("--stages", choices=["triton", "compose"], default=None,
                        help="force select_blocks' structure_backend (default: its rule by length and dtype)")
    parser.add_argument("--split-from", type=int, default=None,
                        help="coverage rows of this many entries or more by the split search (coverage_triton.SPLIT_FROM)")
    parser.add_argument("--time", action="store_true",
                        help="GPU: mean ms per eager call (CUDA events around --iters back-to-back calls), no profiler")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-graphs", action="store_true",
                        help="eager launches even where the selection replays a CUDA graph (graphs.GRAPHS_BELOW = None)")
    parser.add_argument("--host", action="store_true",
                        help="GPU: host ms per call (no sync in the loop), GPU ms per call replayed from a CUDA graph, "
                             "and a cProfile table of where the host time goes")
    parser.add_argument("--scratch", action="store_true",
                        help="sum diagonals through the scores kernel's global scratch (scores_triton._DIAGONAL_BY_GATHER)")
    parser.add_argument("--no-shared-skew", action="store_true",
                        help="the Triton scores kernel even on Hopper (scores_triton._SHARED_SKEW = False; default there: Gluon)")
    parser.add_argument("--estimate-rows", type=int, default=None,
                        help="query blocks per program of the §4 estimate (estimate_triton.ROWS_PER_PROGRAM; 16/32: tiles)")
    parser.add_argument("--estimate-ieee", action="store_true",
                        help="the §4 tile kernel's products in IEEE fp32 FMAs (estimate_triton.TILE_DOT_PRECISION)")
    parser.add_argument("--k-columns", action="store_true",
                        help="the scores kernels read key tiles as their transpose (scores_triton._K_ROWS = False)")
    parser.add_argument("--shapes", action="store_true",
                        help="profiler table grouped by input shape (which of several calls of one op is the slow one)")
    parser.add_argument("--count-ops", action="store_true",
                        help="CPU: count the aten ops of one call (needs TRITON_INTERPRET=1; --seq default 2048)")
    args = parser.parse_args(argv)
    if args.count_ops:
        seqs = [2048] if args.seq == parser.get_default("seq") else args.seq
        for n in seqs:
            count_ops(n)
            count_ops(n, key_start=torch.tensor([n // 3]))
        return
    backends = dict(scores_backend="torch", structure_backend="torch") if args.torch else {}
    if args.stages:
        backends = dict(structure_backend=args.stages)
    if args.split_from is not None:
        from flexprefill_hf.ops.selection import coverage_triton

        coverage_triton.SPLIT_FROM = args.split_from
    if args.scratch:
        from flexprefill_hf.ops.selection import scores_triton

        scores_triton._DIAGONAL_BY_GATHER = False
    if args.no_graphs:
        from flexprefill_hf.ops.selection import graphs

        graphs.GRAPHS_BELOW = None
    if args.no_shared_skew:
        from flexprefill_hf.ops.selection import scores_triton

        scores_triton._SHARED_SKEW = False
    if args.estimate_rows is not None:
        from flexprefill_hf.ops.selection import estimate_triton

        estimate_triton.ROWS_PER_PROGRAM = args.estimate_rows
    if args.estimate_ieee:
        from flexprefill_hf.ops.selection import estimate_triton

        estimate_triton.TILE_DOT_PRECISION = "ieee"
    if args.k_columns:
        from flexprefill_hf.ops.selection import scores_triton

        scores_triton._K_ROWS = False
    config = FlexPrefillConfig(gamma=0.9, tau=0.1)
    for n in args.seq:
        q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            select_blocks(q, k, config, 1 / math.sqrt(128), **backends)
        torch.cuda.synchronize()
        if args.host:
            host_profile(q, k, config, backends, args.iters, args.rows)
            continue
        if args.time:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                select_blocks(q, k, config, 1 / math.sqrt(128), **backends)
            end.record()
            torch.cuda.synchronize()
            print(f"n={n}: select_blocks {start.elapsed_time(end) / args.iters:.3f} ms per call "
                  f"(32/8 heads, d 128, bf16, eager, {args.iters} calls{', all torch' if args.torch else ''}"
                  f"{', stages ' + args.stages if args.stages else ''}"
                  f"{f', split from {args.split_from}' if args.split_from is not None else ''}"
                  f"{', scratch diagonals' if args.scratch else ''}"
                  f"{f', estimate rows {args.estimate_rows}' if args.estimate_rows is not None else ''}"
                  f"{', estimate ieee' if args.estimate_ieee else ''}{', key tiles as columns' if args.k_columns else ''}"
                  f"{', no graphs' if args.no_graphs else ''})")
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=args.shapes) as prof:
            for _ in range(5):
                select_blocks(q, k, config, 1 / math.sqrt(128), **backends)
            torch.cuda.synchronize()
        print(f"=== n={n} (5 calls{', all torch' if args.torch else ''})")
        print(prof.key_averages(group_by_input_shape=args.shapes).table(
            sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60,
            max_shapes_column_width=80))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
