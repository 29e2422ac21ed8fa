"""Decode and dense-routed prefill: a patched model against transformers' ``sdpa``, side by side (GPU).

    python benchmarks/bench_decode.py --layers 4 32 --cache 1024 8192 32768 --out decode.json

Issue 9, target 1: a patched model's decode step within 3 % of ``sdpa``'s, and a prompt routed dense within 2 %
of the best dense backend. For each layer count the real Llama-3.1-8B architecture (config written out in
``bench_model.py``: nothing is downloaded) is built with random weights in bf16 directly on the GPU, then:

* decode: one prompt fills a cache of C tokens (with sdpa); each implementation then decodes ``--steps``
  tokens from that same cache (cropped back to C before each run), in alternating rounds; ms per token is the
  CUDA-event time of a round over its steps, median over rounds, after ``--warmup`` steps;
* prefill: time to first token of a prompt of N < ``cuda_dense_below`` tokens (routed dense) for both;
* operator: one attention call, ``flexprefill_attention`` on [1, N, 32, 128] / [1, N, 8, 128] against each
  dense backend of ``ops/backends.py`` called directly (the best is the bar), and a decode-shaped call
  (q_len 1 on a C-token cache) against transformers' own ``sdpa_attention_forward``.

* with ``--sparse N...``: the block-sparse forward, flash-attn-4 against the Triton kernel on one random
  structure (``--density``), at lengths with and without a partial block (what the end-aligned grid costs FA4).

Random weights are fine here: decode and dense prefill do not depend on the attention pattern.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time

import torch
import transformers

import flexprefill_hf
from flexprefill_hf.ops import backends

try:  # run as a script (benchmarks/ on sys.path) or as a module
    from bench_model import Clock, build_model
except ImportError:  # pragma: no cover
    from benchmarks.bench_model import Clock, build_model

def set_implementation(model, name: str) -> None:
    if name == "sdpa":
        flexprefill_hf.unpatch_model(model)
    else:
        flexprefill_hf.patch_model(model)


@torch.no_grad()
def decode_ms_per_token(model, cache, cache_len: int, steps: int, warmup: int, clock: Clock) -> float:
    """ms per decoded token from ``cache`` (cropped back to ``cache_len`` tokens first)."""
    token = torch.randint(0, model.config.vocab_size, (1, 1), device=model.device)

    def crop():  # crop(-n) removes n tokens in every transformers 5 release (a positive length is refused in 5.24)
        extra = cache.get_seq_length() - cache_len
        if extra > 0:
            cache.crop(-extra)

    def run(n):
        crop()
        for _ in range(n):
            model(token, past_key_values=cache, use_cache=True)

    run(warmup)
    crop()
    started = clock.start()
    for _ in range(steps):
        model(token, past_key_values=cache, use_cache=True)
    return clock.stop(started) / steps


@torch.no_grad()
def bench_decode(model, layers: int, caches, steps: int, warmup: int, rounds: int, clock: Clock) -> list[dict]:
    rows = []
    for cache_len in caches:
        flexprefill_hf.unpatch_model(model)
        prompt = torch.randint(0, model.config.vocab_size, (1, cache_len), device=model.device)
        cache = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
        times = {"sdpa": [], "flexprefill": []}
        for _ in range(rounds):
            for name in times:
                set_implementation(model, name)
                times[name].append(decode_ms_per_token(model, cache, cache_len, steps, warmup, clock))
        flexprefill_hf.unpatch_model(model)
        sdpa_ms, ours_ms = (statistics.median(times[n]) for n in ("sdpa", "flexprefill"))
        row = dict(layers=layers, cache=cache_len, sdpa_ms_per_token=sdpa_ms, flexprefill_ms_per_token=ours_ms,
                   ratio=ours_ms / sdpa_ms, sdpa_rounds=times["sdpa"], flexprefill_rounds=times["flexprefill"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del cache
    return rows


@torch.no_grad()
def bench_prefill(model, layers: int, lengths, repeats: int, clock: Clock) -> list[dict]:
    rows = []
    for n in lengths:
        prompt = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
        ms = {}
        for name in ("sdpa", "flexprefill"):
            set_implementation(model, name)
            ms[name] = clock.median_ms(lambda: model(prompt, use_cache=True, logits_to_keep=1), repeats)
        dense = None
        with flexprefill_hf.record_stats(model):
            model(prompt, use_cache=True, logits_to_keep=1)
            stats = [s for s in flexprefill_hf.last_stats(model) or [] if s is not None]
            dense = all(s.dense for s in stats) if stats else None
        flexprefill_hf.unpatch_model(model)
        row = dict(layers=layers, n=n, sdpa_ms=ms["sdpa"], flexprefill_ms=ms["flexprefill"],
                   ratio=ms["flexprefill"] / ms["sdpa"], routed_dense=dense)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def bench_operator(lengths, caches, repeats: int, clock: Clock, shape) -> list[dict]:
    """One attention call of the 8B shape: the operator against each dense backend, and decode against HF's sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = []
    q_heads, kv_heads, head_dim, device, dtype = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def qkv(q_len, k_len):
        q = torch.randn(1, q_len, q_heads, head_dim, device=device, generator=gen, dtype=dtype)
        k = torch.randn(1, k_len, kv_heads, head_dim, device=device, generator=gen, dtype=dtype)
        return q, k, torch.randn_like(k)

    scale = head_dim**-0.5
    for n in lengths:
        q, k, v = qkv(n, n)
        calls = {"flexprefill": lambda: flexprefill_hf.flexprefill_attention(q, k, v, softmax_scale=scale)}
        for name in ("fa4", "sdpa_cudnn", "sdpa"):
            if name == "fa4" and backends.choose_dense_backend(q, k, None) != "fa4":
                continue
            calls[name] = functools.partial(backends.dense_attention, q, k, v, scale, None, backend=name)
        # Interleaved rounds (one backend after the other, 5 times): the GPU clock drifts between blocks of calls.
        # "ms": each call between synchronised events, so host time before its first launch counts; "queued_ms":
        # calls queued back to back and one synchronisation, the way a model's layers run (host work overlaps).
        ms, queued = {name: [] for name in calls}, {name: [] for name in calls}
        for _ in range(5):
            for name, call in calls.items():
                ms[name].append(clock.median_ms(call, repeats))
                queued[name].append(clock.queued_ms(call, repeats))
        ms = {name: statistics.median(m) for name, m in ms.items()}
        queued = {name: statistics.median(m) for name, m in queued.items()}
        best = min((m, name) for name, m in ms.items() if name != "flexprefill")
        best_queued = min(m for name, m in queued.items() if name != "flexprefill")
        row = dict(kind="prefill_op", n=n, chosen=backends.choose_dense_backend(q, k, None), best=best[1],
                   ratio=ms["flexprefill"] / best[0], ratio_queued=queued["flexprefill"] / best_queued,
                   **{f"{k_}_ms": m for k_, m in ms.items()}, **{f"{k_}_queued_ms": m for k_, m in queued.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)

    class Module:  # what sdpa_attention_forward reads off the attention module
        num_key_value_groups = q_heads // kv_heads
        is_causal = True
        training = False

    for c in caches:
        q, k, v = qkv(1, c)
        qh, kh, vh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        hf = clock.median_ms(lambda: sdpa_attention_forward(Module(), qh, kh, vh, None, scaling=scale), repeats)
        ours = clock.median_ms(
            lambda: flexprefill_hf.flexprefill_attention(
                qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), softmax_scale=scale
            ),
            repeats,
        )
        row = dict(kind="decode_op", cache=c, hf_sdpa_ms=hf, flexprefill_ms=ours, ratio=ours / hf,
                   chosen=backends.choose_dense_backend(q, k, None))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def bench_sparse_kernels(lengths, density: float, repeats: int, clock: Clock, shape) -> list[dict]:
    """The block-sparse forward on one random structure per length: flash-attn-4 against the Triton kernel.

    Lengths that are not multiples of 128 take the adapter's sliced path (extra pieces and an LSE merge): timing
    one next to a multiple of 128 says what the end-aligned grid costs FA4. The ms per computed block pair
    compares lengths; ``max_diff`` is the largest difference between the two kernels' outputs.
    """
    from flexprefill_hf.ops.attention import block_sparse_fa4
    from flexprefill_hf.ops.attention.block_sparse_triton import block_sparse_attention_triton
    from flexprefill_hf.ops.block_structure import block_mask_to_structure
    from flexprefill_hf.ops.grid import BlockGrid

    q_heads, kv_heads, head_dim, device, dtype = shape
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16  # what the kernels take
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for n in lengths:
        q = torch.randn(1, n, q_heads, head_dim, device=device, generator=gen, dtype=dtype)
        k = torch.randn(1, n, kv_heads, head_dim, device=device, generator=gen, dtype=dtype)
        v = torch.randn_like(k)
        grid = BlockGrid(n, n, 128)
        i = torch.arange(grid.num_query_blocks, device=device)[:, None] + grid.first_query_block
        j = torch.arange(grid.num_blocks, device=device)[None, :]
        mask = torch.rand(1, q_heads, grid.num_query_blocks, grid.num_blocks, device=device, generator=gen) < density
        structure = block_mask_to_structure(((mask | (j == 0) | (j == i)) & (j <= i)), grid)
        pairs = int(structure.counts.sum())
        ok, reason = block_sparse_fa4.supports(q, k, structure)
        ms = {"triton": clock.median_ms(lambda: block_sparse_attention_triton(q, k, v, structure), repeats)}
        row = dict(kind="sparse_kernel", n=n, aligned=block_sparse_fa4.Fa4Split.of(grid).aligned, pairs=pairs,
                   fa4=reason)
        if ok:
            fa4_call = block_sparse_fa4.block_sparse_attention_fa4
            ms["fa4"] = clock.median_ms(lambda: fa4_call(q, k, v, structure), repeats)
            diff = block_sparse_fa4.block_sparse_attention_fa4(q, k, v, structure) - block_sparse_attention_triton(
                q, k, v, structure)
            row.update(max_diff=float(diff.abs().max()), triton_over_fa4=ms["triton"] / ms["fa4"])
        row.update({f"{name}_ms": m for name, m in ms.items()})
        row.update({f"{name}_us_per_pair": 1e3 * m / pairs for name, m in ms.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--cache", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--prefill", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sparse", type=int, nargs="*", default=[],
                        help="also time the block-sparse kernels (FA4 vs Triton) at these lengths, e.g. 32768 32731")
    parser.add_argument("--density", type=float, default=0.2, help="block density of --sparse's structures")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu (with --tiny) only checks that the script runs")
    parser.add_argument("--tiny", action="store_true", help="a small model and operator shape (smoke run)")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    env = dict(date=time.strftime("%Y-%m-%d %H:%M"), gpu=torch.cuda.get_device_name() if on_gpu else "cpu",
               torch=torch.__version__, transformers=transformers.__version__,
               fa4=backends.fa4_available() if on_gpu else False, tiny=args.tiny)
    print(json.dumps(env), flush=True)
    clock = Clock(args.device)
    shape = (4, 2, 64, args.device, torch.float32) if args.tiny else (32, 8, 128, args.device, torch.bfloat16)
    results = dict(env=env, decode=[], prefill=[], operator=[], sparse=[])
    results["operator"] = bench_operator(args.prefill, args.cache, args.repeats, clock, shape)
    if args.sparse:
        results["sparse"] = bench_sparse_kernels(args.sparse, args.density, args.repeats, clock, shape)
    for layers in args.layers:
        model = build_model(layers, args.device, args.tiny)
        results["decode"] += bench_decode(model, layers, args.cache, args.steps, args.warmup, args.rounds, clock)
        results["prefill"] += bench_prefill(model, layers, args.prefill, max(3, args.repeats // 3), clock)
        del model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        if args.out:  # keep what is done if a later layer count runs out of time
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| layers | cache | sdpa ms/token | flexprefill ms/token | ratio |\n|---|---|---|---|---|")
    for r in results["decode"]:
        print(f"| {r['layers']} | {r['cache']} | {r['sdpa_ms_per_token']:.2f} | {r['flexprefill_ms_per_token']:.2f} "
              f"| {r['ratio']:.3f} |")
    print("\n| layers | prompt | sdpa ms | flexprefill ms | ratio | routed dense |\n|---|---|---|---|---|---|")
    for r in results["prefill"]:
        print(f"| {r['layers']} | {r['n']} | {r['sdpa_ms']:.1f} | {r['flexprefill_ms']:.1f} | {r['ratio']:.3f} "
              f"| {r['routed_dense']} |")
    print("\n| operator call | flexprefill ms | bar (ms) | ratio | backend chosen |\n|---|---|---|---|---|")
    for r in results["operator"]:
        if r["kind"] == "prefill_op":
            print(f"| prefill N={r['n']} | {r['flexprefill_ms']:.3f} | {r['best']} {r[r['best'] + '_ms']:.3f} "
                  f"| {r['ratio']:.3f} | {r['chosen']} |")
        else:
            print(f"| decode cache={r['cache']} | {r['flexprefill_ms']:.4f} | hf sdpa {r['hf_sdpa_ms']:.4f} "
                  f"| {r['ratio']:.3f} | {r['chosen']} |")
    if results["sparse"]:
        print("\n| N | aligned | pairs | Triton ms | FA4 ms | Triton/FA4 | FA4 us/pair | max diff |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["sparse"]:
            nan = float("nan")
            print(f"| {r['n']} | {r['aligned']} | {r['pairs']} | {r['triton_ms']:.3f} | {r.get('fa4_ms', nan):.3f} "
                  f"| {r.get('triton_over_fa4', nan):.3f} | {r.get('fa4_us_per_pair', nan):.4f} "
                  f"| {r.get('max_diff', nan):.2e} |")


if __name__ == "__main__":
    main()
