"""RULER's synthetic tasks, minus the two QA tasks (they need SQuAD / HotpotQA downloads).

``TASKS`` maps each name to a :class:`TaskSpec`; :func:`generate_samples` builds the samples of one task
at one length, deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from . import common_words, frequent_words, niah, variable_tracking
from .common import Builder, Draft, Sample, encode_prompt, encode_target, fit_sample, prompt_text


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How to build one task: the draft builder, the answer budget, the sizing bounds and RULER's metric."""

    name: str
    build: Builder
    max_new_tokens: int
    min_size: int
    max_size: Optional[Callable[[], int]] = None
    hint: int = 16
    metric: str = "all"


def _specs() -> dict[str, TaskSpec]:
    specs = {}
    for name, task in niah.TASKS.items():
        hint = 64 if task.haystack == "essay" else 32
        specs[name] = TaskSpec(name, task.build, niah.MAX_NEW_TOKENS, task.min_size, hint=hint)
    specs["vt"] = TaskSpec("vt", variable_tracking.build, variable_tracking.MAX_NEW_TOKENS, variable_tracking.MIN_SIZE, hint=32)
    specs["cwe"] = TaskSpec(
        "cwe", common_words.build, common_words.MAX_NEW_TOKENS, common_words.MIN_SIZE, common_words.max_size, hint=64
    )
    specs["fwe"] = TaskSpec("fwe", frequent_words.build, frequent_words.MAX_NEW_TOKENS, frequent_words.MIN_SIZE, hint=512)
    return specs


TASKS: dict[str, TaskSpec] = _specs()
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def generate_samples(
    tokenizer, task: str, length: int, num_samples: int, seed: int = 0, start: int = 0
) -> list[Sample]:
    """``num_samples`` samples of ``task`` at ``length`` tokens (prompt + answer budget), in the model's tokens:
    those of indices ``start`` .. ``start + num_samples - 1`` (each index's sample is the same whatever the
    range it is built in)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; expected one of {', '.join(TASK_NAMES)}")
    if start < 0:
        raise ValueError(f"start={start}; expected an int >= 0")
    spec = TASKS[task]
    max_size = spec.max_size() if spec.max_size is not None else None
    # Where the search starts: about the size that fits, from the task's size at 1K tokens.
    hint = max(spec.min_size, spec.hint * length // 1024)
    samples = []
    for index in range(start, start + num_samples):
        sample = fit_sample(
            tokenizer, task, spec.build, length, index, seed, spec.max_new_tokens,
            min_size=spec.min_size, max_size=max_size, hint=hint,
        )
        samples.append(dataclasses.replace(sample, metric=spec.metric))
    return samples


__all__ = [
    "Draft",
    "Sample",
    "TASKS",
    "TASK_NAMES",
    "TaskSpec",
    "encode_prompt",
    "encode_target",
    "generate_samples",
    "prompt_text",
]
