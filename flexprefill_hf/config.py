"""The FlexPrefill hyper-parameters, validated once, in one place."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .ops.runtime import SUPPORTED_BLOCK_SIZES


@dataclasses.dataclass(frozen=True)
class FlexPrefillConfig:
    """Hyper-parameters of FlexPrefill (Lai et al., ICLR 2025).

    Attributes:
        gamma: attention coverage in (0, 1]; each head keeps blocks until their attention reaches it.
        tau: Jensen-Shannon threshold >= 0; a head whose sqrt(JSD) is below it is query-aware,
            otherwise vertical-slash. ``tau=0`` makes every head vertical-slash.
        block_size: tokens per block, 64 or 128.
        min_budget: the fewest tokens of vertical and of slash budget a head keeps (>= 0).
        max_budget: the most tokens of vertical and of slash budget a head keeps, or None.
        dense_threshold: prompts of at most this many tokens run dense attention. None means the
            paper's rule, ``max(2 * block_size, ceil(min_budget / block_size) * block_size)``.
        cuda_dense_below: on CUDA, prompts of fewer keys than this run dense attention, because
            there the selection's fixed cost exceeds what sparsity saves (measured on an H200:
            ``benchmarks/RESULTS.md``). 0 turns the rule off (tests, CUDA graphs).
    """

    gamma: float = 0.95
    tau: float = 0.1
    block_size: int = 128
    min_budget: int = 1024
    max_budget: Optional[int] = None
    dense_threshold: Optional[int] = None
    cuda_dense_below: int = 20480

    def __post_init__(self) -> None:
        _check_number("gamma", self.gamma)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma!r} is not supported; expected 0 < gamma <= 1")
        _check_number("tau", self.tau)
        if not self.tau >= 0.0:
            raise ValueError(f"tau={self.tau!r} is not supported; expected tau >= 0")
        _check_count("block_size", self.block_size, minimum=1)
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size={self.block_size!r} is not supported; expected one of {SUPPORTED_BLOCK_SIZES}"
            )
        _check_count("min_budget", self.min_budget, minimum=0)
        if self.max_budget is not None:
            _check_count("max_budget", self.max_budget, minimum=1)
            if self.max_budget < self.min_budget:
                raise ValueError(
                    f"max_budget={self.max_budget!r} is smaller than min_budget={self.min_budget!r}; "
                    "expected max_budget >= min_budget or None"
                )
        if self.dense_threshold is not None:
            _check_count("dense_threshold", self.dense_threshold, minimum=0)
        _check_count("cuda_dense_below", self.cuda_dense_below, minimum=0)

    # Budgets are given in tokens; these properties are the one place they become block counts.
    @property
    def min_budget_blocks(self) -> int:
        """ceil(min_budget / block_size): blocks of vertical and of slash budget always kept."""
        return math.ceil(self.min_budget / self.block_size)

    @property
    def max_budget_blocks(self) -> Optional[int]:
        """ceil(max_budget / block_size), or None when there is no maximum."""
        if self.max_budget is None:
            return None
        return math.ceil(self.max_budget / self.block_size)

    @property
    def effective_dense_threshold(self) -> int:
        """Prompts of at most this many tokens use dense attention (ops/README.md §5)."""
        if self.dense_threshold is not None:
            return self.dense_threshold
        return max(2 * self.block_size, self.min_budget_blocks * self.block_size)

    def replace(self, **changes) -> "FlexPrefillConfig":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown FlexPrefillConfig field(s) {unknown}; expected some of: {allowed}")
        return dataclasses.replace(self, **changes)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected a float")
    if math.isnan(value):
        raise ValueError(f"{name}=nan is not supported; expected a number")


def _check_count(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected an int")
    if value < minimum:
        raise ValueError(f"{name}={value!r} is not supported; expected an int >= {minimum}")
