"""Time to first token of a transformers model: FlexPrefill against SDPA, side by side (GPU).

    python benchmarks/bench_model.py --seq 32768 65536 131072 --layers 4

The model is the real Llama-3.1-8B architecture (config written out here: nothing is downloaded) with
random weights, truncated to ``--layers`` decoder layers, in bf16. Random weights give diffuse
attention, so the sparsity FlexPrefill finds here is a floor, not what a trained model shows.
"""

from __future__ import annotations

import argparse
import json
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


def time_to_first_token(model, input_ids, repeats: int) -> float:
    """Median ms of one prefill forward (logits of the last position only) with a fresh cache."""
    times = []
    for _ in range(repeats + 1):  # the first call compiles and autotunes
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama31_8b_config(args.layers)).to("cuda", torch.bfloat16).eval()
    env = dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=transformers.__version__, layers=args.layers, gamma=args.gamma)
    print(json.dumps(env), flush=True)
    rows = []
    for n in args.seq:
        input_ids = torch.randint(0, 128256, (1, n), device="cuda")
        flexprefill_hf.unpatch_model(model)
        sdpa_ms = time_to_first_token(model, input_ids, args.repeats)
        flexprefill_hf.patch_model(model, gamma=args.gamma)
        with flexprefill_hf.record_stats(model):
            ours_ms = time_to_first_token(model, input_ids, args.repeats)
            stats = [s for s in flexprefill_hf.last_stats(model) if s is not None]
        fraction = sum(float(s.computed_fraction.mean()) for s in stats) / max(len(stats), 1)
        row = dict(n=n, sdpa_ms=sdpa_ms, flexprefill_ms=ours_ms, speedup=sdpa_ms / ours_ms, fraction=fraction)
        rows.append(row)
        print(json.dumps(row), flush=True)
    flexprefill_hf.unpatch_model(model)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    print("| N | SDPA ms | FlexPrefill ms | speed-up | computed fraction |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['sdpa_ms']:.1f} | {r['flexprefill_ms']:.1f} | {r['speedup']:.2f}x | {r['fraction']:.3f} |")


if __name__ == "__main__":
    main()
