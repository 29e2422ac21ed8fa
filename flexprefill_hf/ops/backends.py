"""Which kernel runs for which case, and why: the block-sparse forward and the dense path.

Decided from devices, dtypes and shapes only (never from tensor values: no host sync), in this order:

Block-sparse forward (:func:`choose_sparse_backend`):
    "fa4"     flash-attn-4's block-sparse forward (``attention/block_sparse_fa4.py``): CUDA, fp16/bf16, compute
              capability >= 9.0, block size 128, head dim a multiple of 8 in [16, 128], no left padding,
              ``flash_attn.cute`` imports, and at least ``FA4_SPARSE_FROM`` keys. Every length is mapped
              exactly onto its tiles.
    "triton"  our Triton kernel: every other fp16/bf16 CUDA case (older GPUs, block 64, head dims up to 256, left
              padding, flash-attn-4 not installed, called inside a torch.compile trace: FA4 registers no
              custom op; the operator itself runs its sparse route as one custom op under compile,
              ``ops/compiled.py``, so there FA4 runs).
    "torch"   the PyTorch path: CPU tensors and fp32/fp64.

Dense causal attention (:func:`choose_dense_backend`), never with a mask where none is needed:
    "masked"           left padding, and CPU prefills on a cache: SDPA with a per-chunk additive mask
                       (``attention/block_sparse_torch.py``; O(chunk * k_len) memory). A padded decode step
                       instead runs :func:`decode_attention` with the [B, k_len] padding row as its only mask.
    "sdpa"             one query row (decode: it sees every key, so no mask and ``is_causal=False``, the call
                       transformers' own sdpa makes), and CPU prompts with q_len == k_len (``is_causal=True``).
    "fa4"              flash-attn-4's dense causal forward (bottom-right): CUDA, fp16/bf16, capability >= 9.0,
                       head dim a multiple of 8 in [16, 128], importable, not inside torch.compile. Measured
                       1.07-1.24x SDPA-cuDNN on the H200 (shared/ENVIRONMENT.md).
    "sdpa_cudnn"       CUDA, q_len == k_len: SDPA ``is_causal=True`` with cuDNN first in the priority order
                       (cuDNN, flash, efficient, math); SDPA skips a backend that cannot take the inputs.
    "sdpa_lower_right" CUDA, 1 < q_len < k_len (a prefill on a cache): SDPA with ``causal_lower_right``, which
                       the efficient/flash backends apply without building a mask.
Decode goes to plain SDPA even with flash-attn-4 present: FA4 runs one tile per (batch, head) for one row
(num_splits=1), too little work for the GPU at long caches.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention.block_sparse_fa4 import (
    COMPILE_REASON,
    FA4_MIN_CAPABILITY,
    KernelCase,
    fa4_available,
    fa4_head_dim,
    unsupported_reason,
)
from .block_structure import BlockStructure
from .runtime import KERNEL_DTYPES, compute_capability, cuda_capability

SPARSE_BACKENDS = ("fa4", "triton", "torch")
# Fewer keys than this run our Triton kernel even where flash-attn-4 takes the case. On the H200 (bf16, d 128, 32 q /
# 8 kv heads, γ 0.9; RESULTS.md 2026-12-03), ms Triton / FA4 on the same blocks: 8K 0.37 / 0.65 structured, 0.39 /
# 1.00 clustered, 1.01 / 1.03 random (FA4's per-call cost of list building and launches); 12K 1.09 / 0.99, 1.08 /
# 0.94, 2.13 / 1.71; 16K 1.10 / 1.08, 1.20 / 0.96, 3.69 / 2.81. (Until 2026-12-02: 16384, from 8K and 16K runs.)
FA4_SPARSE_FROM = 12288
DENSE_BACKENDS = ("masked", "sdpa", "fa4", "sdpa_cudnn", "sdpa_lower_right")

Availability = Union[bool, Callable[[], bool]]


def sparse_backend_for(
    case: KernelCase, fa4: Availability = fa4_available, short: bool = False
) -> tuple[str, str]:
    """(backend, reason) for a block-sparse forward (see the module docstring).

    fa4: whether flash-attn-4 imports, or a function that says so (asked only when everything else fits);
    short: fewer than ``FA4_SPARSE_FROM`` keys (the Triton kernel is faster there).
    """
    if case.device_type != "cuda" or case.dtype not in KERNEL_DTYPES:
        return "torch", f"{case.dtype} tensors on {case.device_type}: the PyTorch path (kernels take CUDA fp16/bf16)"
    reason = unsupported_reason(case)
    if reason is None and short:
        return "triton", f"Triton kernel: fewer than FA4_SPARSE_FROM = {FA4_SPARSE_FROM} keys, where it is faster"
    if reason is None:
        if fa4() if callable(fa4) else fa4:
            return "fa4", "flash-attn-4 block-sparse forward (Hopper or newer, block 128, head dim <= 128)"
        reason = "flash_attn.cute does not import"
    return "triton", f"Triton kernel: {reason}"


def choose_sparse_backend(
    q: torch.Tensor, k: torch.Tensor, structure: BlockStructure, key_start: Optional[torch.Tensor]
) -> tuple[str, str]:
    """(backend, reason) for the block-sparse forward of q [B, q_len, Hq, D] over k [B, k_len, Hkv, D]."""
    block_size, head_dim, padded = structure.grid.block_size, q.shape[-1], key_start is not None
    if q.is_cuda and q.dtype in KERNEL_DTYPES:
        if torch.compiler.is_compiling():
            # Decided before any device query, so nothing but this branch is traced.
            return "triton", f"Triton kernel: {COMPILE_REASON}"
        short = structure.grid.k_len < FA4_SPARSE_FROM
        return _cuda_sparse_backend(q.device.index, q.dtype, block_size, head_dim, padded, short)
    # The PyTorch path, whatever the capability.
    return sparse_backend_for(KernelCase(q.device.type, None, q.dtype, block_size, head_dim, padded))


@functools.lru_cache(maxsize=256)
def _cuda_sparse_backend(
    index: int, dtype: torch.dtype, block_size: int, head_dim: int, padded: bool, short: bool = False
) -> tuple[str, str]:
    """:func:`sparse_backend_for` of an eager fp16/bf16 call on CUDA device ``index``, cached by the values it
    depends on: the capability and ``fa4_available()`` are constant for the process, so a prefill builds no
    KernelCase and queries no device."""
    return sparse_backend_for(KernelCase("cuda", cuda_capability(index), dtype, block_size, head_dim, padded),
                              short=short)


def dense_backend_for(
    device_type: str,
    capability: Optional[tuple[int, int]],
    dtype: torch.dtype,
    head_dim: int,
    q_len: int,
    k_len: int,
    padded: bool,
    fa4: Availability = fa4_available,
    compiling: bool = False,
) -> str:
    """The dense backend for a case described by plain values (see the module docstring); ``compiling``:
    inside torch.compile tracing (flash-attn-4 is then not used)."""
    if padded:
        return "masked"
    if q_len == 1:
        return "sdpa"
    on_gpu = device_type == "cuda"
    fa4_case = (
        on_gpu
        and not compiling
        and dtype in KERNEL_DTYPES
        and capability is not None
        and tuple(capability) >= FA4_MIN_CAPABILITY
        and fa4_head_dim(head_dim)
    )
    if fa4_case and (fa4() if callable(fa4) else fa4):
        return "fa4"
    if q_len == k_len:
        return "sdpa_cudnn" if on_gpu else "sdpa"
    # Off the GPU, SDPA would build causal_lower_right's [q_len, k_len] mask: the chunked masked path does not.
    return "sdpa_lower_right" if on_gpu else "masked"


def choose_dense_backend(q: torch.Tensor, k: torch.Tensor, key_start: Optional[torch.Tensor]) -> str:
    """The dense causal backend for q [B, q_len, Hq, D] over k [B, k_len, Hkv, D]."""
    # Decode (every layer, every token) is decided before any device query.
    if key_start is not None:
        return "masked"
    q_len = q.shape[1]
    if q_len == 1:
        return "sdpa"
    if not q.is_cuda:
        # What dense_backend_for gives off the GPU, without its arguments: nothing else to decide there.
        return "sdpa" if q_len == k.shape[1] else "masked"
    compiling = torch.compiler.is_compiling()
    capability = None if compiling else compute_capability(q)  # no device query inside a traced graph
    return dense_backend_for(
        q.device.type, capability, q.dtype, q.shape[-1], q_len, k.shape[1], False, compiling=compiling
    )


def _sdpa_priority_supported() -> bool:
    """torch.nn.attention.sdpa_kernel takes ``set_priority`` (the list order as priority) in newer torch."""
    return "set_priority" in inspect.signature(sdpa_kernel).parameters


# Read once at import: dynamo cannot trace inspect.signature(sdpa_kernel), and the dense route runs inside
# torch.compile (sdpa_kernel itself, with set_priority, traces under fullgraph=True; tests/test_decode_path.py).
_SDPA_SET_PRIORITY = _sdpa_priority_supported()
# The priority order of cudnn_first, built once (sdpa_kernel copies the list it is given).
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cudnn_first():
    """A context in which SDPA tries cuDNN, then flash, then efficient, then math attention.

    Without ``set_priority`` (older torch) a no-op: all four stay enabled, in torch's own order.
    """
    if _SDPA_SET_PRIORITY:
        return sdpa_kernel(_CUDNN_FIRST, set_priority=True)
    return contextlib.nullcontext()


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Dense bottom-right causal attention by the backend :func:`choose_dense_backend` picks (or ``backend``).

    q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D] (any strides; Hq a multiple of Hkv, no K/V repeat); key_start
    optional int [B] of left padding. Returns [B, q_len, Hq, D] in q's dtype; rows with no real key are 0.
    No validation: the operator validates first.
    """
    # Decode first (every layer, every token), before any backend decision: choose_dense_backend picks "sdpa"
    # (or "masked" with padding) for one row, and both run here.
    if q.shape[1] == 1 and (backend is None or backend == "sdpa" or (backend == "masked" and key_start is not None)):
        # No causal mask (the row sees every key), at most a [B, k_len] padding mask.
        key_mask = None
        if key_start is not None:
            key_mask = torch.arange(k.shape[1], device=k.device)[None, :] >= key_start[:, None]
        out = decode_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale, key_mask)
        return out.transpose(1, 2)
    name = choose_dense_backend(q, k, key_start) if backend is None else backend
    if name == "masked":
        from .attention.block_sparse_torch import masked_attention_torch

        return masked_attention_torch(q, k, v, softmax_scale, key_start, None)
    if name == "fa4":
        from flash_attn.cute.interface import flash_attn_func

        return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=True)[0]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == "sdpa":
        # q_len > 1 here (one row went to decode_attention above), so q_len == k_len: top-left = bottom-right.
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=softmax_scale, enable_gqa=True)
    elif name == "sdpa_cudnn":
        with cudnn_first():
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=softmax_scale, enable_gqa=True)
    elif name == "sdpa_lower_right":
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(q.shape[1], k.shape[1])
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=softmax_scale, enable_gqa=True)
    else:
        raise ValueError(f"backend={name!r} is not a dense backend; expected one of {DENSE_BACKENDS}")
    return out.transpose(1, 2)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    softmax_scale: Optional[float],
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One query row per sequence over its whole cache, in transformers' layout: the call its ``sdpa`` makes.

    query [B, Hq, 1, D], key/value [B, Hkv, K, D] (Hq a multiple of Hkv; KV heads not repeated); softmax_scale
    None means 1 / sqrt(D); key_mask optional bool [B, K], True = a real key (left padding: the decode query,
    the last position, is real exactly when the last key is; a row of padding only outputs 0). Returns
    [B, Hq, 1, D] in query's dtype.

    Without a mask: one SDPA call with ``enable_gqa`` and no mask. With one: the G = Hq / Hkv query heads of a KV
    head become G query rows of that head (``[B, Hkv, G, D]``), so K/V are read once and the mask is the [B, K]
    row broadcast, never expanded over heads or repeated K/V. No host sync, no Python work that grows with K.
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(query, key, value, scale=softmax_scale, enable_gqa=True)
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    packed = query.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=key_mask[:, None, None, :], scale=softmax_scale)
    # A row with no real key is 0 by definition (SDPA may give NaN there, depending on the backend).
    out = torch.where(key_mask[:, -1, None, None, None], out, 0)
    return out.reshape(batch, q_heads, 1, head_dim)
