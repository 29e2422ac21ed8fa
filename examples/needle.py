"""Needle in a haystack: dense attention and FlexPrefill side by side on one long prompt.

A 7-digit number is hidden at a chosen depth of a long filler text and the model is asked for it. For each
of dense (SDPA) and FlexPrefill this prints the greedy answer, the prefill time, the fraction of attention
blocks FlexPrefill computed, and a strict score.

Free generation is a weak test of a sparse prefill: decoding is dense and can read the needle back from a
damaged cache. The strict score therefore places the correct answer in the prompt and reads, in one forward
pass over prompt + answer (teacher forcing), the log-probability of its digits and how many of them are the
model's top choice. The prompt builder and the score are ``flexprefill_hf.eval.needle``.

    python examples/needle.py                          # the embedded SmolLM2-135M, 3072 tokens, depth 0.5
    python examples/needle.py --length 8000 --depth 0.1 0.9
    python examples/needle.py --model Qwen/Qwen2-7B-Instruct --device cuda --length 32000
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch
from transformers import DynamicCache

import flexprefill_hf
from flexprefill_hf.eval.needle import QUESTION, build_haystack, encode_chat, layer_progress, strict_score
from flexprefill_hf.models import cache_kwarg

# The examples' shared argument checks (examples/_cli.py: this script's folder is on sys.path).
from _cli import add_model_arguments, config_float, config_overrides, float_between, int_at_least, load


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_and_generate(model, tokenizer, prompt_ids, max_new_tokens: int, desc: str, sparse: bool):
    """Timed prefill (statistics recorded when sparse), then greedy decoding. Returns (answer, seconds, stats)."""
    recording = flexprefill_hf.record_stats(model) if sparse else contextlib.nullcontext()
    cache = {cache_kwarg(model): DynamicCache()}
    synchronize(prompt_ids.device)
    start = time.perf_counter()
    with recording, layer_progress(model, desc):
        logits = model(prompt_ids, use_cache=True, logits_to_keep=1, **cache).logits
    synchronize(prompt_ids.device)
    seconds = time.perf_counter() - start
    stats = flexprefill_hf.last_stats(model) if sparse else None

    eos = tokenizer.eos_token_id
    token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    generated = []
    for _ in range(max_new_tokens):
        if token.item() == eos:
            break
        generated.append(token.item())
        # The cache is filled in place; decoding one token at a time is dense attention.
        logits = model(token, use_cache=True, **cache).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    return tokenizer.decode(generated, skip_special_tokens=True).strip(), seconds, stats


def summarize(stats) -> str:
    """Mean computed fraction over layers and heads (1 where a layer ran dense), and query-aware heads."""
    layers = list(stats or ())
    sparse = [s for s in layers if s is not None and not s.dense]
    if not sparse:
        return "1.00 (ran dense: the prompt is under the preset's thresholds)"
    fractions = [1.0 if s is None else s.computed_fraction.float().mean().item() for s in layers]
    query_aware = sum(int(s.query_aware.sum()) for s in sparse)
    heads = sum(s.query_aware.numel() for s in sparse)
    return f"{sum(fractions) / len(fractions):.2f} of the blocks, {query_aware}/{heads} heads query-aware"


def run(model, tokenizer, user_text: str, number: int, max_new_tokens: int, mode: str) -> dict:
    prompt_ids = encode_chat(tokenizer, user_text).to(model.device)
    answer, seconds, stats = prefill_and_generate(
        model, tokenizer, prompt_ids, max_new_tokens, desc=f"{mode} prefill", sparse=mode != "dense"
    )
    log_prob, accuracy = strict_score(model, tokenizer, user_text, number, desc=f"{mode} strict score")
    return {
        "answer": answer,
        "prefill_s": seconds,
        "computed": summarize(stats) if mode != "dense" else "all (SDPA)",
        "log_prob": log_prob,
        "accuracy": accuracy,
    }


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every value checked before a model loads (argparse exits with status 2 on a bad
    one). ``args.overrides`` holds the FlexPrefillConfig fields given (gamma, tau)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int_at_least(1), default=3072, help="haystack tokens (default 3072)")
    parser.add_argument("--depth", type=float_between("depth", 0.0, 1.0), nargs="+", default=[0.5],
                        help="needle depths in [0, 1] (default 0.5)")
    add_model_arguments(parser)
    parser.add_argument("--gamma", type=config_float("gamma"), default=None, help="override the preset's coverage")
    parser.add_argument("--tau", type=config_float("tau"), default=None, help="override the preset's JS threshold")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.overrides = config_overrides(parser, args, ("gamma", "tau"))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = load(args)
    print(f"loaded {args.model or 'SmolLM2-135M-Instruct'} in {time.perf_counter() - start:.1f} s")

    rng = random.Random(args.seed)
    for depth in args.depth:
        number = rng.randint(1_000_000, 9_999_999)
        user_text = build_haystack(tokenizer, args.length, depth, number, seed=args.seed) + "\n\n" + QUESTION
        n_tokens = encode_chat(tokenizer, user_text).shape[1]
        print(f"\nneedle {number} at depth {depth:.2f} of a {n_tokens}-token prompt")
        results = {"dense": run(model, tokenizer, user_text, number, args.max_new_tokens, "dense")}
        flexprefill_hf.patch_model(model, **args.overrides)
        results["flexprefill"] = run(model, tokenizer, user_text, number, args.max_new_tokens, "flexprefill")
        flexprefill_hf.unpatch_model(model)

        print(f"{'':12} {'prefill':>9} {'log p(answer)':>14} {'digits right':>13}  blocks computed")
        for mode, r in results.items():
            print(f"{mode:12} {r['prefill_s']:7.1f} s {r['log_prob']:14.2f} {r['accuracy']:13.2f}  {r['computed']}")
        for mode, r in results.items():
            print(f"{mode:12} answers {r['answer']!r}")
    if model.device.type == "cpu":
        print(
            "\nOn the CPU FlexPrefill runs a plain PyTorch block-sparse path, slower than SDPA: it shows what is "
            "computed, not the speed-up, which needs the GPU kernels (--device cuda)."
        )


if __name__ == "__main__":
    main()
