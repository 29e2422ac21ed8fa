"""Which γ-coverage count is exact on long float32 rows: the Triton threshold search or torch's sort + cumsum?

The selection's §3 rule (fewest largest scores that sum to >= γ) on float32 rows, three ways, on one GPU:

* ``kernel``: ``coverage_triton.coverage_counts_triton`` (sums in float64; rows of ``SPLIT_FROM`` entries or more
  searched by many programs per row), what the default CUDA path runs;
* ``torch32``: ``coverage.coverage_counts`` on the float32 rows (CUDA's cumsum sums float32 in float32);
* ``exact``: ``coverage.coverage_counts`` on the same rows upcast to float64 (float64 arithmetic throughout:
  the float32 values are exact in float64 and the float64 sums err by ~L * 2^-53);
* ``rule32``: torch's float32 rule as the CPU computes it (running sums in float64, rounded to float32, the
  entry subtracted and compared with γ in float32), which the kernel is built to equal. It differs from
  ``exact`` on ~1 long row in 100, where a running sum lands within a float32 ulp of γ.

Rows: the vertical representative scores of ``structured_qkv`` inputs (32 query / 8 KV heads, d 128, bf16,
through the Triton scores kernel) and softmax rows of heavy-tailed random logits, at each --seq length. Each
line gives the rows on which each way differs from ``exact``. Where the default path's selection differs from
the all-PyTorch one (``check_selection_gpu.py``), this tells which of the two follows the rule.

    python benchmarks/check_coverage_gpu.py --seq 8192 32768 131072
"""

from __future__ import annotations

import argparse
import math

import torch

from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.selection import coverage_triton
from flexprefill_hf.ops.selection.coverage import coverage_counts
from flexprefill_hf.ops.selection.scores_triton import representative_scores_triton
from flexprefill_hf.testing import structured_qkv


def rows_of(kind: str, n: int, seed: int) -> torch.Tensor:
    """float32 [rows, n] probability rows on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "scores":
        q, k, _ = structured_qkv(1, n, 32, 8, 128, dtype=torch.bfloat16, device="cuda", generator=g)
        scores = representative_scores_triton(q, k, BlockGrid(n, n, 128), 1 / math.sqrt(128), None)
        return torch.cat([scores[0, 0], scores[1, 0]])  # vertical and slash rows, [64, n]
    logits = torch.randn(64, n, device="cuda", generator=g) * 2.5
    return torch.softmax(logits, -1)


def float32_rule_counts(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``coverage.coverage_counts`` of float32 rows as on the CPU (whose float32 cumsum accumulates in float64)."""
    ordered = torch.sort(x, dim=-1, descending=True, stable=True).values
    before = torch.cumsum(ordered.double(), dim=-1).float() - ordered
    return (before < gamma).sum(-1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.9, 0.95])
    args = parser.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, SPLIT_FROM {coverage_triton.SPLIT_FROM}")
    print(f"{'n':>7} {'rows':>7} {'gamma':>5} {'count':>6} {'kernel != exact':>15} {'torch32 != exact':>16}"
          f" {'rule32 != exact':>15} {'kernel != rule32':>16}")
    for n in args.seq:
        for kind in ("scores", "softmax"):
            x = rows_of(kind, n, seed=n)
            for gamma in args.gamma:
                exact = coverage_counts(x.double(), gamma)
                kernel = coverage_triton.coverage_counts_triton(x, gamma)
                torch32 = coverage_counts(x, gamma)
                rule32 = float32_rule_counts(x, gamma)
                print(f"{n:>7} {kind:>7} {gamma:5.2f} {x.shape[0]:>6} {int((kernel != exact).sum()):>15}"
                      f" {int((torch32 != exact).sum()):>16} {int((rule32 != exact).sum()):>15}"
                      f" {int((kernel != rule32).sum()):>16}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
