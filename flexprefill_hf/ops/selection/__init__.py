"""FlexPrefill block selection (ops/README.md §1-§5): which key blocks each query block computes.

``select.py`` runs the steps for all sequences and heads at once; each step's PyTorch and Triton
versions sit side by side: ``scores.py`` / ``scores_triton.py`` (the representative block's scores,
§1 and §3), ``compose.py`` / ``compose_triton.py`` (the final block mask, packed, §5). The small
coverage and budget rules shared by §3 and §4 are in ``coverage.py``.
"""

from .select import BlockSelection, select_blocks

__all__ = ["BlockSelection", "select_blocks"]
