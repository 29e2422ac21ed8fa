"""The sparse route under ``torch.compile``: one opaque custom op around the eager code.

Why: traced piece by piece, the sparse route failed on the H200 (torch 2.11): inductor lost the one-launch
selection kernels' writes (query_aware all False), and with the sort-based stages the compiled graph hit an
illegal memory access (2026-12-02, ``tests/test_gpu.py::test_torch_compile_fullgraph``). Our Triton kernels write
through pointers whose strides they compute themselves, and flash-attn-4 registers no custom op at all, so
neither is a good subject for inductor's analysis of user kernels. As one ``torch.library`` custom op the whole
sparse route (selection, backend choice, kernel) is a single node of the graph: ``fullgraph=True`` traces it,
inductor schedules around it, and inside it the eager code runs unchanged, flash-attn-4 included. The price: no
fusion across the op boundary, which there is nothing to gain from (each stage is already a kernel of its own).

The config travels as its seven fields (custom ops take tensors and scalars; dynamo reads a config's fields as
constants of the graph and guards on them), and is rebuilt once per distinct value inside the op.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..config import FlexPrefillConfig


# FlexPrefillConfig's fields, in the order the op takes them (tests/test_compiled.py checks it is all of them).
CONFIG_FIELDS = ("gamma", "tau", "block_size", "min_budget", "max_budget", "dense_threshold", "cuda_dense_below")


def config_fields(config: FlexPrefillConfig) -> tuple:
    """The op's config arguments (plain attribute reads: dynamo turns them into constants of the graph)."""
    return (config.gamma, config.tau, config.block_size, config.min_budget, config.max_budget,
            config.dense_threshold, config.cuda_dense_below)


@functools.lru_cache(maxsize=64)
def _config(*fields) -> FlexPrefillConfig:
    """The config of the op's arguments, built once per distinct value (configs validate on construction)."""
    return FlexPrefillConfig(**dict(zip(CONFIG_FIELDS, fields)))


@torch.library.custom_op("flexprefill_hf::sparse_prefill", mutates_args=())
def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_start: Optional[torch.Tensor],
    softmax_scale: float,
    gamma: float,
    tau: float,
    block_size: int,
    min_budget: int,
    max_budget: Optional[int],
    dense_threshold: Optional[int],
    cuda_dense_below: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operator's sparse route (inputs validated by the caller), as one op.

    q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D] (any strides), key_start optional int [B]; the rest are the
    fields of a :class:`FlexPrefillConfig` (:func:`config_fields`). Returns (out [B, q_len, Hq, D] contiguous in
    q's dtype, query_aware bool [B, Hq], js_distance float32 [B, Hq], computed_blocks int32 [B, Hq],
    causal_blocks int32 [B]): the output and what :class:`flexprefill.FlexPrefillStats` is built from.
    """
    from .flexprefill import sparse_route

    config = _config(gamma, tau, block_size, min_budget, max_budget, dense_threshold, cuda_dense_below)
    out, computed, selection = sparse_route(q, k, v, config, softmax_scale, key_start)
    # Fresh tensors, never views of the inputs or of each other (a custom op's outputs must not alias).
    return (out.contiguous(), selection.query_aware, selection.js_distance.float(), computed,
            selection.causal_blocks.to(torch.int32))


@sparse_prefill.register_fake
def _(q, k, v, key_start, softmax_scale, *config):
    batch, q_heads = q.shape[0], q.shape[2]
    return (
        q.new_empty(q.shape),
        q.new_empty((batch, q_heads), dtype=torch.bool),
        q.new_empty((batch, q_heads), dtype=torch.float32),
        q.new_empty((batch, q_heads), dtype=torch.int32),
        q.new_empty((batch,), dtype=torch.int32),
    )
