"""Time to first token and per-token decode of a transformers model: FlexPrefill against SDPA, side by side.

    python benchmarks/bench_model.py --seq 32768 65536 131072 --layers 4
    python benchmarks/bench_model.py --device cpu --tiny        # smoke run (a 256-wide model, fp32)

The model is the real Llama-3.1-8B architecture (config written out here: nothing is downloaded) with
random weights, truncated to ``--layers`` decoder layers, in bf16, built directly on the device. Per prompt
length N, for ``sdpa`` and for the patched model in alternating rounds: time to first token (one prefill
forward with a fresh cache, logits of the last position only) and ms per decoded token (``--decode`` greedy-free
steps of one token on that prompt's cache). Random weights give diffuse attention, so the sparsity FlexPrefill
finds here is a floor, not what a trained model shows; decode does not depend on the pattern.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import flexprefill_hf


def llama31_8b_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        attn_implementation="sdpa",
    )


class Clock:
    """Elapsed ms of work on ``device``: CUDA events on a GPU (asynchronous work), perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return started.elapsed_time(end)
        return (time.perf_counter() - started) * 1e3

    def queued_ms(self, fn, calls: int) -> float:
        """ms per call of ``calls`` calls of ``fn()`` queued back to back, then one synchronisation (the host's
        work overlaps the GPU's, as between a model's layers); perf_counter on the CPU."""
        fn()
        started = self.start()
        for _ in range(calls):
            fn()
        return self.stop(started) / calls

    def median_ms(self, fn, repeats: int, warmup: int = 3) -> float:
        """Median ms of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            started = self.start()
            fn()
            times.append(self.stop(started))
        return statistics.median(times)


def build_model(layers: int, device: str, tiny: bool) -> LlamaForCausalLM:
    """Random-weight Llama-3.1-8B architecture with ``layers`` decoder layers, bf16, built on ``device``.

    tiny: a 256-wide, 4-head model for a smoke run on the CPU (fp32 there).
    """
    torch.manual_seed(0)
    config = llama31_8b_config(layers)
    if tiny:
        config.vocab_size, config.hidden_size, config.intermediate_size = 1000, 256, 512
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


@torch.no_grad()
def prefill_and_decode(model, input_ids, decode_steps: int, clock: Clock) -> tuple[float, float]:
    """(ms of the prefill forward, ms per decoded token over ``decode_steps`` steps on its cache)."""
    started = clock.start()
    output = model(input_ids, use_cache=True, logits_to_keep=1)
    ttft = clock.stop(started)
    cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    if decode_steps == 0:
        return ttft, float("nan")
    started = clock.start()
    for _ in range(decode_steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return ttft, clock.stop(started) / decode_steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per implementation (after one warm-up)")
    parser.add_argument("--decode", type=int, default=16, help="decode steps timed after each prefill")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a small model, N 256 and 600 (smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    if args.tiny:
        args.seq = [256, 600]
    clock = Clock(args.device)
    model = build_model(args.layers, args.device, args.tiny)
    env = dict(date=time.strftime("%Y-%m-%d %H:%M"), gpu=torch.cuda.get_device_name() if on_gpu else "cpu",
               torch=torch.__version__, transformers=transformers.__version__, layers=args.layers,
               gamma=args.gamma, tiny=args.tiny)
    print(json.dumps(env), flush=True)
    rows = []
    for n in args.seq:
        input_ids = torch.randint(0, model.config.vocab_size, (1, n), device=model.device)
        times = {"sdpa": [], "flexprefill": []}
        for round_ in range(args.repeats + 1):  # round 0 warms up (Triton autotuning, FA4 JIT)
            for name in times:
                if name == "sdpa":
                    flexprefill_hf.unpatch_model(model)
                else:
                    flexprefill_hf.patch_model(model, gamma=args.gamma)
                measured = prefill_and_decode(model, input_ids, args.decode, clock)
                if round_ > 0:
                    times[name].append(measured)
        with flexprefill_hf.record_stats(model):
            with torch.no_grad():
                model(input_ids, use_cache=True, logits_to_keep=1)
            stats = [s for s in flexprefill_hf.last_stats(model) if s is not None]
        flexprefill_hf.unpatch_model(model)
        fraction = sum(float(s.computed_fraction.float().mean()) for s in stats) / max(len(stats), 1)
        med = {name: [statistics.median(t[i] for t in ts) for i in (0, 1)] for name, ts in times.items()}
        row = dict(n=n, sdpa_ttft_ms=med["sdpa"][0], flexprefill_ttft_ms=med["flexprefill"][0],
                   ttft_speedup=med["sdpa"][0] / med["flexprefill"][0], sdpa_decode_ms=med["sdpa"][1],
                   flexprefill_decode_ms=med["flexprefill"][1], decode_ratio=med["flexprefill"][1] / med["sdpa"][1],
                   fraction=fraction, dense=all(s.dense for s in stats) if stats else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(env=env, rows=rows), f, indent=1)
    print("| N | SDPA TTFT ms | FlexPrefill TTFT ms | TTFT speed-up | SDPA ms/token | FlexPrefill ms/token "
          "| decode ratio | computed fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['sdpa_ttft_ms']:.1f} | {r['flexprefill_ttft_ms']:.1f} | {r['ttft_speedup']:.2f}x "
              f"| {r['sdpa_decode_ms']:.2f} | {r['flexprefill_decode_ms']:.2f} | {r['decode_ratio']:.3f} "
              f"| {r['fraction']:.3f} |")


if __name__ == "__main__":
    main()
