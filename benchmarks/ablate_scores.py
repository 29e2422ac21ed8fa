"""Where the representative scores pass (``ops/selection/scores_triton.py``) spends its time, by ablation (GPU).

A stripped copy of the pass's loop -- no padding, no cache, no packed keys, every representative row real, the
row log-sum-exps taken as given -- with parts switched on one at a time: the probabilities and their row sums
(what the LSE pass does), + the column sums (a_v), + the diagonals by a ``tl.gather`` rotation (a_s, the
production design); and variants of the last: rotation indices recomputed per tile, the rows in two halves,
K through a TMA descriptor, the transposed tile (keys x rows), other stages/warps/programs. Times are
``triton.testing.do_bench`` medians of one launch, 32 q / 8 kv heads, d 128, bf16; the production pass is timed
alongside (its three launches). The transposed variant is checked against the row variant's sums.

    python benchmarks/ablate_scores.py                  # 8K and 128K (~1 min on an H200)
    python benchmarks/ablate_scores.py --seq 131072

Results: benchmarks/RESULTS.md, 2026-12-02 fifth session (logs 2026-12-02e_h200_scores_ablation_*.log).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from flexprefill_hf.ops.grid import BlockGrid
from flexprefill_hf.ops.selection import scores_triton

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 128


@triton.jit
def _head(num_heads, num_kv_groups, tiles_per_program, num_tiles):
    """(sequence x head) row, sequence, head, KV head, and this program's key tiles [t_lo, t_hi)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    off_h = pid_bh % num_heads
    t_hi = tl.minimum((pid_s + 1) * tiles_per_program, num_tiles)
    return pid_bh, pid_bh // num_heads, off_h, off_h // num_kv_groups, pid_s * tiles_per_program, t_hi


@triton.jit
def _rows_kernel(Q, K, Lse, Vertical, Diagonal, KDesc,
                 stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                 num_heads, num_kv_groups, n, num_tiles, tiles_per_program, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, HALVES: tl.constexpr,
                 ROT_IN_LOOP: tl.constexpr, TMA: tl.constexpr):
    """Tile = representative rows x keys. MODE 0: row sums only; 1: + column sums; 2: + gather diagonals."""
    WIDTH: tl.constexpr = 2 * BLOCK
    HALF: tl.constexpr = BLOCK // HALVES
    pid_bh, off_b, off_h, off_kvh, t_lo, t_hi = _head(num_heads, num_kv_groups, tiles_per_program, num_tiles)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    for half in tl.static_range(HALVES):
        offs_r = half * HALF + tl.arange(0, HALF)
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + (n - BLOCK + offs_r)[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd)
        pos = n - BLOCK + offs_r
        lse2 = tl.load(Lse + pid_bh * BLOCK + offs_r)
        rotate = (offs_n[None, :] + offs_r[:, None]) % BLOCK
        wraps = offs_n[None, :] + offs_r[:, None] >= BLOCK
        for t in range(t_lo, t_hi):
            keys = t * BLOCK + offs_n
            if TMA:
                k = KDesc.load([(off_b * n + t * BLOCK).to(tl.int32), (off_kvh * HEAD_DIM).to(tl.int32)])
                qk = tl.dot(q, tl.trans(k)) * qk_scale
            else:
                kt = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + offs_d[:, None] * stride_kd
                             + keys[None, :] * stride_kn, mask=(keys < n)[None, :], other=0.0)
                qk = tl.dot(q, kt) * qk_scale
            p = tl.math.exp2(tl.where(keys[None, :] <= pos[:, None], qk, float("-inf")) - lse2[:, None])
            vertical = Vertical + pid_bh * n + keys
            diagonal = Diagonal + (pid_bh * num_tiles + t) * WIDTH
            if MODE == 0:
                tl.store(Vertical + pid_bh * n + t * BLOCK + offs_r, tl.sum(p, 1), mask=t * BLOCK + offs_r < n)
            elif HALVES == 1:
                tl.store(vertical, tl.sum(p, 0), mask=keys < n)
            else:
                tl.atomic_add(vertical, tl.sum(p, 0), mask=keys < n, sem="relaxed")
            if MODE == 2:
                if ROT_IN_LOOP:
                    rotate = (offs_n[None, :] + offs_r[:, None]) % BLOCK
                    wraps = offs_n[None, :] + offs_r[:, None] >= BLOCK
                rotated = tl.gather(p, rotate, 1)
                above, below = tl.sum(tl.where(wraps, rotated, 0.0), 0), tl.sum(tl.where(wraps, 0.0, rotated), 0)
                if HALVES == 1:
                    tl.store(diagonal + offs_n, above)
                    tl.store(diagonal + BLOCK + offs_n, below)
                else:
                    tl.atomic_add(diagonal + offs_n, above, sem="relaxed")
                    tl.atomic_add(diagonal + BLOCK + offs_n, below, sem="relaxed")


@triton.jit
def _transposed_kernel(Q, K, Lse, Vertical, Diagonal,
                       stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                       num_heads, num_kv_groups, n, num_tiles, tiles_per_program, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """Tile = keys x representative rows: column sums along rows (in-warp); MODE 2 adds diagonals by a gather along
    the keys. Same outputs and layout as _rows_kernel."""
    WIDTH: tl.constexpr = 2 * BLOCK
    pid_bh, off_b, off_h, off_kvh, t_lo, t_hi = _head(num_heads, num_kv_groups, tiles_per_program, num_tiles)
    offs_n = tl.arange(0, BLOCK)
    offs_r = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    qt = tl.load(Q + off_b * stride_qb + off_h * stride_qh + (n - BLOCK + offs_r)[None, :] * stride_qm
                 + offs_d[:, None] * stride_qd)
    pos = n - BLOCK + offs_r
    lse2 = tl.load(Lse + pid_bh * BLOCK + offs_r)
    for t in range(t_lo, t_hi):
        keys = t * BLOCK + offs_n
        k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(keys < n)[:, None], other=0.0)
        qk = tl.dot(k, qt) * qk_scale  # [BN, BR]
        p = tl.math.exp2(tl.where(keys[:, None] <= pos[None, :], qk, float("-inf")) - lse2[None, :])
        tl.store(Vertical + pid_bh * n + keys, tl.sum(p, 1), mask=keys < n)
        if MODE == 2:
            diagonal = Diagonal + (pid_bh * num_tiles + t) * WIDTH
            wraps = offs_n[:, None] + offs_r[None, :] >= BLOCK
            rotated = tl.gather(p, (offs_n[:, None] + offs_r[None, :]) % BLOCK, 0)
            tl.store(diagonal + offs_n, tl.sum(tl.where(wraps, rotated, 0.0), 1))
            tl.store(diagonal + BLOCK + offs_n, tl.sum(tl.where(wraps, 0.0, rotated), 1))


def _case(n):
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    num_tiles = triton.cdiv(n, BLOCK)
    return q, k, num_tiles


def _launch(kernel, n, splits=None, warps=8, stages=3, **meta):
    """(ms, vertical, diagonal) of one ablation kernel; splits: programs per head (default as production)."""
    q, k, num_tiles = _case(n)
    splits = splits or triton.cdiv(1024, HEADS)
    per = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, per)
    lse = torch.zeros(HEADS, BLOCK, device="cuda")  # stand-in row log-sum-exps: the cost does not depend on them
    vertical = torch.zeros(HEADS, n, device="cuda")
    diagonal = torch.zeros(HEADS, num_tiles, 2 * BLOCK, device="cuda")
    extra = {}
    if kernel is _rows_kernel:
        desc = None
        if meta.get("TMA"):
            from triton.tools.tensor_descriptor import TensorDescriptor

            desc = TensorDescriptor.from_tensor(k.view(n, KV_HEADS * HEAD_DIM), [BLOCK, HEAD_DIM])
        extra = dict(KDesc=desc)
        meta = dict(dict(HALVES=1, ROT_IN_LOOP=False, TMA=False), **meta)

    def run():
        kernel[(HEADS, splits)](q, k, lse, vertical, diagonal, *extra.values(), *q.stride(), *k.stride(), HEADS,
                                HEADS // KV_HEADS, n, num_tiles, per, 0.088, HEAD_DIM=HEAD_DIM, BLOCK=BLOCK,
                                num_warps=warps, num_stages=stages, **meta)

    run()
    return triton.testing.do_bench(run, warmup=25, rep=100), vertical.clone(), diagonal.clone()


def _production(n):
    q, k, _ = _case(n)
    grid = BlockGrid(n, n, BLOCK)
    return triton.testing.do_bench(lambda: scores_triton.representative_scores_triton(q, k, grid, HEAD_DIM ** -0.5, None),
                                   warmup=25, rep=100)


VARIANTS = [
    ("probabilities and their row sums", _rows_kernel, dict(MODE=0)),
    ("+ column sums", _rows_kernel, dict(MODE=1)),
    ("+ diagonals by tl.gather (production design)", _rows_kernel, dict(MODE=2)),
    ("  rotation indices per tile", _rows_kernel, dict(MODE=2, ROT_IN_LOOP=True)),
    ("  rows in two halves: column sums", _rows_kernel, dict(MODE=1, HALVES=2)),
    ("  rows in two halves: with diagonals", _rows_kernel, dict(MODE=2, HALVES=2)),
    ("  2 pipeline stages", _rows_kernel, dict(MODE=2, stages=2)),
    ("  1 pipeline stage", _rows_kernel, dict(MODE=2, stages=1)),
    ("  4 warps", _rows_kernel, dict(MODE=2, warps=4)),
    ("  K by TMA: row sums", _rows_kernel, dict(MODE=0, TMA=True)),
    ("  K by TMA: column sums", _rows_kernel, dict(MODE=1, TMA=True)),
    ("  K by TMA: with diagonals", _rows_kernel, dict(MODE=2, TMA=True)),
    ("  twice the programs per head", _rows_kernel, dict(MODE=2, splits=64)),
    ("  four times the programs per head", _rows_kernel, dict(MODE=2, splits=128)),
    ("transposed tile: column sums", _transposed_kernel, dict(MODE=1)),
    ("transposed tile: with diagonals", _transposed_kernel, dict(MODE=2)),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 131072])
    args = parser.parse_args(argv)
    table = []
    for n in args.seq:
        table.append((n, "production pass (3 launches, padding/cache support)", _production(n), ""))
        reference = None
        for name, kernel, meta in VARIANTS:
            meta = dict(meta)
            opts = {key: meta.pop(key) for key in ("splits", "warps", "stages") if key in meta}
            try:
                ms, vertical, diagonal = _launch(kernel, n, **opts, **meta)
            except Exception as error:  # a variant that does not compile is a result too
                table.append((n, name, float("nan"), f"failed: {type(error).__name__}: {str(error)[:60]}"))
                continue
            note = ""
            if name.startswith("+ diagonals"):
                reference = (vertical, diagonal)
            elif kernel is _transposed_kernel and meta["MODE"] == 2 and reference is not None:
                rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip((vertical, diagonal), reference)]
                note = f"vs the row tile: vertical {rel[0]:.1e}, diagonal {rel[1]:.1e} relative"
            table.append((n, name, ms, note))
            print(table[-1], flush=True)
    print("\n| N | variant | ms | note |\n|---|---|---|---|")
    for n, name, ms, note in table:
        print(f"| {n} | {name} | {ms:.4f} | {note} |")


if __name__ == "__main__":
    main()
