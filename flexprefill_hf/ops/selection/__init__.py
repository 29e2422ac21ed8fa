"""FlexPrefill block selection (ops/README.md §1-§5): which key blocks each query block computes.

``select.py`` runs the steps for all sequences and heads at once; each step's PyTorch and Triton
versions sit side by side: ``scores.py`` / ``scores_triton.py`` (the representative block's scores,
§1 and §3), ``compose.py`` / ``compose_triton.py`` (the final block mask, packed, §5). The small
coverage and budget rules shared by §3 and §4 are in ``coverage.py``; ``coverage_triton.py`` finds
the same boundaries by threshold searches (no sort), ``pattern_triton.py`` is §2 and
``estimate_triton.py`` §4's block estimate, each in one launch (PyTorch versions in ``select.py``).
``graphs.py`` replays the whole selection from a CUDA graph at short lengths, where its launches cost more
host time than its GPU work.
"""

from .select import BlockSelection, select_blocks

__all__ = ["BlockSelection", "select_blocks"]
