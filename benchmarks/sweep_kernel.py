"""Sweep the sparse kernel's variants on a GPU: tile configs x K/V loads (pointers or tensor descriptors) x
block-index prefetch, each checked against the first variant and timed against SDPA-cuDNN in the same run.

    python benchmarks/sweep_kernel.py --seq 32768 131072 --out sweep.json

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

from check_kernel_gpu import generate_structure  # benchmarks/ is on the path when run as a script
from flexprefill_hf.ops import block_sparse_attention as bsa
from flexprefill_hf.ops.grid import BlockGrid

CONFIGS = [
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 4),
]


def bench(fn, rep=150) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median")


def run_variant(q, k, v, structure, variant):
    if variant == "autotuned":
        return lambda: bsa._block_sparse_attention_fwd(q, k, v, structure, None, None, False)
    (bm, bn, w, s), tma, pf = variant
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    return lambda: bsa._block_sparse_attention_fwd(q, k, v, structure, None, None, False, config, tma, pf)


def name_of(variant):
    if variant == "autotuned":
        return "autotuned"
    (bm, bn, w, s), tma, pf = variant
    return f"{bm}x{bn} w{w} s{s} {'tma' if tma else 'ptr'}{' pf' if pf else ''}"


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
        structure, pairs = generate_structure(heads, grid, density, "cuda")
        baseline = None
        for variant in variants:
            row = dict(seq=n, head_dim=head_dim, dtype=str(dtype).split(".")[-1], density=density,
                       variant=name_of(variant), cudnn_tflops=round(cudnn_tflops, 1))
            try:
                out = run_variant(q, k, v, structure, variant)()[0]
                if baseline is None:
                    baseline = out
                    if density >= 1.0:
                        row["err_vs_cudnn"] = (out.float() - ref_dense.float()).abs().max().item()
                row["max_diff_vs_first"] = (out.float() - baseline.float()).abs().max().item()
                ms = bench(run_variant(q, k, v, structure, variant))
                row.update(ms=round(ms, 3), tflops=round(4 * head_dim * pairs / ms * 1e-9, 1))
                row["vs_cudnn"] = round(row["tflops"] / cudnn_tflops, 3)
                if variant == "autotuned":
                    row["config"] = str(bsa._block_sparse_attention_fwd_tuned.best_config)
            except Exception as err:  # a variant that does not compile: report it and go on
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)


def report_matrix_instructions() -> None:
    """Whether each compiled variant's PTX uses Hopper's warpgroup MMA (wgmma) or only mma.sync."""
    try:
        for cache in bsa._block_sparse_attention_fwd_kernel.device_caches.values():
            for key, compiled in cache[0].items():
                ptx = compiled.asm.get("ptx", "")
                print(f"wgmma={ptx.count('wgmma.mma_async')} mma.sync={ptx.count('mma.sync')} "
                      f"tma={ptx.count('cp.async.bulk.tensor')} regs={compiled.n_regs} spills={compiled.n_spills} "
                      f"smem={compiled.metadata.shared}", flush=True)
    except Exception as err:  # introspection differs between triton versions: informative only
        print(f"could not read the compiled kernels: {type(err).__name__}: {err}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--tma", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--configs", type=int, nargs="+", default=None, help="indices into CONFIGS")
    parser.add_argument("--more", action="store_true", help="stage 2: head_dim 64 and fp16 with the best variants")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)

    rows = []
    configs = CONFIGS if args.configs is None else [CONFIGS[i] for i in args.configs]
    variants = [
        (c, bool(t), bool(p)) for c in configs for t in args.tma for p in args.prefetch
    ] + ["autotuned"]
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

    report_matrix_instructions()
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
