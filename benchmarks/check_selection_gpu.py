"""Check and time select_blocks on a GPU: the default path (Triton) against the all-PyTorch path.

For each --seq length (bf16, 32 query / 8 KV heads, head_dim 128, Llama-3.1-8B's shape):
  1. equality: the structure (as a bool block mask) and query_aware of the default path equal the
     all-torch path (scores_backend="torch", structure_backend="torch"), on structured and random
     inputs, a left-padded batch of 2 and a prefill on a cache; a mismatch is then attributed by
     rerunning with Triton scores and the torch structure (the structure kernel must match exactly;
     the fused scores may round differently from PyTorch's);
  2. latency: median of triton.testing.do_bench for both paths, and the replay of a CUDA graph
     holding one call (the time without launch overhead);
  3. no host synchronisation: one default call under torch.cuda.set_sync_debug_mode("error").
A table comes last; with $OUT set, the results also go to $OUT/check_selection_gpu.json.

After ``pip install -e .`` (from the repository root; on an offline machine add
``--no-deps --no-build-isolation``):

    python benchmarks/check_selection_gpu.py               # 8K, 32K, 128K (~1-2 min on an H200)
    python benchmarks/check_selection_gpu.py --seq 524288  # 512K
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.block_structure import structure_to_block_mask
from flexprefill_hf.ops.selection import select_blocks
from flexprefill_hf.testing import structured_qkv

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TORCH = dict(scores_backend="torch", structure_backend="torch")
SCALE = 1 / math.sqrt(HEAD_DIM)


def make_inputs(kind: str, n: int, seed: int, device="cuda"):
    """(q, k, key_start) of one case: 'structured', 'random', 'padded' (batch 2) or 'cache' (q_len = n / 4)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "random":
        q = torch.randn(1, n, Q_HEADS, HEAD_DIM, device=device, generator=g).bfloat16()
        k = torch.randn(1, n, KV_HEADS, HEAD_DIM, device=device, generator=g).bfloat16()
        return q, k, None
    batch = 2 if kind == "padded" else 1
    q_len = n // 4 + 7 if kind == "cache" else None
    q, k, _ = structured_qkv(
        batch, n, Q_HEADS, KV_HEADS, HEAD_DIM, q_len=q_len, dtype=torch.bfloat16, device=device, generator=g
    )
    key_start = torch.tensor([0, n // 3 + 5], device=device) if kind == "padded" else None
    return q, k, key_start


def differing_blocks(a, b) -> int:
    return int((structure_to_block_mask(a.structure) != structure_to_block_mask(b.structure)).sum())


def check_equal(q, k, key_start, config) -> dict:
    default = select_blocks(q, k, config, SCALE, key_start)
    plain = select_blocks(q, k, config, SCALE, key_start, **TORCH)
    result = {
        "blocks_differ": differing_blocks(default, plain),
        "query_aware_differ": int((default.query_aware != plain.query_aware).sum()),
        "query_aware_heads": int(default.query_aware.sum()),
        "density": float(default.structure.counts.sum() / default.causal_blocks.sum() / q.shape[2]),
    }
    # Same scores, torch structure: isolates the structure kernel, which must agree exactly.
    same_scores = select_blocks(q, k, config, SCALE, key_start, structure_backend="torch")
    result["structure_kernel_exact"] = bool(
        torch.equal(default.structure.indices, same_scores.structure.indices)
        and torch.equal(default.structure.counts, same_scores.structure.counts)
    )
    result["exact"] = result["blocks_differ"] == 0 and result["query_aware_differ"] == 0
    return result


def graph_replay_ms(fn, q, k, fresh) -> tuple[float, bool]:
    """Median replay time of a CUDA graph holding fn(q, k); also whether a replay on fresh q, k is right."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(q, k)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(q, k)
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")
    q.copy_(fresh[0]), k.copy_(fresh[1])
    graph.replay()
    want = fn(q, k)
    right = torch.equal(captured.structure.indices, want.structure.indices)
    del graph
    return ms, right


def time_case(q, k, config) -> dict:
    import triton.testing

    default = lambda q, k: select_blocks(q, k, config, SCALE)  # noqa: E731
    plain = lambda q, k: select_blocks(q, k, config, SCALE, **TORCH)  # noqa: E731
    out = {
        "default_ms": triton.testing.do_bench(lambda: default(q, k), warmup=25, rep=100, return_mode="median"),
        "torch_ms": triton.testing.do_bench(lambda: plain(q, k), warmup=25, rep=100, return_mode="median"),
    }
    fresh = make_inputs("structured", q.shape[1], seed=99)[:2]
    for name, fn in (("default", default), ("torch", plain)):
        try:
            out[f"{name}_graph_ms"], out[f"{name}_graph_right"] = graph_replay_ms(fn, q.clone(), k.clone(), fresh)
        except RuntimeError as err:  # report, keep going: capture is what this measures
            out[f"{name}_graph_ms"], out[f"{name}_graph_error"] = float("nan"), str(err)[:200]
    return out


def check_no_sync(q, k, key_start, config) -> str:
    select_blocks(q, k, config, SCALE, key_start)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        select_blocks(q, k, config, SCALE, key_start)
        return "ok"
    except RuntimeError as err:
        return f"FAILED: {str(err)[:200]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def print_table(results: list[dict]) -> None:
    print()
    print(f"{'n':>7} {'inputs':>10} {'exact':>6} {'kernel':>6} {'diff':>6} {'qa':>4} {'dens':>5}"
          f" {'torch ms':>9} {'new ms':>8} {'x':>5} {'graph torch':>11} {'graph new':>9}")
    for r in results:
        timing = ""
        if "default_ms" in r:
            timing = (f" {r['torch_ms']:9.3f} {r['default_ms']:8.3f} {r['torch_ms'] / r['default_ms']:5.2f}"
                      f" {r['torch_graph_ms']:11.3f} {r['default_graph_ms']:9.3f}")
        print(f"{r['n']:>7} {r['inputs']:>10} {str(r['exact']):>6} {str(r['structure_kernel_exact']):>6}"
              f" {r['blocks_differ']:>6} {r['query_aware_heads']:>4} {r['density']:5.3f}{timing}")
    print("exact: default == all-torch (structure and query_aware); kernel: the structure kernel equals the torch "
          "composition on the same scores; diff: differing blocks; qa: query-aware heads; dens: computed fraction")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072], help="key lengths")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--no-timing", action="store_true", help="only the equality and sync checks")
    parser.add_argument("--estimate-rows", type=int, default=None,
                        help="query blocks per program of the §4 estimate (estimate_triton.ROWS_PER_PROGRAM)")
    args = parser.parse_args(argv)
    if args.estimate_rows is not None:
        from flexprefill_hf.ops.selection import estimate_triton

        estimate_triton.ROWS_PER_PROGRAM = args.estimate_rows
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    config = FlexPrefillConfig(gamma=args.gamma, tau=args.tau, cuda_dense_below=0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, gamma {args.gamma}, tau {args.tau}"
          f"{f', estimate rows {args.estimate_rows}' if args.estimate_rows is not None else ''}")
    results, failed = [], False
    for n in args.seq:
        for kind in ("structured", "random", "padded", "cache"):
            q, k, key_start = make_inputs(kind, n, seed=n)
            row = {"n": n, "inputs": kind, **check_equal(q, k, key_start, config)}
            failed |= not row["structure_kernel_exact"]
            if kind == "padded":
                row["sync_check"] = check_no_sync(q, k, key_start, config)
                failed |= row["sync_check"] != "ok"
            if kind in ("structured", "random") and not args.no_timing:
                row.update(time_case(q, k, config))
            print(json.dumps(row), flush=True)
            results.append(row)
            del q, k
            torch.cuda.empty_cache()

    print_table(results)
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "check_selection_gpu.json")
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
