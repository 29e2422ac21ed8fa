"""The sparse route under ``torch.compile``: one opaque custom op around the eager code.

Why: traced piece by piece, the sparse route failed on the H200 (torch 2.11): inductor lost the one-launch
selection kernels' writes (query_aware all False), and with the sort-based stages the compiled graph hit an
illegal memory access (2026-12-02, ``tests/test_gpu.py::test_torch_compile_fullgraph``). Our Triton kernels write
through pointers whose strides they compute themselves, and flash-attn-4 registers no custom op at all, so
neither is a good subject for inductor's analysis of user kernels. As one ``torch.library`` custom op the whole
sparse route (selection, backend choice, kernel) is a single node of the graph: ``fullgraph=True`` traces it,
inductor schedules around it, and inside it the eager code runs unchanged, flash-attn-4 included. The price: no
fusion across the op boundary, which there is nothing to gain from (each stage is already a kernel of its own).

The config travels as an int (custom ops take tensors and scalars): :func:`config_id` registers each distinct
config once, in order, so the id is stable for the process and dynamo guards on it as a constant.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import FlexPrefillConfig

_CONFIGS: list[FlexPrefillConfig] = []
_IDS: dict[FlexPrefillConfig, int] = {}


# Run for real while dynamo traces (its result becomes a constant of the graph): traced symbolically, the registry's
# update was deferred past the op's first call, which then found no config under the id (H200, 2026-12-02).
@torch.compiler.assume_constant_result
def config_id(config: FlexPrefillConfig) -> int:
    """The process-wide int that stands for ``config`` in the custom op's arguments (configs are frozen and
    hashable; equal configs share one id)."""
    found = _IDS.get(config)
    if found is None:
        found = _IDS[config] = len(_CONFIGS)
        _CONFIGS.append(config)
    return found


@torch.library.custom_op("flexprefill_hf::sparse_prefill", mutates_args=())
def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_start: Optional[torch.Tensor],
    softmax_scale: float,
    config: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operator's sparse route (inputs validated by the caller), as one op.

    q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D] (any strides), key_start optional int [B], config an id from
    :func:`config_id`. Returns (out [B, q_len, Hq, D] contiguous in q's dtype, query_aware bool [B, Hq],
    js_distance float32 [B, Hq], computed_blocks int32 [B, Hq], causal_blocks int32 [B]): the output and what
    :func:`flexprefill.build_stats` needs.
    """
    from .flexprefill import sparse_route

    out, computed, selection = sparse_route(q, k, v, _CONFIGS[config], softmax_scale, key_start)
    # Fresh tensors, never views of the inputs or of each other (a custom op's outputs must not alias).
    return (out.contiguous(), selection.query_aware, selection.js_distance.float(), computed,
            selection.causal_blocks.to(torch.int32))


@sparse_prefill.register_fake
def _(q, k, v, key_start, softmax_scale, config):
    batch, q_heads = q.shape[0], q.shape[2]
    return (
        q.new_empty(q.shape),
        q.new_empty((batch, q_heads), dtype=torch.bool),
        q.new_empty((batch, q_heads), dtype=torch.float32),
        q.new_empty((batch, q_heads), dtype=torch.int32),
        q.new_empty((batch,), dtype=torch.int32),
    )
