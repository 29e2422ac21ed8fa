"""The short tables of a ``gpu_session.sh perf`` run, and the ``cuda_dense_below`` rule derived from them.

    python benchmarks/perf_summary.py --decode decode.json --attention attention.json

Reads what ``bench_decode.py`` and ``bench_attention.py`` wrote (either may be missing or partial: a piece cut
by its time limit) and prints, per issue-9 target, the measured ratio next to its bar:

* decode (target 1): flexprefill ms/token over sdpa's, per layer count and cache (bar: <= 1.03);
* dense-routed prefill (target 1): the operator over the best dense backend called directly (bar: <= 1.02);
* kernel (target 2): FA4 sparse TFLOP/s on computed pairs over cuDNN's dense TFLOP/s (bar: >= 1.0 at d 128);
* total (target 5): best dense ms over the operator's ms (bars: >= 1.0 structured and clustered, >= 0.97 random,
  >= 1.2 at 8K and >= 3.5 at 128K clustered);
* the rule: ``cuda_dense_below`` = the smallest measured N from which on (at that N and every larger measured N)
  the forced-sparse operator is at least as fast as the best dense backend on BOTH structured and clustered input
  at the measured gamma. Lengths between two measured ones are not known: the rule can only name a measured N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional


def load(path: Optional[str]):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def dense_below_rule(rows: list[dict], inputs=("structured", "clustered")) -> tuple[Optional[int], str]:
    """(N, explanation): the smallest measured N with the sparse operator >= best dense at it and above.

    rows: bench_attention rows (n, inputs, total_ms, best_dense_ms). Uses every gamma / head dim given: pass
    the rows of one configuration. N is None when no measured length qualifies, or nothing was measured.
    """
    lengths = sorted({r["n"] for r in rows if r["inputs"] in inputs and "best_dense_ms" in r})
    if not lengths:
        return None, "no structured/clustered rows with a dense timing"

    def wins(n):
        cases = [r for r in rows if r["n"] == n and r["inputs"] in inputs and "best_dense_ms" in r]
        present = {r["inputs"] for r in cases}
        return present == set(inputs) and all(r["total_ms"] <= r["best_dense_ms"] for r in cases)

    answer = None
    for n in reversed(lengths):  # walk down while every length from here on wins
        if not wins(n):
            break
        answer = n
    if answer is None:
        return None, f"FlexPrefill is slower than the best dense backend at the longest measured N={lengths[-1]}"
    below = [n for n in lengths if n < answer]
    note = f"; at N={below[-1]} dense is faster, so the crossover lies in ({below[-1]}, {answer}]" if below else (
        "; the shortest measured length already wins: the crossover lies below it (measure shorter lengths)")
    return answer, f"cuda_dense_below = {answer}: sparse >= best dense on {' and '.join(inputs)} from {answer} on{note}"


def summary(decode, attention) -> list[str]:
    out = []
    if decode:
        rows = [[r["layers"], r["cache"], r["sdpa_ms_per_token"], r["flexprefill_ms_per_token"], r["ratio"],
                 r["ratio"] <= 1.03] for r in decode.get("decode", [])]
        out += ["decode (bar <= 1.03)"] + table(["layers", "cache", "sdpa ms/tok", "ours ms/tok", "ratio", "ok"], rows)
        rows = [[r["layers"], r["n"], r["sdpa_ms"], r["flexprefill_ms"], r["ratio"], r["routed_dense"]]
                for r in decode.get("prefill", [])]
        out += ["", "model prefill routed dense (vs transformers sdpa)"] + table(
            ["layers", "N", "sdpa ms", "ours ms", "ratio", "dense"], rows)
        rows = []
        for r in decode.get("operator", []):
            if r["kind"] == "prefill_op":
                queued = r.get("ratio_queued")  # logs from 2026-12-02 (third session) on
                rows.append([f"prefill {r['n']}", r["flexprefill_ms"], f"{r['best']} {fmt(r[r['best'] + '_ms'])}",
                             r["ratio"], "-" if queued is None else queued, r["ratio"] <= 1.02, r["chosen"]])
            else:
                rows.append([f"decode {r['cache']}", r["flexprefill_ms"], f"hf {fmt(r['hf_sdpa_ms'])}", r["ratio"],
                             "-", r["ratio"] <= 1.03, r["chosen"]])
        out += ["", "operator call (prefill bar <= 1.02 vs best dense; decode <= 1.03 vs hf sdpa; queued: calls back to "
                "back, one sync)"] + table(["call", "ours ms", "bar ms", "ratio", "queued ratio", "ok", "backend"], rows)
    if attention:
        rows = attention.get("rows", [])
        body = []
        for r in rows:
            kernel_vs_cudnn = None
            if "fa4_sparse_tflops" in r and "cudnn_tflops" in r:
                kernel_vs_cudnn = r["fa4_sparse_tflops"] / r["cudnn_tflops"]
            body.append([r["n"], r["inputs"], r.get("cudnn_ms"), r.get("fa4_dense_ms"), r.get("select_ms"),
                         r.get("kernel_ms"), r.get("fa4_sparse_ms"), r.get("total_ms"), r.get("sparse_backend"),
                         r.get("fraction"), kernel_vs_cudnn, r.get("speedup_vs_best_dense"), r.get("rel_err")])
        out += ["", "attention (ms; speed-up = best dense / operator; fa4/cudnn = TFLOP/s on computed pairs)"]
        out += table(["N", "input", "cudnn", "fa4 dense", "select", "triton", "fa4 sparse", "total", "backend",
                      "fraction", "fa4/cudnn", "speed-up", "rel err"], body)
        for gamma in sorted({r["gamma"] for r in rows}):
            for d in sorted({r["head_dim"] for r in rows}):
                chosen = [r for r in rows if r["gamma"] == gamma and r["head_dim"] == d]
                n, text = dense_below_rule(chosen)
                out += ["", f"rule (gamma {gamma}, d {d}): {text}"]
                random = [r for r in chosen if r["inputs"] == "random" and "speedup_vs_best_dense" in r]
                if random:
                    worst = min(random, key=lambda r: r["speedup_vs_best_dense"])
                    out.append(f"random input: worst speed-up {worst['speedup_vs_best_dense']:.3f} at N={worst['n']} "
                               f"(bar >= 0.97)")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode", default=None, help="bench_decode.py --out file")
    parser.add_argument("--attention", default=None, help="bench_attention.py --out file")
    args = parser.parse_args(argv)
    decode, attention = load(args.decode), load(args.attention)
    if decode is None and attention is None:
        print("perf_summary: neither file exists (both pieces failed before writing?)")
        return
    print("\n".join(summary(decode, attention)))


if __name__ == "__main__":
    main()
