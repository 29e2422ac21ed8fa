"""Batch generation from prompts of different lengths, with FlexPrefill as the model's attention.

The tokenizer pads on the left, as ``generate`` needs; FlexPrefill then runs per sequence on its real tokens.
One prompt is a long document (``--long-tokens``) so that the sparse path runs beside short prompts that
stay dense.

    python examples/generate.py
    python examples/generate.py --long-tokens 0 --max-new-tokens 16 "Why is the sky blue?" "Name a prime."
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch

import flexprefill_hf
from flexprefill_hf.models import load_model

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the days are shorter in winter than in summer, for a child of eight.",
)
TOPICS = ("rivers", "bread", "bridges", "trains", "gardens", "clocks", "harbours", "libraries")


def long_document(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """A request to summarize about ``n_tokens`` tokens of notes."""
    rng = random.Random(seed)
    lines, count = [], 0
    while count < n_tokens:
        line = f"Note {len(lines) + 1}: the town's {rng.choice(TOPICS)} were inspected on day {rng.randint(1, 365)}."
        lines.append(line)
        count += len(tokenizer(line + "\n", add_special_tokens=False).input_ids)
    return "\n".join(lines) + "\n\nWhich topics do these notes mention? Answer in one sentence."


def computed_fractions(stats, batch_size: int) -> list:
    """Per sequence, the fraction of attention blocks its prefill computed (mean over layers and heads)."""
    per_layer = [s.computed_fraction.float().mean(-1) for s in stats or () if s is not None]  # each [B]
    if not per_layer:
        return [1.0] * batch_size
    return torch.stack(per_layer).mean(0).tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="*", help="prompts (default: three built-in questions)")
    parser.add_argument("--model", default=None, help="Hugging Face id or folder; default: embedded SmolLM2-135M")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--dense", action="store_true", help="plain SDPA attention, to compare")
    parser.add_argument("--long-tokens", type=int, default=2048, help="length of the extra long prompt; 0: none")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    if not args.dense:
        flexprefill_hf.patch_model(model)

    prompts = list(args.prompts or PROMPTS)
    if args.long_tokens > 0:
        prompts.append(long_document(tokenizer, args.long_tokens))
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(model.device)

    recording = contextlib.nullcontext() if args.dense else flexprefill_hf.record_stats(model)
    start = time.perf_counter()
    with torch.no_grad(), recording:
        output_ids = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - start
    answers = tokenizer.batch_decode(output_ids[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    fractions = computed_fractions(None if args.dense else flexprefill_hf.last_stats(model), len(prompts))

    lengths = batch.attention_mask.sum(-1).tolist()
    for prompt, n_tokens, fraction, answer in zip(prompts, lengths, fractions, answers):
        shown = prompt if len(prompt) <= 80 else prompt[:40] + " ... " + prompt[-35:]
        print(f"[{n_tokens} tokens, {fraction:.2f} of the blocks] {shown!r}\n  -> {answer.strip()!r}\n")
    mode = "dense" if args.dense else "FlexPrefill"
    print(f"{len(prompts)} prompts, padded to {batch.input_ids.shape[1]} tokens, {mode}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
