"""Needle in a haystack: dense attention and FlexPrefill side by side on one long prompt.

A 7-digit number is hidden at a chosen depth of a long filler text and the model is asked for it. For each
of dense (SDPA) and FlexPrefill this prints the greedy answer, the prefill time, the fraction of attention
blocks FlexPrefill computed, and a strict score.

Free generation is a weak test of a sparse prefill: decoding is dense and can read the needle back from a
damaged cache. The strict score therefore places the correct answer in the prompt and reads, in one forward
pass over prompt + answer (teacher forcing), the log-probability of its digits and how many of them are the
model's top choice.

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
from tqdm import tqdm
from transformers import DynamicCache

import flexprefill_hf
from flexprefill_hf.models import cache_kwarg, load_model

FILLER = (
    "The morning train left the station a few minutes late because of the fog.",
    "Most of the passengers read newspapers or looked out at the grey fields.",
    "A farmer was repairing a fence near the river, where the water ran high after the rain.",
    "In the village the bakery opened at six, and the smell of bread filled the square.",
    "The library kept old maps of the region in a cabinet that nobody had opened for years.",
    "Children walked to school in small groups, talking about the football match of the weekend.",
    "The museum announced a new exhibition of paintings by local artists from the last century.",
    "At noon the market was crowded with people buying apples, cheese and fresh fish.",
    "The old bridge had been rebuilt twice, once after a flood and once after a storm.",
    "A cat slept on the warm stones of the wall, ignoring the pigeons nearby.",
    "The teacher explained how clouds form when warm air rises and cools.",
    "In the afternoon the wind turned, and the boats in the harbour swung on their ropes.",
    "The town council discussed the budget for new street lights and a larger car park.",
    "A cyclist stopped at the fountain to fill her bottle before climbing the hill.",
    "The hotel on the corner had twelve rooms, each named after a mountain in the Alps.",
    "Tourists took photographs of the clock tower, which still rang every quarter hour.",
    "The chemist closed early on Wednesdays, a custom nobody could explain.",
    "Along the canal, tall poplars cast long shadows over the towpath.",
    "The evening news reported light rain for the next three days.",
    "A small orchestra rehearsed in the church hall for the concert on Sunday.",
    "The gardener planted tulips along the path and covered the roses against the frost.",
    "Near the forest a family of deer crossed the road just before sunset.",
    "The restaurant by the lake served trout, potatoes and a salad of wild herbs.",
    "At night the lights of the distant city made the clouds glow orange.",
)
NEEDLE = "The secret number is {number}."
QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
ANSWER = "The secret number is {number}."


def build_haystack(tokenizer, length: int, depth: float, number: int, seed: int = 0) -> str:
    """About ``length`` tokens of filler sentences, the needle sentence at ``depth`` (0 = start, 1 = end).

    The question is not included: ``build_haystack(...) + "\n\n" + QUESTION`` is the user's message.
    """
    rng = random.Random(seed)
    sentences, n_tokens = [], 0
    while n_tokens < length:
        sentence = rng.choice(FILLER)
        sentences.append(sentence)
        n_tokens += len(tokenizer(" " + sentence, add_special_tokens=False).input_ids)
    sentences.insert(round(depth * len(sentences)), NEEDLE.format(number=number))
    return " ".join(sentences)


def encode_chat(tokenizer, user_text: str, answer: str = "") -> torch.Tensor:
    """input ids [1, N] of a one-turn chat ending in the assistant's turn, with ``answer`` already in it."""
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    else:
        prompt = f"{user_text}\nAnswer:"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if answer:
        answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([ids, answer_ids], dim=1)
    return ids


@contextlib.contextmanager
def layer_progress(model, desc: str):
    """A progress bar that advances once per decoder layer while a forward pass runs."""
    layers = model.model.layers
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)

    def advance(*_):
        bar.update(1)

    hooks = [layer.register_forward_hook(advance) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


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


@torch.no_grad()
def strict_score(model, tokenizer, user_text: str, number: int, desc: str):
    """Teacher-forced score of the correct answer, in one forward pass over prompt + answer.

    Returns (sum of the log-probabilities of the answer's digit tokens, fraction of them that are the top
    prediction).
    """
    prompt_ids = encode_chat(tokenizer, user_text)
    full_ids = encode_chat(tokenizer, user_text, ANSWER.format(number=number)).to(model.device)
    n_answer = full_ids.shape[1] - prompt_ids.shape[1]
    with layer_progress(model, desc):
        logits = model(full_ids, use_cache=False, logits_to_keep=n_answer + 1).logits[0, :-1]  # [n_answer, V]
    targets = full_ids[0, -n_answer:]  # [n_answer]
    answer_tokens = tokenizer.convert_ids_to_tokens(targets.tolist())
    is_digit = torch.tensor([t.strip("Ġ▁ ").isdigit() for t in answer_tokens], device=targets.device)
    log_probs = logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]  # [n_answer]
    correct = logits.argmax(-1) == targets
    return log_probs[is_digit].sum().item(), correct[is_digit].float().mean().item()


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=3072, help="haystack tokens (default 3072)")
    parser.add_argument("--depth", type=float, nargs="+", default=[0.5], help="needle depths in [0, 1]")
    parser.add_argument("--model", default=None, help="Hugging Face id or folder; default: embedded SmolLM2-135M")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--gamma", type=float, default=None, help="override the preset's coverage")
    parser.add_argument("--tau", type=float, default=None, help="override the preset's JS threshold")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    print(f"loaded {args.model or 'SmolLM2-135M-Instruct'} in {time.perf_counter() - start:.1f} s")
    overrides = {k: v for k, v in (("gamma", args.gamma), ("tau", args.tau)) if v is not None}

    rng = random.Random(args.seed)
    for depth in args.depth:
        number = rng.randint(1_000_000, 9_999_999)
        user_text = build_haystack(tokenizer, args.length, depth, number, seed=args.seed) + "\n\n" + QUESTION
        n_tokens = encode_chat(tokenizer, user_text).shape[1]
        print(f"\nneedle {number} at depth {depth:.2f} of a {n_tokens}-token prompt")
        results = {"dense": run(model, tokenizer, user_text, number, args.max_new_tokens, "dense")}
        flexprefill_hf.patch_model(model, **overrides)
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
