"""Common-words extraction (RULER ``cwe``): name the 10 words that occur most often in a numbered list.

``size`` distinct words are drawn; the first 10 are repeated ``common`` times, the rest ``uncommon``
times, shuffled and numbered ("1. lantern 2. brave ..."). RULER's counts: 30 and 3 from 4K tokens
on, 6 and 1 below. A worked example (40 words, counts 10 and 3; below 4K: 20 words, 3 and 1) with its
answer comes first. Words: the package's own lists (``words.py``), then the prose vocabulary of the
essay haystack, so that long lists do not run out.
"""

from __future__ import annotations

import functools
import random

from ..haystack import prose_vocabulary
from ..words import all_words
from .common import Draft

MAX_NEW_TOKENS = 120
NUM_COMMON = 10
SHORT = 4096  # below this target length RULER uses the smaller counts


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Every word the task may use, each once: shipped lists first, then the prose vocabulary."""
    shipped = all_words()
    extra = sorted(set(prose_vocabulary()) - set(shipped))
    return shipped + tuple(extra)


def build(rng: random.Random, size: int, length: int) -> Draft:
    """The prompt with ``size`` distinct words in the list (the first 10 are the common ones)."""
    if length < SHORT:
        example_counts, counts = (20, 3, 1), (6, 1)
    else:
        example_counts, counts = (40, 10, 3), (30, 3)
    example_context, example_answer, _ = _word_list(rng, *example_counts)
    context, answer, uncommon = _word_list(rng, size, *counts)
    prefix = f"Answer: The top {NUM_COMMON} words that appear most often in the list are:"
    example = f"{_question(example_context)}\n{prefix} {_numbered(example_answer)}"
    return Draft(
        user_text=f"{example}\n{_question(context)}",
        answer_prefix=prefix,
        answers=tuple(answer),
        target=" " + _numbered(answer),
        distractors=tuple(uncommon),
    )


def _word_list(rng: random.Random, size: int, common: int, uncommon: int):
    chosen = rng.sample(word_pool(), size)
    top, rest = chosen[:NUM_COMMON], chosen[NUM_COMMON:]
    words = top * common + rest * uncommon
    rng.shuffle(words)
    return _numbered(words), top, rest


def _numbered(words) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _question(context: str) -> str:
    return (
        "Below is a numbered list of words. Some of them appear more often than others: memorize the ones that "
        f"appear most often.\n{context}\nQuestion: What are the {NUM_COMMON} most common words in the list above?"
    )


MIN_SIZE = NUM_COMMON + 1


def max_size() -> int:
    return len(word_pool())
