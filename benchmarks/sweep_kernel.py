"""Sweep the sparse kernel's variants on a GPU: tile configs x block-index prefetch (pinned through the public
``tile_config=``), each checked against the first variant and timed against SDPA-cuDNN in the same run.

    python benchmarks/sweep_kernel.py --seq 32768 131072 --out sweep.json    # after pip install -e .

Stage 1 (bf16, head_dim 128) times every variant; stage 2 (``--more``: head_dim 64, fp16) only the best few of
stage 1 and the autotuned default. TFLOP/s count the (query, key) pairs of the computed blocks (diagonal blocks
as half); cuDNN's count the causal triangle. Shape: 32 query heads, 8 KV heads, batch 1, block 128.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexprefill_hf.ops.attention.block_sparse_triton import TileConfig, block_sparse_attention_triton, tuned_tile_config
from flexprefill_hf.ops.block_structure import block_mask_to_structure
from flexprefill_hf.ops.grid import BlockGrid

CONFIGS = [
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 4),
]


def bench(fn, rep=150) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median")


def random_structure(heads: int, grid: BlockGrid, density: float):
    """Batch-1 structure: each causal block kept with probability ``density``, plus the diagonal and block 0.
    Returns (structure, (query, key) pairs computed, diagonal blocks counted as their causal half)."""
    i = torch.arange(grid.first_query_block, grid.num_blocks, device="cuda")[:, None]
    j = torch.arange(grid.num_blocks, device="cuda")[None, :]
    keep = (torch.rand(1, heads, i.shape[0], grid.num_blocks, device="cuda") < density) & (j <= i)
    keep |= (j == i) | (j == 0)
    bs = grid.block_size
    pairs = int(keep.sum()) * bs * bs - heads * i.shape[0] * bs * (bs - 1) // 2
    return block_mask_to_structure(keep, grid), pairs


def run_variant(q, k, v, structure, variant):
    tiles = None if variant == "autotuned" else TileConfig(*variant[0], prefetch_index=variant[1])
    return lambda: block_sparse_attention_triton(q, k, v, structure, tile_config=tiles)


def name_of(variant):
    if variant == "autotuned":
        return "autotuned"
    (bm, bn, w, s), pf = variant
    return f"{bm}x{bn} w{w} s{s}{' pf' if pf else ''}"


def measure(n, head_dim, dtype, variants, rows, densities):
    torch.manual_seed(n + head_dim)
    heads, kv_heads = 32, 8
    q = torch.randn(1, n, heads, head_dim, device="cuda", dtype=dtype)
    # K and V as transformers hands them over: [B, Hkv, N, D] memory seen as [B, N, Hkv, D].
    k = torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
    grid = BlockGrid(n, n, 128)
    causal_pairs = heads * n * (n + 1) // 2
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        cudnn_ms = bench(dense, rep=300 if n <= 32768 else 600)
        ref_dense = dense().transpose(1, 2)
    cudnn_tflops = 4 * head_dim * causal_pairs / cudnn_ms * 1e-9
    for density in densities:
        structure, pairs = random_structure(heads, grid, density)
        baseline = None
        for variant in variants:
            row = dict(seq=n, head_dim=head_dim, dtype=str(dtype).split(".")[-1], density=density,
                       variant=name_of(variant), cudnn_tflops=round(cudnn_tflops, 1))
            try:
                out = run_variant(q, k, v, structure, variant)()
                if baseline is None:
                    baseline = out
                    if density >= 1.0:
                        row["err_vs_cudnn"] = (out.float() - ref_dense.float()).abs().max().item()
                row["max_diff_vs_first"] = (out.float() - baseline.float()).abs().max().item()
                ms = bench(run_variant(q, k, v, structure, variant))
                row.update(ms=round(ms, 3), tflops=round(4 * head_dim * pairs / ms * 1e-9, 1))
                row["vs_cudnn"] = round(row["tflops"] / cudnn_tflops, 3)
                if variant == "autotuned":
                    row["config"] = str(tuned_tile_config())
            except Exception as err:  # a variant that does not compile: report it and go on
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--configs", type=int, nargs="+", default=None, help="indices into CONFIGS")
    parser.add_argument("--more", action="store_true", help="stage 2: head_dim 64 and fp16 with the best variants")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)

    rows = []
    configs = CONFIGS if args.configs is None else [CONFIGS[i] for i in args.configs]
    variants = [(c, bool(p)) for c in configs for p in args.prefetch] + ["autotuned"]
    for n in args.seq:
        densities = [d for d in args.densities if d < 1.0 or n <= 32768]  # dense 128K: too slow to sweep
        measure(n, 128, torch.bfloat16, variants, rows, densities)
    if args.more:
        stage1 = [r for r in rows if "tflops" in r and r["density"] < 1.0 and r["variant"] != "autotuned"]
        by_variant = {}
        for r in stage1:
            by_variant.setdefault(r["variant"], []).append(r["vs_cudnn"])
        best = sorted(by_variant, key=lambda v: -sum(by_variant[v]) / len(by_variant[v]))[:3]
        chosen = [v for v in variants if v != "autotuned" and name_of(v) in best] + ["autotuned"]
        for head_dim, dtype in ((64, torch.bfloat16), (128, torch.float16), (64, torch.float16)):
            for n in args.seq:
                measure(n, head_dim, dtype, chosen, rows, [d for d in args.densities if d < 1.0])

    print("\nseq  d   dtype density variant                      TFLOP/s  vs cuDNN  max diff")
    for r in rows:
        if "tflops" in r:
            print(f"{r['seq']:>6} {r['head_dim']:>3} {r['dtype']:>8} {r['density']:.2f} {r['variant']:<28} "
                  f"{r['tflops']:>7} {r['vs_cudnn']:>8} {r['max_diff_vs_first']:.2e}")
        else:
            print(f"{r['seq']:>6} {r['head_dim']:>3} {r['dtype']:>8} {r['density']:.2f} {r['variant']:<28} {r['error'][:60]}")
    out = args.out or (os.path.join(os.environ["OUT"], "sweep_kernel.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
