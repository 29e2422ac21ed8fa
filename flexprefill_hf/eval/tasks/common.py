"""What every task shares: the sample record, the prompt encoding and the haystack sizing.

A task builds a :class:`Draft` from a random generator and a haystack *size* (sentences, noise units,
words: whatever the task repeats). :func:`fit_sample` then finds, by an exponential then a binary
search, the largest size whose prompt -- the model's chat template around the user text, followed by
the answer prefix -- plus the task's answer budget fits the target length in the model's own tokens.
Each evaluation of a size restarts the generator from the sample's seed, so a size always gives the
same text, and a sample is a pure function of (seed, task, length, index, tokenizer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Callable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Draft:
    """A task instance before sizing.

    user_text: the user's message (instructions, haystack, question).
    answer_prefix: the start of the assistant's reply, written after the chat template (RULER's answer
        prefix, without its leading space).
    answers: the strings the reply must contain (RULER's ``outputs``).
    target: the expected reply after the prefix, starting with a space: what the teacher-forced score reads.
    distractors: strings present in the prompt that are *not* answers (values of other keys, uncommon words).
    """

    user_text: str
    answer_prefix: str
    answers: tuple[str, ...]
    target: str
    distractors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of one task at one length.

    prompt_ids: the exact model input (chat template + answer prefix), token ids.
    target_ids: the tokens of ``draft.target``, appended to ``prompt_ids`` by the teacher-forced score.
    length: the target length; ``len(prompt_ids) + max_new_tokens <= length``.
    size: the haystack size the search settled on.
    metric: "all" (RULER's string_match_all) or "part" (string_match_part).
    """

    task: str
    length: int
    index: int
    seed: int
    draft: Draft
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    max_new_tokens: int
    size: int
    metric: str = "all"

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def answers(self) -> tuple[str, ...]:
        return self.draft.answers

    @property
    def prompt_hash(self) -> str:
        """sha256 (first 16 hex digits) of the prompt's token ids: equal hashes, equal model inputs."""
        data = ",".join(map(str, self.prompt_ids)).encode()
        return hashlib.sha256(data).hexdigest()[:16]


Builder = Callable[[random.Random, int, int], Draft]  # (rng, size, length) -> Draft


def prompt_text(tokenizer, user_text: str, answer_prefix: str) -> str:
    """The model's chat template around ``user_text`` (one user turn, generation prompt), then the prefix.

    A tokenizer without a chat template gets the user text, a newline and the prefix.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_text}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + answer_prefix
    return f"{user_text}\n{answer_prefix}"


def encode_prompt(tokenizer, user_text: str, answer_prefix: str) -> list[int]:
    """Token ids of :func:`prompt_text`. The chat template writes its own special tokens."""
    text = prompt_text(tokenizer, user_text, answer_prefix)
    templated = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not templated).input_ids)


def encode_target(tokenizer, target: str) -> list[int]:
    """Token ids of the expected reply, as they follow the prompt (no special tokens)."""
    return list(tokenizer(target, add_special_tokens=False).input_ids)


def sample_rng(seed: int, task: str, length: int, index: int, part: str = "") -> random.Random:
    """The generator of one sample (str seeds hash deterministically, whatever PYTHONHASHSEED)."""
    return random.Random(f"{seed}/{task}/{length}/{index}/{part}")


def fit_sample(
    tokenizer,
    task: str,
    build: Builder,
    length: int,
    index: int,
    seed: int,
    max_new_tokens: int,
    *,
    min_size: int = 1,
    max_size: Optional[int] = None,
    hint: int = 16,
) -> Sample:
    """The sample of ``task`` whose prompt + ``max_new_tokens`` is as long as possible within ``length``.

    Raises ValueError when even ``min_size`` does not fit, or when ``max_size`` (the most the task's
    material allows) still leaves the prompt more than 5% short of the target.
    """
    cache: dict[int, tuple[Draft, list[int]]] = {}

    def attempt(size: int) -> tuple[Draft, list[int]]:
        if size not in cache:
            draft = build(sample_rng(seed, task, length, index), size, length)
            cache[size] = (draft, encode_prompt(tokenizer, draft.user_text, draft.answer_prefix))
        return cache[size]

    def fits(size: int) -> bool:
        return len(attempt(size)[1]) + max_new_tokens <= length

    if not fits(min_size):
        raise ValueError(
            f"length={length} is too short for task {task!r}: its smallest prompt has "
            f"{len(attempt(min_size)[1])} tokens and the answer budget is {max_new_tokens}"
        )
    low = max(min_size, hint)  # the largest size known to fit, once `fits(low)` holds
    if max_size is not None:
        low = min(low, max_size)
    if not fits(low):
        low, high = min_size, low
    else:
        high = low * 2
        while (max_size is None or high <= max_size) and fits(high):
            low, high = high, high * 2
        if max_size is not None and high > max_size:
            if fits(max_size):
                low = high = max_size
            else:
                high = max_size
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    draft, prompt_ids = attempt(low)
    if max_size is not None and low == max_size and len(prompt_ids) + max_new_tokens < 0.95 * length:
        raise ValueError(
            f"length={length} is too long for task {task!r}: its material runs out at "
            f"{len(prompt_ids) + max_new_tokens} tokens"
        )
    return Sample(
        task=task,
        length=length,
        index=index,
        seed=seed,
        draft=draft,
        prompt_ids=tuple(prompt_ids),
        target_ids=tuple(encode_target(tokenizer, draft.target)),
        max_new_tokens=max_new_tokens,
        size=low,
    )


def insert_at(units: Sequence[str], positions: Sequence[int], inserts: Sequence[str]) -> list[str]:
    """``units`` with ``inserts[i]`` placed before ``units[positions[i]]`` (positions sorted, 0..len)."""
    out, start = [], 0
    for position, item in zip(positions, inserts):
        out.extend(units[start:position])
        out.append(item)
        start = position
    out.extend(units[start:])
    return out


def join_list(items: Sequence[str]) -> str:
    """'a', 'a, and b', 'a, b, and c': how RULER names several keys in one question."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + ", and " + items[-1]
