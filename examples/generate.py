"""Batch generation from prompts of different lengths, with FlexPrefill as the model's attention.

The tokenizer pads on the left, as ``generate`` needs; FlexPrefill then runs per sequence on its real tokens.
One prompt is a long document (``--long-tokens``) so that the sparse path runs beside short prompts that
stay dense. Progress bars follow the prefill (one step per decoder layer) and then the decoding (one step
per new token): on 2 CPU cores the default run takes a minute or more.

With ``--continuous-batching`` the prompts go unpadded through transformers' continuous batching instead
(``model.generate_batch``, paged KV cache; transformers 5): FlexPrefill then runs on the packed prompts
(``patch_model_for_continuous_batching``, the varlen operator).

    python examples/generate.py
    python examples/generate.py --long-tokens 0 --max-new-tokens 16 "Why is the sky blue?" "Name a prime."
    python examples/generate.py --continuous-batching
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

import flexprefill_hf
from flexprefill_hf.eval.needle import layer_progress

# The examples' shared argument checks (examples/_cli.py: this script's folder is on sys.path).
from _cli import add_model_arguments, int_at_least, load

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
    # .cpu(): with a model split over devices (accelerate) each layer's stats stay where the layer ran
    per_layer = [s.computed_fraction.float().mean(-1).cpu() for s in stats or () if s is not None]  # each [B]
    if not per_layer:
        return [1.0] * batch_size
    return torch.stack(per_layer).mean(0).tolist()


class GenerationProgress(BaseStreamer):
    """Progress of one ``model.generate`` call, passed as its ``streamer``: a bar over the decoder layers
    while the prompt is prefilled, then a bar over the new tokens.

    ``generate`` calls ``put`` once with the prompt ids before the prefill, then once per decoding step with
    the new tokens [B], and ``end`` when it stops.
    """

    def __init__(self, model, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens
        self.prefill = contextlib.ExitStack()
        self.prefill.enter_context(layer_progress(model, "prefill"))
        self.decode = None
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.decode is None:
            self.prefill.close()  # the first new token ends the prefill: its bar and layer hooks go
            self.decode = tqdm(total=self.max_new_tokens, desc="decode", unit="token", leave=False)
        self.decode.update(1)

    def end(self) -> None:
        self.prefill.close()
        if self.decode is not None:
            self.decode.close()


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every value checked before a model loads (argparse exits with status 2 on a bad one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="*", help="prompts (default: three built-in questions)")
    add_model_arguments(parser)
    parser.add_argument("--dense", action="store_true", help="plain SDPA attention, to compare")
    parser.add_argument("--long-tokens", type=int_at_least(0), default=2048,
                        help="length of the extra long prompt (default 2048); 0: none")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=48)
    parser.add_argument("--continuous-batching", action="store_true",
                        help="model.generate_batch (continuous batching, paged KV cache, transformers 5) instead of a "
                             "left-padded batch")
    return parser.parse_args(argv)


def continuous_batching(model, tokenizer, texts: list, args) -> tuple[list, list, str]:
    """(token counts, answers, what ran) of ``texts`` by ``model.generate_batch``: the prompts unpadded, packed
    by transformers into one sequence per step, with a paged cache sized for them."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from flexprefill_hf.integration.continuous_batching import patch_model_for_continuous_batching

    if not hasattr(model, "generate_batch"):
        raise SystemExit("--continuous-batching needs transformers 5 (model.generate_batch); "
                         f"this is transformers {__import__('transformers').__version__}")
    if not args.dense:
        patch_model_for_continuous_batching(model)
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    # A cache of just enough pages: CB's default fills the device's memory, and on a GPU with transformers 5.17
    # its warmup at that size did not finish (benchmarks/RESULTS.md, 2026-12-02 third session).
    defaults = ContinuousBatchingConfig()
    page = getattr(defaults, "page_size", None) or getattr(defaults, "block_size", None) or 256
    pages = sum(-(-(len(i) + args.max_new_tokens) // page) for i in ids) + len(ids)
    cb_config = ContinuousBatchingConfig(num_blocks=pages, max_batch_tokens=max(len(i) for i in ids) + len(ids))
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        outputs = model.generate_batch(ids, generation, continuous_batching_config=cb_config, progress_bar=True)
    answers = [tokenizer.decode(outputs[f"req_{i}"].generated_tokens, skip_special_tokens=True) for i in range(len(ids))]
    return [len(i) for i in ids], answers, f"continuous batching, {pages} pages of {page} tokens"


def main(argv=None) -> None:
    args = parse_args(argv)
    model, tokenizer = load(args)
    if not args.dense and not args.continuous_batching:  # continuous batching patches its own way (below)
        flexprefill_hf.patch_model(model)

    prompts = list(args.prompts or PROMPTS)
    if args.long_tokens > 0:
        prompts.append(long_document(tokenizer, args.long_tokens))
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    if args.continuous_batching:
        start = time.perf_counter()
        lengths, answers, how = continuous_batching(model, tokenizer, texts, args)
        seconds = time.perf_counter() - start
        for prompt, n_tokens, answer in zip(prompts, lengths, answers):
            print(f"[{n_tokens} tokens] {_shown(prompt)!r}\n  -> {answer.strip()!r}\n")
        print(f"{len(prompts)} prompts, {how}, {'dense' if args.dense else 'FlexPrefill'}: {seconds:.1f} s")
        return
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
            streamer=GenerationProgress(model, args.max_new_tokens),
        )
    seconds = time.perf_counter() - start
    answers = tokenizer.batch_decode(output_ids[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    fractions = computed_fractions(None if args.dense else flexprefill_hf.last_stats(model), len(prompts))

    lengths = batch.attention_mask.sum(-1).tolist()
    for prompt, n_tokens, fraction, answer in zip(prompts, lengths, fractions, answers):
        print(f"[{n_tokens} tokens, {fraction:.2f} of the blocks] {_shown(prompt)!r}\n  -> {answer.strip()!r}\n")
    mode = "dense" if args.dense else "FlexPrefill"
    print(f"{len(prompts)} prompts, padded to {batch.input_ids.shape[1]} tokens, {mode}: {seconds:.1f} s")


def _shown(prompt: str) -> str:
    return prompt if len(prompt) <= 80 else prompt[:40] + " ... " + prompt[-35:]


if __name__ == "__main__":
    main()
