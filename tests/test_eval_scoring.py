"""Scorers: RULER's string matches on hand-written cases, the teacher-forced score against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from flexprefill_hf.eval.scoring import (
    clean_prediction,
    ruler_score,
    string_match_all,
    string_match_part,
    teacher_forced_score,
)

from hf_tiny import VOCAB, tiny_model


def test_clean_prediction_follows_ruler():
    assert clean_prediction("  1234567.\n") == "1234567."
    # Control characters become newlines, then the ends are stripped again.
    assert clean_prediction("\x00a\tb\x1fc\x07") == "a\nb\nc"
    assert clean_prediction("\x7f kept") == "\x7f kept"  # DEL is not in RULER's range


def test_string_match_all():
    assert string_match_all("The number is 1234567.", ["1234567"]) == 100.0
    assert string_match_all("nothing here", ["1234567"]) == 0.0
    # Partial credit: 3 of 4 values found.
    assert string_match_all("11, 22 and 33", ["11", "22", "33", "44"]) == 75.0
    # Case-insensitive, both ways.
    assert string_match_all("AbCdE fghij", ["abcde", "FGHIJ"]) == 100.0
    # Substring match, as RULER: '12' is found inside '123'.
    assert string_match_all("123", ["12"]) == 100.0
    # Cleaning turns a control character inside a value into a newline: the value is not found.
    assert string_match_all("12\x0034", ["1234"]) == 0.0


def test_string_match_part():
    assert string_match_part("Paris, France", ["paris", "london"]) == 100.0
    assert string_match_part("Rome", ["paris", "london"]) == 0.0
    assert ruler_score("part", "x", ["x", "y"]) == 100.0
    assert ruler_score("all", "x", ["x", "y"]) == 50.0
    with pytest.raises(ValueError, match="metric='any'"):
        ruler_score("any", "x", ["x"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        string_match_all("x", "x")


@torch.no_grad()
def _hand_score(model, prompt, target):
    """Mean log-softmax of each target token given everything before it, and the argmax share, one by one."""
    ids = torch.tensor([prompt + target])
    logits = model(ids).logits[0].double()  # [T, V]
    total, top = 0.0, 0
    for t, token in enumerate(target):
        row = logits[len(prompt) + t - 1]
        total += (row[token] - torch.logsumexp(row, 0)).item()
        top += int(row.argmax().item() == token)
    return total / len(target), top / len(target)


def test_teacher_forced_matches_hand_computation():
    model = tiny_model("llama", seed=3)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (40, 23, 57)]
    targets = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 1, 9)]
    # One at a time, then as one left-padded batch: both equal the hand computation.
    single = [teacher_forced_score(model, [p], [t])[0] for p, t in zip(prompts, targets)]
    batched = teacher_forced_score(model, prompts, targets, pad_token_id=0)
    for p, t, one, many in zip(prompts, targets, single, batched):
        mean_lp, top1 = _hand_score(model, p, t)
        assert one.tokens == many.tokens == len(t)
        assert one.mean_log_prob == pytest.approx(mean_lp, abs=1e-5)
        assert many.mean_log_prob == pytest.approx(mean_lp, abs=1e-5)
        assert one.top1 == pytest.approx(top1) and many.top1 == pytest.approx(top1)
        assert math.isfinite(one.mean_log_prob) and one.mean_log_prob < 0


def test_teacher_forced_target_is_what_the_model_predicts():
    model = tiny_model("llama", seed=4)
    prompt = list(range(3, 40))
    # Greedy continuation: every target token is the argmax, so top-1 share is 1.
    ids = torch.tensor([prompt])
    greedy = []
    with torch.no_grad():
        for _ in range(4):
            token = int(model(ids).logits[0, -1].argmax())
            greedy.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert teacher_forced_score(model, [prompt], [greedy])[0].top1 == 1.0


def test_teacher_forced_rejects_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="equal, non-zero counts"):
        teacher_forced_score(model, [[3, 4]], [])
    with pytest.raises(ValueError, match="at least one token"):
        teacher_forced_score(model, [[3, 4]], [[]])
