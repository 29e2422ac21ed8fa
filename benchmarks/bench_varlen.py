"""Packed variable-length FlexPrefill against padding the batch, and against one call per sequence (GPU).

    python benchmarks/bench_varlen.py --out varlen.json
    python benchmarks/bench_varlen.py --smoke        # CPU smoke run: tiny shapes, checks only that it runs

Each packing is a list of (q_len, k_len) sequences, Llama-3.1-8B attention shapes ([*, 32, 128] queries,
[*, 8, 128] keys), bf16, ``structured_qkv`` inputs, gamma 0.9 / tau 0.1, ``cuda_dense_below=0`` (so that
every sequence above the dense threshold takes the sparse path, as a serving engine would ask). Per
packing, median ms over ``--repeats`` calls (CUDA events) after warm-up (which includes autotuning):

* ``varlen``: ``flexprefill_attention_varlen`` on the packed tensors (one selection, one kernel launch); on CUDA
  also with the other block means (``varlen.SEGMENT_MEANS_TRITON`` flipped: index_add_ by default), and the
  largest output difference;
* ``padded``: the same sequences left-padded to the longest and run by ``flexprefill_attention`` with
  ``key_start`` -- only for packings of full prefills (q_len == k_len), the only ones a padded batch holds;
  the time of building the padded copies is not counted;
* ``per_sequence``: ``flexprefill_attention`` once per sequence, in a Python loop (what a caller without
  either would do; also the per-sequence routing: short ones and decode rows dense).

It also reports the largest difference between the varlen output and the per-sequence output (expected:
0 for the sparse sequences, dense-backend rounding for the dense ones), and peak memory of each way.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from flexprefill_hf.config import FlexPrefillConfig
from flexprefill_hf.ops.flexprefill import flexprefill_attention
from flexprefill_hf.ops.varlen import flexprefill_attention_varlen
from flexprefill_hf.testing import structured_qkv

try:  # run as a script (benchmarks/ on sys.path) or as a module
    from bench_model import Clock
except ImportError:  # pragma: no cover
    from benchmarks.bench_model import Clock

K = 1024
PACKINGS = {
    "4-prefills-8K-32K": [(32 * K, 32 * K), (24 * K, 24 * K), (16 * K, 16 * K), (8 * K, 8 * K)],
    "1x64K+7x4K": [(64 * K, 64 * K)] + [(4 * K, 4 * K)] * 7,
    "2x32K-same": [(32 * K, 32 * K)] * 2,
    "32K+16-decode-rows": [(32 * K, 32 * K)] + [(1, 8 * K)] * 16,
    "chunked-prefills-on-caches": [(8 * K, 40 * K), (4 * K, 20 * K), (16 * K, 16 * K)],
}
SMOKE = {"smoke-prefills": [(300, 300), (200, 200), (70, 70)], "smoke-decode": [(260, 260), (1, 100), (40, 200)]}


def pack(lengths, q_heads, kv_heads, head_dim, dtype, device):
    """Per-sequence inputs and the packing: (seqs [(q, k, v)], q, k, v packed, cu_q, cu_k)."""
    seqs = []
    for i, (q_len, k_len) in enumerate(lengths):
        q, k, v = structured_qkv(1, k_len, q_heads, kv_heads, head_dim, q_len=q_len, dtype=dtype, device=device,
                                 generator=torch.Generator().manual_seed(i))
        seqs.append((q[0], k[0], v[0]))
    cu_q = torch.tensor([0] + [a for a, _ in lengths], device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + [b for _, b in lengths], device=device).cumsum(0).to(torch.int32)
    return seqs, [torch.cat([s[i] for s in seqs]) for i in range(3)], cu_q, cu_k


def padded_batch(seqs, length):
    """Left-padded [B, length, H, D] copies of full prefills and their key_start."""
    out = []
    for i in range(3):
        t = torch.zeros((len(seqs), length) + seqs[0][i].shape[1:], dtype=seqs[0][i].dtype, device=seqs[0][i].device)
        for b, s in enumerate(seqs):
            t[b, length - s[i].shape[0] :] = s[i]
        out.append(t)
    key_start = torch.tensor([length - s[1].shape[0] for s in seqs], device=seqs[0][0].device)
    return out, key_start


def peak_mib(fn, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@torch.no_grad()
def bench(name, lengths, args, clock, device, dtype) -> dict:
    config = FlexPrefillConfig(gamma=args.gamma, tau=args.tau, cuda_dense_below=0, block_size=args.block_size,
                               min_budget=args.min_budget)
    seqs, (q, k, v), cu_q, cu_k = pack(lengths, args.q_heads, args.kv_heads, args.head_dim, dtype, device)
    max_q, max_k = max(a for a, _ in lengths), max(b for _, b in lengths)
    cuda = device == "cuda"
    row = {"packing": name, "lengths": lengths, "total_q": q.shape[0], "total_k": k.shape[0]}

    def varlen():
        return flexprefill_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, config)

    def per_sequence():
        return [flexprefill_attention(s[0][None], s[1][None], s[2][None], config)[0] for s in seqs]

    row["varlen_ms"] = clock.median_ms(varlen, args.repeats, args.warmup)
    row["varlen_peak_mib"] = peak_mib(varlen, cuda)
    if cuda:  # the block means by index_add_ (varlen.SEGMENT_MEANS_TRITON off), side by side with the default
        import flexprefill_hf.ops.varlen as varlen_module

        default, before = varlen(), varlen_module.SEGMENT_MEANS_TRITON
        varlen_module.SEGMENT_MEANS_TRITON = not before
        try:
            name = "varlen_segment_means_index_add_ms" if before else "varlen_segment_means_triton_ms"
            row[name] = clock.median_ms(varlen, args.repeats, args.warmup)
            row["segment_means_max_abs_diff"] = (varlen().float() - default.float()).abs().max().item()
        finally:
            varlen_module.SEGMENT_MEANS_TRITON = before
    row["per_sequence_ms"] = clock.median_ms(per_sequence, args.repeats, args.warmup)
    row["per_sequence_peak_mib"] = peak_mib(per_sequence, cuda)
    got, want = varlen(), torch.cat(per_sequence())
    row["max_abs_diff_vs_per_sequence"] = (got.float() - want.float()).abs().max().item()
    if all(a == b for a, b in lengths):
        (qp, kp, vp), key_start = padded_batch(seqs, max_k)

        def padded():
            return flexprefill_attention(qp, kp, vp, config, key_start=key_start)

        row["padded_ms"] = clock.median_ms(padded, args.repeats, args.warmup)
        row["padded_peak_mib"] = peak_mib(padded, cuda)
        del qp, kp, vp
    if args.profile:
        _print_profile(varlen, name, args.profile)
    print(json.dumps(row), flush=True)
    return row


def _print_profile(fn, name: str, rows: int) -> None:
    """The kernels of one call of fn by their GPU time (torch.profiler), the first ``rows`` of them."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"varlen profile of {name}:", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packings", nargs="*", default=None, help=f"names among {list(PACKINGS)} (default all)")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--min-budget", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print the varlen call's top ROWS kernels by GPU time (torch.profiler)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (fp32): checks the script runs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.packings or []) - set(PACKINGS))
    if unknown:
        parser.error(f"unknown packings {unknown}; expected some of {list(PACKINGS)}")
    if args.smoke:
        device, dtype, packings = "cpu", torch.float32, SMOKE
        args.q_heads, args.kv_heads, args.head_dim, args.block_size, args.min_budget = 4, 2, 16, 64, 64
        args.repeats, args.warmup = 1, 0
    else:
        if not torch.cuda.is_available():
            print("bench_varlen needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        device, dtype = "cuda", {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        packings = {n: PACKINGS[n] for n in (args.packings or PACKINGS)}
    clock = Clock(device)
    rows = [bench(name, lengths, args, clock, device, dtype) for name, lengths in packings.items()]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
