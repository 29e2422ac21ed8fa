"""The public FlexPrefill operator: validate, route (dense or sparse), select blocks, attend."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from ..config import FlexPrefillConfig
from .attention.block_sparse_torch import block_sparse_attention_torch
from .backends import choose_sparse_backend, dense_attention
from .grid import BlockGrid, causal_block_counts
from .runtime import KERNEL_DTYPES
from .selection import BlockSelection, select_blocks
from .validation import check_attention_inputs, check_kernel_head_dim, check_softmax_scale


@dataclasses.dataclass(frozen=True)
class FlexPrefillStats:
    """What one call chose, per (batch, query head); tensors on the input's device.

    query_aware: bool [B, Hq] -- True where the head used the query-aware pattern.
    js_distance: float32 [B, Hq] -- sqrt(JSD) between the estimated and the true block distribution
        (NaN where the sequence ran dense).
    computed_blocks: int32 [B, Hq] -- (query block, key block) pairs computed.
    computed_fraction: float32 [B, Hq] -- computed_blocks over the pairs of the causal block triangle
        (0 for a sequence of padding only, key_start[b] == k_len).
    dense: True when the whole call took the dense path.
    A batch of 0 gives tensors of shape [0, Hq].
    """

    query_aware: torch.Tensor
    js_distance: torch.Tensor
    computed_blocks: torch.Tensor
    computed_fraction: torch.Tensor
    dense: bool


def flexprefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: Optional[FlexPrefillConfig] = None,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """FlexPrefill causal attention for one layer (forward only: a prefill, i.e. inference, method).

    Args:
        q: [B, q_len, Hq, D] queries, fp16/bf16/fp32/fp64; the last q_len positions of the keys
            (bottom-right causal), so a prefill on top of a cache of k_len - q_len tokens is expressed by
            q_len < k_len. 1 <= q_len <= k_len.
        k, v: [B, k_len, Hkv, D], q's dtype and device, with Hq = G * Hkv; query head h reads KV head
            h // G. Any strides (Hugging Face's transposed [B, H, N, D] views are used without a copy).
        config: hyper-parameters (default ``FlexPrefillConfig()``).
        softmax_scale: default 1 / sqrt(D).
        key_start: optional int32/int64 tensor [B] on q's device, 0 <= key_start[b] <= k_len: keys before
            key_start[b] are left padding. A padded sequence gets exactly the blocks it would get alone
            (the block grid is end-aligned); key_start[b] == k_len is a sequence of padding only (an empty
            prompt in a left-padded batch): every row of it outputs 0 and its statistics count no block.
            The range is checked eagerly on CPU (ValueError); on CUDA by ``torch._assert_async`` (no host
            sync: a bad value fails as a device-side assert at the next synchronisation, which leaves the
            CUDA context unusable).
    Returns:
        [B, q_len, Hq, D] in q's dtype. Rows with no real key (padding queries) are 0. B = 0 gives an
        empty output (as SDPA does).

    Routes (``ops/backends.py`` names the kernel for each case and says why):
    * dense: decode (q_len == 1), prompts of at most ``config.effective_dense_threshold`` keys
      (ops/README.md §5), fp32/fp64 CUDA tensors, and CUDA prompts of fewer than ``config.cuda_dense_below``
      keys (where dense is faster). Run by the best dense backend: flash-attn-4 where it imports (Hopper+,
      fp16/bf16, not under torch.compile), else SDPA with cuDNN first, else SDPA's default; decode is one
      unmasked SDPA call, as transformers' own ``sdpa`` makes. No statistics are built here.
    * sparse: block selection, then the block-sparse forward: flash-attn-4 on Hopper+ (block 128, head dim
      <= 128, no left padding, not under torch.compile, where it cannot be traced), else the Triton kernel;
      CPU tensors run the same function in PyTorch.

    Gradients: not supported. With grad mode on and q, k or v requiring grad this raises ValueError;
    call it under ``torch.no_grad()`` or ``torch.inference_mode()``.

    NaN/Inf: not checked (that would cost a host sync). They propagate as in SDPA: a non-finite query
    row gives a NaN output row; a non-finite key or value reaches the rows that attend it, and may reach
    other rows of the same tile (kernel) or chunk (PyTorch), since masked scores are -inf and 0 * NaN is
    NaN. In the sparse path a non-finite representative query (the last block) or key also makes that
    head's block selection meaningless. Give finite inputs.
    """
    return _forward(q, k, v, config, softmax_scale, key_start, with_stats=False)[0]


def flexprefill_attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: Optional[FlexPrefillConfig] = None,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, FlexPrefillStats]:
    """:func:`flexprefill_attention` that also returns what it chose, as :class:`FlexPrefillStats`.

    The statistics cost a few small tensors per call (on the dense route too): the model integration asks
    for them only inside ``record_stats``.
    """
    out, stats = _forward(q, k, v, config, softmax_scale, key_start, with_stats=True)
    return out, stats


def _forward(q, k, v, config, softmax_scale, key_start, with_stats: bool):
    """(out, stats or None): the operator; stats are built only when ``with_stats``.

    Ordered so that decode, which runs on every layer for every token, does the least: one shape read, the
    checks, then the decode branch before any routing decision. The inputs are validated here, once: the
    kernels below are called through their unchecked launchers, on a structure built here.
    """
    check_attention_inputs(q, k, v, key_start)
    if config is None:
        config = _DEFAULT_CONFIG
    elif not isinstance(config, FlexPrefillConfig):
        raise TypeError(f"config has type {type(config).__name__}; expected FlexPrefillConfig or None")
    batch, q_len, _, head_dim = q.shape
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        check_softmax_scale(softmax_scale)
        scale = float(softmax_scale)
    if batch == 0:
        dense = q_len == 1 or _routes_dense(q, k.shape[1], config)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), (_empty_stats(q, dense) if with_stats else None)
    if q_len == 1 or _routes_dense(q, k.shape[1], config):
        out = dense_attention(q, k, v, scale, key_start)
        return out, (_dense_stats(q, k, config, key_start) if with_stats else None)

    if q.is_cuda:
        # A CUDA sparse call runs a kernel (the dense route took every other dtype): its head dims, checked
        # before the selection, as the unchecked launchers do not.
        check_kernel_head_dim(head_dim)
    if torch.compiler.is_compiling():
        # One opaque custom op (ops/compiled.py says why): the eager code, FA4 included, runs inside it.
        from .compiled import config_fields, sparse_prefill

        out, query_aware, js_distance, computed, causal = sparse_prefill(q, k, v, key_start, scale,
                                                                         *config_fields(config))
        if not with_stats:
            return out, None
        return out, FlexPrefillStats(query_aware, js_distance, computed, _fraction(computed, causal), dense=False)
    out, computed, selection = sparse_route(q, k, v, config, scale, key_start, with_counts=with_stats)
    if not with_stats:
        return out, None
    return out, build_stats(computed, selection.causal_blocks, selection, dense=False)


def sparse_route(q, k, v, config: FlexPrefillConfig, scale: float, key_start, with_counts: bool = True):
    """(out, computed, selection): block selection, then the block-sparse forward by the backend
    ``ops/backends.py`` picks, on inputs :func:`_forward` validated (kernel head dims included).
    computed: int32 [B, Hq], the pairs each head computed (None unless ``with_counts``)."""
    selection = select_blocks(q, k, selection_config(config, q.is_cuda), scale, key_start)
    structure = selection.structure
    backend, _ = choose_sparse_backend(q, k, structure, key_start)
    if backend == "fa4":
        from .attention.block_sparse_fa4 import _block_sparse_attention_fa4

        out = _block_sparse_attention_fa4(q, k, v, structure, scale)[0]
    elif backend == "triton":
        # Imported here: the kernel module is compiled for the device (or the interpreter) on first use.
        from .attention.block_sparse_triton import _block_sparse_attention_triton

        out = _block_sparse_attention_triton(q, k, v, structure, scale, key_start)[0]
    else:
        out = block_sparse_attention_torch(q, k, v, structure, scale, key_start)
    if not with_counts:
        return out, None, selection
    computed = structure.counts.sum(-1, dtype=torch.int32)  # [B, Hq]
    if key_start is not None:
        # A sequence of padding only runs dense from its clamped sink: one block of padding, nothing computed.
        computed = computed.masked_fill_((key_start >= k.shape[1])[:, None], 0)
    return out, computed, selection


def build_stats(
    computed: torch.Tensor, causal: torch.Tensor, selection: Optional[BlockSelection], dense: bool
) -> FlexPrefillStats:
    """The one builder of :class:`FlexPrefillStats` (the operator's routes and ``varlen.py``).

    computed: int32 [B, Hq], the (query block, key block) pairs each head computed; causal: int [B], the pairs
    of each sequence's causal block triangle (0 for a sequence with no real key or no query: its fraction is 0);
    selection: what chose the blocks (its query-aware flags and JS distances), or None where no selection ran
    (every head dense: False and NaN).
    """
    if selection is None:
        batch, heads = computed.shape
        query_aware = torch.zeros(batch, heads, dtype=torch.bool, device=computed.device)
        js_distance = torch.full((batch, heads), math.nan, device=computed.device)
    else:
        query_aware, js_distance = selection.query_aware, selection.js_distance.float()
    return FlexPrefillStats(
        query_aware=query_aware,
        js_distance=js_distance,
        computed_blocks=computed,
        computed_fraction=_fraction(computed, causal),
        dense=dense,
    )


def _fraction(computed: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """computed [B, Hq] over causal [B] as float32, 0 where a sequence has no causal pair."""
    return computed.float() / causal.clamp_min(1)[:, None].float()


_DEFAULT_CONFIG = FlexPrefillConfig()


@functools.lru_cache(maxsize=64)
def selection_config(config: FlexPrefillConfig, on_cuda: bool) -> FlexPrefillConfig:
    """The configuration the selection runs with: on CUDA, a sequence whose real keys are fewer than
    ``cuda_dense_below`` runs dense inside a sparse call (its ``short`` rule), as it would alone -- so a short
    prompt in a long left-padded batch, or in a packed batch (``varlen.py``), gets what it gets by itself.
    Cached: configs are frozen and few."""
    if not on_cuda or config.cuda_dense_below - 1 <= config.effective_dense_threshold:
        return config
    return config.replace(dense_threshold=config.cuda_dense_below - 1)


def _routes_dense(q: torch.Tensor, k_len: int, config: FlexPrefillConfig) -> bool:
    """Whether a prefill (q_len > 1) takes the dense route (see :func:`flexprefill_attention`)."""
    if k_len <= config.effective_dense_threshold:
        return True
    return q.is_cuda and (q.dtype not in KERNEL_DTYPES or k_len < config.cuda_dense_below)


def _empty_stats(q: torch.Tensor, dense: bool) -> FlexPrefillStats:
    computed = torch.zeros(0, q.shape[2], dtype=torch.int32, device=q.device)  # [0, Hq]
    return build_stats(computed, computed[:, 0], None, dense)


def _dense_stats(q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig, key_start) -> FlexPrefillStats:
    """Every head of every sequence dense: all pairs of its causal block triangle computed."""
    batch, q_len, q_heads, _ = q.shape
    grid = BlockGrid(q_len, k.shape[1], config.block_size)
    starts = torch.zeros(batch, dtype=torch.long, device=q.device) if key_start is None else key_start
    causal = causal_block_counts(grid, grid.sink_block(starts))  # [B]
    if key_start is not None:
        # A sequence of padding only (key_start == k_len) computes no block, as on the sparse route.
        causal = causal.masked_fill(key_start >= grid.k_len, 0)
    return build_stats(causal[:, None].expand(batch, q_heads).contiguous(), causal, None, dense=True)
