"""Frequent-words extraction (RULER ``fwe``): name the 3 most frequent words of a zeta-distributed text.

A vocabulary of ``length // 50`` random 6-letter lower-case "coded words" is drawn and ranked; the
word of rank k occurs ``floor(size * k^-alpha / zeta(alpha))`` times (alpha = 2), shuffled. The word of
rank 1 is replaced by "..." (noise the question says to ignore), so the answers are ranks 2, 3 and 4.
"""

from __future__ import annotations

import math
import random
import string

from .common import Draft

MAX_NEW_TOKENS = 50
ALPHA = 2.0
WORD_LENGTH = 6
MIN_SIZE = 100  # from here on floor(size * k^-2 / zeta(2)) differs between ranks 2, 3, 4 and 5


def build(rng: random.Random, size: int, length: int, alpha: float = ALPHA) -> Draft:
    """The prompt with ``size`` words before truncation of the counts to integers."""
    vocab_size = max(8, length // 50)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=WORD_LENGTH)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    norm = zeta(alpha)
    counts = [int(size * (k + 1) ** -alpha / norm) for k in range(vocab_size)]
    words = [w for w, c in zip(ranked, counts) for _ in range(c)]
    rng.shuffle(words)
    answers = tuple(ranked[1:4])
    # Ties would make the answer ambiguous: the three answers must each occur more often than the next rank.
    if not counts[1] > counts[2] > counts[3] > counts[4]:
        raise ValueError(f"size={size} is too small for fwe: the top counts {counts[:5]} tie")
    user_text = (
        "Read the following coded text and track how often each coded word appears. Find the three coded "
        f"words that appear most often. {' '.join(words)}\nQuestion: Do not give any explanation. Ignore the "
        "dots '....'. What are the three most frequently appearing words in the coded text above?"
    )
    return Draft(
        user_text=user_text,
        answer_prefix="Answer: According to the coded text above, the three most frequently appeared words are:",
        answers=answers,
        target=" " + " ".join(answers),
        distractors=tuple(w for w, c in zip(ranked[4:], counts[4:]) if c > 0),
    )


def zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta(s) for s > 1: a partial sum plus its Euler-Maclaurin tail (error below 1e-12 for s >= 1.5)."""
    if not s > 1:
        raise ValueError(f"alpha={s!r} is not supported; expected alpha > 1")
    n = float(terms)
    partial = math.fsum(k**-s for k in range(1, terms))
    return partial + n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12
