"""Latency against N from bench_attention.py JSON logs: SDPA-cuDNN, SDPA-flash, flash-attn-4, ours (selection + kernel).

    python benchmarks/plot_results.py benchmarks/logs/2026-12-02_h200_attention.json \
        benchmarks/logs/2026-12-02b_h200_attention.json benchmarks/logs/2026-12-02c_h200_attention.json \
        benchmarks/logs/2026-12-02e_h200_attention.json benchmarks/logs/2026-12-03_h200_perf13b_attention.json \
        --inputs structured --out benchmarks/latency.png      # what README.md shows (later files win per N)
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--inputs", default="structured")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--out", default="benchmarks/latency.png")
    args = parser.parse_args(argv)
    rows = {}
    for path in args.logs:  # later files win for the same N
        with open(path) as f:
            for row in json.load(f)["rows"]:
                same_case = row["inputs"] == args.inputs and row["gamma"] == args.gamma and row["head_dim"] == 128
                if same_case and row.get("dtype", "bfloat16") == "bfloat16":
                    rows[row["n"]] = row
    ns = sorted(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [n for n in ns if "cudnn_ms" in rows[n]]  # dense is skipped at the longest N
    ax.plot(dense, [rows[n]["cudnn_ms"] for n in dense], "o-", label="SDPA cuDNN (dense)")
    flash = [n for n in ns if "flash_ms" in rows[n]]
    if flash:  # --no-flash runs skip SDPA's flash backend
        ax.plot(flash, [rows[n]["flash_ms"] for n in flash], "s-", label="SDPA flash (dense)")
    fa4_dense = [n for n in ns if "fa4_dense_ms" in rows[n]]  # logs from 2026-12-01 on (flash-attn-4 installed)
    if fa4_dense:
        ax.plot(fa4_dense, [rows[n]["fa4_dense_ms"] for n in fa4_dense], "D-", label="flash-attn-4 (dense)")
    ax.plot(ns, [rows[n]["total_ms"] for n in ns], "^-", label="FlexPrefill total")
    ax.plot(ns, [rows[n]["kernel_ms"] for n in ns], "v--", label="FlexPrefill sparse kernel (Triton)")
    fa4_sparse = [n for n in ns if "fa4_sparse_ms" in rows[n]]
    if fa4_sparse:
        ax.plot(fa4_sparse, [rows[n]["fa4_sparse_ms"] for n in fa4_sparse], "d--",
                label="FlexPrefill sparse kernel (flash-attn-4)")
    ax.plot(ns, [rows[n]["select_ms"] for n in ns], "x--", label="FlexPrefill selection")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("ms (median, one layer)")
    ax.set_title(f"H200, Llama-3.1-8B attention (32/8 heads, d 128, bf16), {args.inputs} input, gamma {args.gamma}")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(ns)} lengths)")


if __name__ == "__main__":
    main()
