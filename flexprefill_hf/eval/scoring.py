"""Scores: RULER's string matches on a generated reply, and the strict teacher-forced score.

RULER (``scripts/eval``): the prediction is stripped, every control character (U+0000..U+001F) becomes
a newline and the result is stripped again; then, case-insensitively,
    string_match_all = share of the expected strings found in the prediction (the synthetic tasks),
    string_match_part = 1 if any expected string is found, else 0 (RULER's QA tasks),
reported x100. The teacher-forced score writes the expected reply after the answer prefix and reads,
in one forward pass, the mean log-probability of its tokens and the share of them that are the
model's top choice: unlike free generation (whose dense decode can repair a damaged prefill), it
depends on the prefill alone.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(text: str) -> str:
    """RULER's cleaning: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """100 x the share of ``references`` contained in the cleaned prediction, case-insensitively."""
    _check_references(references)
    pred = clean_prediction(prediction).lower()
    return 100.0 * sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """100 if any of ``references`` is contained in the cleaned prediction (case-insensitively), else 0."""
    _check_references(references)
    pred = clean_prediction(prediction).lower()
    return 100.0 if any(r.lower() in pred for r in references) else 0.0


METRICS = {"all": string_match_all, "part": string_match_part}


def ruler_score(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; expected one of {sorted(METRICS)}")
    return METRICS[metric](prediction, references)


def _check_references(references) -> None:
    if isinstance(references, str) or len(references) == 0:
        raise ValueError(f"references={references!r}; expected a non-empty sequence of strings")


@dataclasses.dataclass(frozen=True)
class TeacherForced:
    """Strict score of one sample: mean log p of the target tokens, share that are the argmax, token count."""

    mean_log_prob: float
    top1: float
    tokens: int


def teacher_forced_logits_scores(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> list[TeacherForced]:
    """Scores from the logits that predict each target token.

    logits: [B, T, V], row t predicting targets[:, t]; targets: int [B, T]; valid: bool [B, T] (False
    where a shorter target is padded). Arithmetic in float32.
    """
    log_probs = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # [B, T]
    top = logits.argmax(-1) == targets  # [B, T]
    count = valid.sum(-1)  # [B]
    mean_lp = (log_probs * valid).sum(-1) / count.clamp_min(1)
    share = (top & valid).sum(-1) / count.clamp_min(1)
    return [
        TeacherForced(float(lp), float(s), int(c)) for lp, s, c in zip(mean_lp.tolist(), share.tolist(), count.tolist())
    ]


@torch.no_grad()
def teacher_forced_score(
    model, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_token_id: int = 0
) -> list[TeacherForced]:
    """Strict scores of a batch: each ``prompt + target`` in one forward pass, left-padded.

    prompts, targets: token ids per sample (targets non-empty). Rows are left-padded to one length,
    with an attention mask and position ids that start at 0 on each row's first real token, so a
    padded row sees exactly what it would alone. Only the logits of the last ``max(len(target)) + 1``
    positions are formed.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts and {len(targets)} targets; expected equal, non-zero counts")
    if any(len(t) == 0 for t in targets):
        raise ValueError("every target needs at least one token")
    device = model.device
    span = max(len(t) for t in targets)
    # Left padding ends every row at the last position, so every target ends there too.
    rows = [list(p) + list(t) for p, t in zip(prompts, targets)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=False,
        logits_to_keep=span + 1,
    ).logits[:, :-1]  # [B, span, V]: position t predicts token t + 1
    target_ids = torch.full((len(rows), span), pad_token_id, dtype=torch.long)
    valid = torch.zeros(len(rows), span, dtype=torch.bool)
    for b, t in enumerate(targets):
        target_ids[b, span - len(t) :] = torch.tensor(list(t))
        valid[b, span - len(t) :] = True
    return teacher_forced_logits_scores(logits, target_ids.to(device), valid.to(device))
