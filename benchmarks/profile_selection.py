"""Where the selection's time goes: a torch.profiler table of select_blocks at a few lengths (GPU).

After ``pip install -e .``:

    python benchmarks/profile_selection.py                  # 8K and 128K, default (Triton) path
    python benchmarks/profile_selection.py --seq 32768 --torch   # the all-PyTorch path
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.profiler import ProfilerActivity, profile

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.selection import select_blocks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--torch", action="store_true", help="profile the all-PyTorch path (no Triton kernels)")
    args = parser.parse_args(argv)
    backends = dict(scores_backend="torch", structure_backend="torch") if args.torch else {}
    config = FlexPrefillConfig(gamma=0.9, tau=0.1)
    for n in args.seq:
        q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            select_blocks(q, k, config, 1 / math.sqrt(128), **backends)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                select_blocks(q, k, config, 1 / math.sqrt(128), **backends)
            torch.cuda.synchronize()
        print(f"=== n={n} (5 calls{', all torch' if args.torch else ''})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
