"""Needle in a haystack, RULER's eight variants (``scripts/synthetic.yaml`` of NVIDIA/RULER).

A needle is the sentence "One of the special magic {kind} for {key} is: {value}." Keys are
adjective-noun pairs ("brave-lantern") or UUIDs, values 7-digit numbers or UUIDs. The needles are
shuffled and placed at depths drawn without replacement from 40 evenly spaced depths (0%..100%) of
a prose haystack, or at random positions of a noise haystack (RULER's repeated five sentences) or
of a haystack of distractor needles (other keys, other values). The question names ``queries`` of
the keys; the answers are all values of those keys.
"""

from __future__ import annotations

import dataclasses
import random
import uuid

from ..haystack import NOISE, prose_sentences
from ..words import adjectives, nouns
from .common import Draft, insert_at, join_list

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # percent, evenly spaced, 0 and 100 included
MAX_NEW_TOKENS = 128


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    """One RULER NIAH configuration.

    haystack: "noise", "essay" (prose) or "needle" (distractor needles).
    key_kind, value_kind: "words", "numbers" or "uuids".
    keys: needles' keys; values: values per key; queries: keys asked (keys >= queries).
    """

    haystack: str
    key_kind: str
    value_kind: str
    keys: int = 1
    values: int = 1
    queries: int = 1

    def build(self, rng: random.Random, size: int, length: int) -> Draft:
        """The prompt with ``size`` haystack units (sentences, noise units or distractor needles)."""
        num_keys = max(self.keys, self.queries)
        used: set[str] = set()
        keys = [_draw(rng, self.key_kind, used) for _ in range(num_keys)]
        values = [[_draw(rng, self.value_kind, used) for _ in range(self.values)] for _ in keys]
        needles = [NEEDLE.format(kind=self.value_kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        distractors = []
        if self.haystack == "essay":
            sentences = prose_sentences()
            start = rng.randrange(len(sentences))
            units = [sentences[(start + i) % len(sentences)] for i in range(size)]
            positions = sorted(size * depth // 100 for depth in rng.sample(DEPTHS, len(needles)))
            context = " ".join(insert_at(units, positions, needles))
        else:
            if self.haystack == "noise":
                units = [NOISE] * size
            else:  # distractor needles: keys and values never equal to the real ones
                units = []
                for _ in range(size):
                    value = _draw(rng, self.value_kind, used)
                    distractors.append(value)
                    units.append(NEEDLE.format(kind=self.value_kind, key=_draw(rng, self.key_kind, used), value=value))
            positions = sorted(rng.sample(range(size + 1), len(needles)))
            context = "\n".join(insert_at(units, positions, needles))

        asked = rng.sample(range(num_keys), self.queries)
        query = join_list([keys[i] for i in asked])
        answers = tuple(v for i in asked for v in values[i])
        distractors.extend(v for i in range(num_keys) if i not in asked for v in values[i])
        kind = self.value_kind
        if len(answers) == 1:
            kind1 = kind[:-1]  # "number", "uuid"
            user_text = (
                f"A special magic {kind1} is hidden in the following text. Memorize it: I will ask you about "
                f"the {kind1} afterwards.\n{context}\nWhat is the special magic {kind1} for {query} mentioned "
                "in the provided text?"
            )
            prefix = f"The special magic {kind1} for {query} mentioned in the provided text is"
        else:
            user_text = (
                f"Some special magic {kind} are hidden in the following text. Memorize them: I will ask you "
                f"about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} "
                "mentioned in the provided text?"
            )
            prefix = f"The special magic {kind} for {query} mentioned in the provided text are"
        return Draft(
            user_text=user_text,
            answer_prefix=prefix,
            answers=answers,
            target=" " + ", ".join(answers) + ".",
            distractors=tuple(distractors),
        )

    @property
    def min_size(self) -> int:
        # The noise and needle haystacks place each needle at its own position among size + 1.
        return 1 if self.haystack == "essay" else max(1, max(self.keys, self.queries) * self.values - 1)


def _draw(rng: random.Random, kind: str, used: set[str]) -> str:
    """A random key or value of ``kind`` not in ``used`` (then added to it)."""
    while True:
        if kind == "numbers":
            item = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "uuids":
            item = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        elif kind == "words":
            item = f"{rng.choice(adjectives())}-{rng.choice(nouns())}"
        else:
            raise ValueError(f"kind={kind!r} is not supported; expected 'numbers', 'uuids' or 'words'")
        if item not in used:
            used.add(item)
            return item


TASKS = {
    "niah_single_1": NeedleTask("noise", "words", "numbers"),
    "niah_single_2": NeedleTask("essay", "words", "numbers"),
    "niah_single_3": NeedleTask("essay", "words", "uuids"),
    "niah_multikey_1": NeedleTask("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NeedleTask("needle", "words", "numbers"),
    "niah_multikey_3": NeedleTask("needle", "uuids", "uuids"),
    "niah_multivalue": NeedleTask("essay", "words", "numbers", values=4),
    "niah_multiquery": NeedleTask("essay", "words", "numbers", queries=4),
}
