"""GPU check of the Gluon scores kernel (``ops/selection/scores_gluon.py``) against the Triton one, then both timed.

1. Outputs: Gluon vs Triton (``shared_skew=True/False``) vs the PyTorch oracle (``scores.representative_scores``) on
   edge cases: lengths not a multiple of the block, fewer rows than the block, left padding, a cache in front of the
   queries, skipped sequences, packed keys, GQA, d 64/128, fp16/bf16. Tolerance as tests/test_selection_kernels.py.
2. Selection: ``select_blocks`` with either kernel on structured and random input gives the same blocks.
3. Time (``triton.testing.do_bench``, 32 q / 8 kv heads, d 128, bf16): the scores pass (LSE + scores + slash
   launches) both ways, and the whole selection both ways (eager, back to back), as ratios.

    python benchmarks/check_scores_gluon.py [--seq 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import triton

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.block_structure import structure_to_block_mask
from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.selection import scores_triton, select_blocks
from flexprefill_hf.ops.selection.scores import representative_scores
from flexprefill_hf.ops.selection.scores_triton import representative_scores_triton
from flexprefill_hf.ops.varlen import varlen_key_start
from flexprefill_hf.testing import structured_qkv

CASES = [  # batch, q_len, k_len, hq, hkv, d, key starts, dtype
    (1, 8192, 8192, 8, 2, 128, None, torch.bfloat16),
    (2, 200, 2000, 4, 2, 64, [0, 1300], torch.bfloat16),
    (1, 90, 1337, 8, 2, 128, None, torch.float16),
    (1, 3000, 3000, 4, 1, 128, None, torch.bfloat16),
    (3, 1, 700, 4, 4, 64, [0, 10, 650], torch.float16),
    (1, 129, 129, 2, 1, 128, None, torch.bfloat16),
    (2, 5000, 5000, 6, 3, 64, [0, 4999], torch.float16),
]


def _inputs(batch, q_len, k_len, hq, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = 1.5 * torch.randn(batch, q_len, hq, d, device="cuda", generator=g)
    k = 1.5 * torch.randn(batch, k_len, hkv, d, device="cuda", generator=g)
    return q.to(dtype), k.to(dtype)


def check_outputs():
    rows = []
    for i, (batch, q_len, k_len, hq, hkv, d, starts, dtype) in enumerate(CASES):
        q, k = _inputs(batch, q_len, k_len, hq, hkv, d, dtype, seed=i)
        grid = BlockGrid(q_len, k_len, 128)
        key_start = None if starts is None else torch.tensor(starts, device="cuda")
        s = torch.zeros(batch, dtype=torch.long, device="cuda") if key_start is None else key_start
        key_valid = torch.arange(k_len, device="cuda")[None, :] >= s[:, None]
        scale = 1 / math.sqrt(d)
        want = representative_scores(q, k, grid, scale, key_valid)
        for splits in (None, 5):
            tri = representative_scores_triton(q, k, grid, scale, key_start, splits=splits, shared_skew=False)
            glu = representative_scores_triton(q, k, grid, scale, key_start, splits=splits, shared_skew=True)
            ok = torch.allclose(glu, want, rtol=1e-4, atol=1e-6) and torch.allclose(glu, tri, rtol=1e-4, atol=1e-6)
            rows.append((f"case {i} splits {splits}", ok, (glu - want).abs().max().item(), (tri - want).abs().max().item()))
    # A cache in front of the queries, skipped sequences.
    q, k = _inputs(3, 150, 2600, 8, 2, 128, torch.bfloat16, seed=99)
    grid = BlockGrid(150, 2600, 128)
    key_start = torch.tensor([0, 333, 2100], device="cuda")
    for name, extra in (("query_start", dict(query_start=torch.tensor([2450, 2500, 2480], device="cuda"))),
                        ("skip", dict(skip=torch.tensor([False, True, False], device="cuda")))):
        tri = representative_scores_triton(q, k, grid, 0.09, key_start, splits=4, shared_skew=False, **extra)
        glu = representative_scores_triton(q, k, grid, 0.09, key_start, splits=4, shared_skew=True, **extra)
        rows.append((name, torch.allclose(glu, tri, rtol=1e-4, atol=1e-6), (glu - tri).abs().max().item(), 0.0))
    # Packed keys read in place, against the same keys padded.
    lengths = [(100, 900), (128, 3000), (1, 1)]
    cu = torch.tensor([0, 900, 3900, 3901], dtype=torch.int32, device="cuda")
    q, _ = _inputs(3, 128, 1, 8, 2, 128, torch.bfloat16, seed=5)
    _, kp = _inputs(1, 1, 3901, 8, 2, 128, torch.bfloat16, seed=6)
    kp = kp[0]
    grid = BlockGrid(128, 3000, 128)
    key_start = varlen_key_start(cu, 3000)
    query_start = torch.tensor([3000 - a for a, _ in lengths], device="cuda")
    padded = torch.zeros(3, 3000, 2, 128, dtype=torch.bfloat16, device="cuda")
    for b, (_, n) in enumerate(lengths):
        padded[b, 3000 - n:] = kp[cu[b]:cu[b + 1]]
    tri = representative_scores_triton(q, padded, grid, 0.09, key_start, query_start=query_start, shared_skew=False)
    glu = representative_scores_triton(q, kp, grid, 0.09, key_start, query_start=query_start, cu_seqlens_k=cu,
                                       shared_skew=True)
    rows.append(("packed keys", torch.allclose(glu, tri, rtol=1e-4, atol=1e-6), (glu - tri).abs().max().item(), 0.0))
    print("outputs: case | ok | gluon max|diff| (vs torch, or vs triton) | triton max|diff| vs torch")
    for name, ok, a, b in rows:
        print(f"  {name:24s} {'ok' if ok else 'FAIL'}  {a:.2e}  {b:.2e}")
    return all(ok for _, ok, _, _ in rows)


def _select(q, k, config, shared):
    scores_triton._SHARED_SKEW = shared
    try:
        return select_blocks(q, k, config, q.shape[-1] ** -0.5, None)
    finally:
        scores_triton._SHARED_SKEW = True


def check_selection(seqs):
    config = FlexPrefillConfig(gamma=0.9, tau=0.1)
    ok_all = True
    print("selection: n | input | same blocks | same pattern")
    for n in seqs:
        for kind in ("structured", "random"):
            if kind == "structured":
                q, k, _ = structured_qkv(1, n, 32, 8, 128, dtype=torch.bfloat16, device="cuda",
                                         generator=torch.Generator(device="cuda").manual_seed(n))
            else:
                q, k = _inputs(1, n, n, 32, 8, 128, torch.bfloat16, seed=n)
            a, b = _select(q, k, config, False), _select(q, k, config, True)
            same = [torch.equal(structure_to_block_mask(a.structure), structure_to_block_mask(b.structure))]
            pattern = torch.equal(a.query_aware, b.query_aware)
            ok_all &= all(same) and pattern
            print(f"  {n:7d} {kind:10s} {all(same)} {pattern}")
    return ok_all


def time_all(seqs):
    config = FlexPrefillConfig(gamma=0.9, tau=0.1)
    print("time (ms): n | scores triton | scores gluon | ratio | selection triton | selection gluon | ratio")
    for n in seqs:
        q, k = _inputs(1, n, n, 32, 8, 128, torch.bfloat16, seed=n)
        grid = BlockGrid(128, n, 128)
        q_rep = q[:, -128:]
        t = {}
        for shared in (False, True):
            fn = lambda: representative_scores_triton(q_rep, k, grid, 0.088, None, shared_skew=shared)
            fn()
            t[("scores", shared)] = triton.testing.do_bench(fn, warmup=25, rep=100)
            scores_triton._SHARED_SKEW = shared
            sel = lambda: select_blocks(q, k, config, 0.088, None)
            for _ in range(3):
                sel()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(30):
                sel()
            end.record()
            torch.cuda.synchronize()
            t[("select", shared)] = start.elapsed_time(end) / 30
            scores_triton._SHARED_SKEW = True
        print(f"  {n:7d} {t['scores', False]:.3f} {t['scores', True]:.3f} {t['scores', False] / t['scores', True]:.2f}x"
              f"  {t['select', False]:.3f} {t['select', True]:.3f} {t['select', False] / t['select', True]:.2f}x")


def time_variants(seqs):
    """The Gluon kernel's layout knobs (scores_gluon.ROWS_IN_THREAD, Q_IN_SMEM): the scores pass, ms."""
    from flexprefill_hf.ops.selection import scores_gluon

    print("variants (ms of the scores pass): n | rows-in-thread, q-in-smem = 00 01 10 11")
    for n in seqs:
        q, k = _inputs(1, 128, n, 32, 8, 128, torch.bfloat16, seed=n)
        grid = BlockGrid(128, n, 128)
        times = []
        for rows_in_thread in (False, True):
            for q_in_smem in (False, True):
                scores_gluon.ROWS_IN_THREAD, scores_gluon.Q_IN_SMEM = rows_in_thread, q_in_smem
                fn = lambda: representative_scores_triton(q, k, grid, 0.088, None, shared_skew=True)
                out = fn()
                times.append(triton.testing.do_bench(fn, warmup=25, rep=100))
                ref = representative_scores_triton(q, k, grid, 0.088, None, shared_skew=False)
                assert torch.allclose(out, ref, rtol=1e-4, atol=1e-6), (rows_in_thread, q_in_smem)
        scores_gluon.ROWS_IN_THREAD, scores_gluon.Q_IN_SMEM = True, True
        print(f"  {n:7d} " + " ".join(f"{t:.3f}" for t in times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--skip-checks", action="store_true")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, time.strftime("%F"))
    ok = True
    if not args.skip_checks:
        ok = check_outputs()
        ok &= check_selection(args.seq)
    time_variants(args.seq)
    time_all(args.seq)
    print("ALL OK" if ok else "SOME CHECK FAILED")


if __name__ == "__main__":
    main()
