"""Attention given the selected blocks (ops/README.md §6), and dense attention for what runs dense.

``block_sparse_triton.py`` (the CUDA kernel), ``block_sparse_torch.py`` (the same function in PyTorch, the
CPU path), ``dense.py`` (dense causal attention). Their float64 oracles are in ``ops/reference.py``.
"""

from .block_sparse_torch import block_sparse_attention_torch, masked_attention_torch
from .dense import dense_attention_torch

__all__ = ["block_sparse_attention_torch", "dense_attention_torch", "masked_attention_torch"]
