"""The two kinds of filler text of the RULER tasks, both available offline.

* noise: RULER's repeated five-sentence unit (:data:`NOISE`).
* essay: RULER uses Paul Graham's essays, which cannot be shipped or downloaded here. We use the
  English prose that ships with every Python install: the reference pages of ``pydoc_data.topics``
  (about 65,000 words), split into sentences. Code samples, headings, signature lines and sentences
  that are mostly identifiers are dropped, which leaves about 1,600 sentences (30,000 words); a
  haystack longer than that wraps around.
  The text comes from the Python version that runs the suite, so prompts (and their hashes) can differ
  between Python versions.
"""

from __future__ import annotations

import functools
import re

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z])")
_MIN_WORDS = 5


@functools.lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """English sentences of ``pydoc_data.topics``, in a fixed order (topics sorted by name)."""
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = paragraph.splitlines()
            # Code, interactive sessions, headings and signatures are not prose: unindented lines that
            # read as text only. (Reference paragraphs are unindented or indented by exactly 3.)
            if not lines or any(_is_code_line(line) for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            for sentence in _SENTENCE_END.split(text):
                if _is_prose(sentence):
                    sentences.append(sentence)
    return tuple(sentences)


def _is_code_line(line: str) -> bool:
    stripped = line.strip()
    indent = len(line) - len(line.lstrip(" "))
    return (
        indent not in (0, 3)
        or stripped.startswith((">>>", "...", "*", "=", "-", "+", "|"))
        or stripped.endswith((":", ")"))  # a heading of a definition list or a signature
    )


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if len(words) < _MIN_WORDS or sentence[-1] not in ".!?":
        return False
    # Mostly plain words: few identifiers, operators or literals.
    plain = sum(1 for w in words if re.fullmatch(r"[A-Za-z][a-z'-]*[,.;!?]?", w))
    return plain >= 0.8 * len(words)


@functools.lru_cache(maxsize=1)
def prose_vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of four or more letters in :func:`prose_sentences`, sorted."""
    found = set()
    for sentence in prose_sentences():
        found.update(w for w in re.findall(r"[A-Za-z]+", sentence) if w.islower() and len(w) >= 4)
    return tuple(sorted(found))
