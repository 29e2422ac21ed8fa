"""Needle in a haystack: a long filler text with one hidden 7-digit number, and a strict score of the answer.

Used by ``examples/needle.py`` and ``tests/test_embedded_model.py``. A prompt is built in two steps:

    user_text = build_haystack(tokenizer, 4096, depth=0.5, number=8051742) + "\\n\\n" + QUESTION
    input_ids = encode_chat(tokenizer, user_text)                    # [1, N] int64, on the CPU

The encoding and the teacher-forced arithmetic are the evaluation suite's (``tasks.common.encode_prompt`` /
``encode_target``, ``scoring.teacher_forced_logits_scores``), so this prompt is one of its prompts with an
empty answer prefix.

Free generation is a weak test of a sparse prefill: decoding is dense and can read the needle back from a
damaged cache. :func:`strict_score` therefore places the correct answer in the prompt and reads, in one
forward pass over prompt + answer (teacher forcing), the log-probability of its digits and how many of them
are the model's top choice.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Tuple

import torch

from .scoring import teacher_forced_logits_scores
from .tasks.common import encode_prompt, encode_target

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
    """About ``length`` tokens of filler sentences with the needle sentence at ``depth`` (0 = start, 1 = end).

    Args:
        tokenizer: a Hugging Face tokenizer; only used to count tokens.
        length: tokens of filler, at least; the text ends after the sentence that reaches it (>= 1).
        depth: where the needle goes, as a fraction of the sentences, in [0, 1].
        number: the secret number written into the needle sentence.
        seed: seeds the choice of filler sentences; the same arguments give the same text.

    Returns:
        The text (a str). The question is not included: ``build_haystack(...) + "\\n\\n" + QUESTION`` is the
        user's message.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length={length!r} is not supported; expected an int >= 1")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} is not supported; expected a number with 0 <= depth <= 1")
    rng = random.Random(seed)
    sentences, n_tokens = [], 0
    while n_tokens < length:
        sentence = rng.choice(FILLER)
        sentences.append(sentence)
        n_tokens += len(tokenizer(" " + sentence, add_special_tokens=False).input_ids)
    sentences.insert(round(depth * len(sentences)), NEEDLE.format(number=number))
    return " ".join(sentences)


def encode_chat(tokenizer, user_text: str) -> torch.Tensor:
    """The input ids of a one-turn chat that ends in the assistant's turn: ``encode_prompt`` with no answer prefix
    (the tokenizer's chat template with the generation prompt; without a template ``"{user_text}\\n"``).

    Returns:
        input_ids [1, N] int64 on the CPU.
    """
    return torch.tensor([encode_prompt(tokenizer, user_text, "")])


@contextlib.contextmanager
def layer_progress(model, desc: str) -> Iterator[None]:
    """A tqdm bar that advances once per decoder layer (``model.model.layers``) while forward passes run.

    A long prefill on the CPU takes minutes; this shows it moving. The bar and its forward hooks are removed
    on exit.
    """
    from tqdm import tqdm

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


@torch.no_grad()
def strict_score(model, tokenizer, user_text: str, number: int, desc: str = "strict score") -> Tuple[float, float]:
    """Teacher-forced score of the correct answer, in one forward pass over prompt + answer.

    Args:
        model: a causal LM (its current attention, FlexPrefill or dense, is what is scored).
        tokenizer: its tokenizer.
        user_text: the user's message, e.g. ``build_haystack(...) + "\\n\\n" + QUESTION``.
        number: the needle's number; the answer scored is ``ANSWER.format(number=number)``.
        desc: the label of the progress bar.

    Returns:
        (log_prob, accuracy): the sum of the log-probabilities of the answer's digit tokens (<= 0, in nats),
        and the fraction of those tokens that are the model's top prediction (in [0, 1]).
    """
    prompt = encode_prompt(tokenizer, user_text, "")
    answer = encode_target(tokenizer, ANSWER.format(number=number))
    ids = torch.tensor([prompt + answer], device=model.device)  # [1, N + n_answer]
    with layer_progress(model, desc):
        logits = model(ids, use_cache=False, logits_to_keep=len(answer) + 1).logits[:, :-1]  # [1, n_answer, V]
    # Only the digits are scored (byte-level BPE marks a leading space with "Ġ", SentencePiece with "▁").
    is_digit = [t.strip("Ġ▁ ").isdigit() for t in tokenizer.convert_ids_to_tokens(answer)]
    score = teacher_forced_logits_scores(logits, ids[:, -len(answer) :], torch.tensor([is_digit], device=ids.device))[0]
    return score.mean_log_prob * score.tokens, score.top1
