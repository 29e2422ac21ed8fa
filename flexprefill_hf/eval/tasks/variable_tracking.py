"""Variable tracking (RULER ``vt``): follow a chain of assignments through a noise haystack.

One chain of ``hops`` hops: "VAR AAAAA = 12345", then "VAR BBBBB = VAR AAAAA", ... with distinct
5-letter upper-case names and a 5-digit value. The assignments are placed in order at random
positions among ``size`` noise units (one per line). The question gives the value; the answers are
all ``hops + 1`` names. One short worked example (3-letter names, a small fixed haystack, its answer
written out) comes first, as in RULER.
"""

from __future__ import annotations

import random
import string

from ..haystack import NOISE
from .common import Draft, insert_at

MAX_NEW_TOKENS = 30
HOPS = 4
EXAMPLE_NOISE_UNITS = 12


def build(rng: random.Random, size: int, length: int) -> Draft:
    """The prompt with ``size`` noise units (``length`` unused: the example has a fixed size)."""
    example_rng = random.Random(rng.random())
    example_text, example_prefix, example_names, _ = _instance(example_rng, EXAMPLE_NOISE_UNITS, name_length=3)
    text, prefix, names, value = _instance(rng, size, name_length=5)
    example = f"{example_text}\n{example_prefix} {' '.join(example_names)}"
    return Draft(
        user_text=f"{example}\n\n{text}",
        answer_prefix=prefix,
        answers=tuple(names),
        target=" " + " ".join(names),
        distractors=(value,),
    )


def _instance(rng: random.Random, size: int, name_length: int):
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(HOPS)]
    positions = sorted(rng.sample(range(size + 1), len(chain)))
    context = "\n".join(insert_at([NOISE] * size, positions, chain))
    text = (
        "Memorize and track the chains of variable assignments hidden in the following text.\n\n"
        f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
    )
    prefix = (
        f"Answer: According to the chains of variable assignments in the text above, {HOPS + 1} variables are "
        f"assigned the value {value}, they are:"
    )
    return text, prefix, names, value


MIN_SIZE = HOPS  # size + 1 positions for hops + 1 assignments
