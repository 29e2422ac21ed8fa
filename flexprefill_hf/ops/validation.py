"""The one validator of attention inputs, shared by the operator, the PyTorch paths and the kernel launchers.

Each public entry validates once: the operator (and ``varlen``) check their inputs, then call the kernels'
unchecked launchers (``_block_sparse_attention_triton``, ``_block_sparse_attention_fa4``, ...) with a
structure they built; a kernel's public function, called directly, checks its own inputs.

Every message names the argument, the value received and what is allowed. Errors of type are TypeError,
errors of value or shape ValueError.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .runtime import KERNEL_DTYPES, MAX_HEAD_DIM, SUPPORTED_BLOCK_SIZES

# Dtypes the PyTorch paths (and so the operator) take; the kernels take only KERNEL_DTYPES.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KEY_START_DTYPES = (torch.int32, torch.int64)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_start: Optional[torch.Tensor] = None,
    *,
    kernel: bool = False,
) -> None:
    """Check q [B, q_len, Hq, D], k and v [B, k_len, Hkv, D] and the optional key_start int [B].

    Rules: tensors of 4 dims, one dtype (fp16/bf16/fp32/fp64; with ``kernel=True`` only fp16/bf16) and one
    device; k and v of equal shape; equal batch and head dim; Hq a multiple of Hkv; 1 <= q_len <= k_len
    (0 <= q_len with ``kernel=True``; the kernel returns an empty output). With ``kernel=True`` the head dim
    must also be a multiple of 8 in [16, MAX_HEAD_DIM]. Gradients are refused (FlexPrefill is a prefill,
    i.e. inference, method: nothing here has a backward pass).

    key_start: int32 or int64, shape [B], on q's device, ``0 <= key_start[b] <= k_len``; ``k_len`` is a
    sequence of padding only (e.g. an empty prompt in a left-padded batch: no real key, so every row of it
    outputs 0). The range check is eager on CPU (ValueError). On CUDA it is ``torch._assert_async`` on a
    device boolean: no host sync, the failure surfaces as a device-side assert (with the same message) at the
    next synchronising call, and it leaves the CUDA context unusable, as every device-side assert does.

    The valid case is decided by one expression (this runs on every decode step of every layer); only a
    failing input goes through the rules one by one, which raise in the order listed above.
    """
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
        q_shape, k_shape, dtype = q.shape, k.shape, q.dtype
        if (
            len(q_shape) == 4
            and len(k_shape) == 4
            and k_shape == v.shape
            and dtype in (KERNEL_DTYPES if kernel else SUPPORTED_DTYPES)
            and k.dtype == dtype
            and v.dtype == dtype
            and q.device == k.device == v.device
            and k_shape[0] == q_shape[0]
            and k_shape[3] == q_shape[3]
            and k_shape[2] > 0
            and q_shape[2] % k_shape[2] == 0
            and (0 if kernel else 1) <= q_shape[1] <= k_shape[1]
            and (not kernel or (q_shape[3] % 8 == 0 and 16 <= q_shape[3] <= MAX_HEAD_DIM))
            # requires_grad first: inference tensors never ask for the grad mode.
            and not ((q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled())
        ):
            if key_start is not None:
                check_key_start(key_start, q_shape[0], k_shape[1], q.device)
            return
    _raise_for_attention_inputs(q, k, v, kernel)
    # Every rule held after all (only an input that fails one gets here otherwise).
    if key_start is not None:
        check_key_start(key_start, q.shape[0], k.shape[1], q.device)


def _raise_for_attention_inputs(q, k, v, kernel: bool) -> None:
    """The rules of :func:`check_attention_inputs` one by one: raises for the first that fails."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} has type {type(t).__name__}; expected a torch.Tensor")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims [batch, seq, heads, head_dim]")
    allowed = KERNEL_DTYPES if kernel else SUPPORTED_DTYPES
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in allowed:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of {allowed}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); expected one device")
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; expected equal shapes")
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != batch:
        raise ValueError(f"q has batch {batch} but k has {k.shape[0]}; expected equal batch sizes")
    if k.shape[3] != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but k has {k.shape[3]}; expected equal head dims")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"q has {q_heads} heads and k has {kv_heads}; expected the query heads to be a multiple of the KV heads"
        )
    lowest = 0 if kernel else 1
    if not lowest <= q_len <= k_len:
        raise ValueError(f"q has {q_len} tokens and k has {k_len}; expected {lowest} <= q_len <= k_len")
    if kernel:
        check_kernel_head_dim(head_dim)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError(
            "FlexPrefill does not support gradients: it is a prefill (inference) method; q, k or v requires grad. "
            "Call it under torch.no_grad() / torch.inference_mode(), or detach the inputs"
        )


def check_kernel_head_dim(head_dim: int) -> None:
    """The head dims the kernels take: a multiple of 8 in [16, MAX_HEAD_DIM] (the PyTorch paths take any).

    The operator and ``varlen`` call it before a CUDA sparse call, whose kernel launchers they call unchecked.
    """
    if head_dim % 8 != 0 or not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} is not supported; expected a multiple of 8 in [16, {MAX_HEAD_DIM}]")


def check_key_start(key_start, batch: int, k_len: int, device: torch.device) -> None:
    """key_start: int32/int64 [batch] on ``device`` with 0 <= key_start[b] <= k_len (k_len: padding only; see
    :func:`check_attention_inputs` for how the range is checked on CUDA)."""
    if not isinstance(key_start, torch.Tensor) or key_start.dtype not in KEY_START_DTYPES:
        got = f"a tensor of dtype {key_start.dtype}" if isinstance(key_start, torch.Tensor) else type(key_start).__name__
        raise TypeError(f"key_start is {got}; expected an int32 or int64 tensor of shape ({batch},)")
    if key_start.shape != (batch,):
        raise ValueError(f"key_start has shape {tuple(key_start.shape)}; expected ({batch},)")
    if key_start.device != device:
        raise ValueError(f"key_start is on {key_start.device}; expected q's device {device}")
    if key_start.is_cuda or torch.compiler.is_compiling():
        # A device-side check: reading the values on the host would synchronise every prefill (and, under
        # torch.compile, be a data-dependent branch the graph cannot hold).
        in_range = key_start.clamp(0, k_len) == key_start  # [B]
        torch._assert_async(in_range.all(), _key_start_message(k_len))
    elif batch > 0:
        # One host read (a CPU tensor: no sync); batches are small, so Python's min/max is the cheap way.
        values = key_start.tolist()
        low, high = min(values), max(values)
        if low < 0 or high > k_len:
            bad = low if low < 0 else high
            raise ValueError(f"key_start has value {bad}: {_key_start_message(k_len)}")


def _key_start_message(k_len: int) -> str:
    return f"key_start out of range; expected 0 <= key_start[b] <= k_len = {k_len}"


def check_softmax_scale(softmax_scale) -> None:
    """softmax_scale: None or a finite real number (not a bool)."""
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale={softmax_scale!r} has type {type(softmax_scale).__name__}; expected a float or None")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale={softmax_scale!r} is not supported; expected a finite float")


def check_structure(structure, q: torch.Tensor, k: torch.Tensor) -> None:
    """A BlockStructure for q [B, q_len, Hq, D] and k [B, k_len, Hkv, D]: block size in SUPPORTED_BLOCK_SIZES,
    grid of (q_len, k_len), indices int32 [B, Hq, nqb, nb] and counts int32 [B, Hq, nqb] on q's device."""
    grid = getattr(structure, "grid", None)
    if grid is None or not hasattr(structure, "indices") or not hasattr(structure, "counts"):
        raise TypeError(f"structure has type {type(structure).__name__}; expected a BlockStructure")
    if grid.block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size={grid.block_size} is not supported; expected one of {SUPPORTED_BLOCK_SIZES}")
    q_len, k_len = q.shape[1], k.shape[1]
    if (grid.q_len, grid.k_len) != (q_len, k_len):
        raise ValueError(
            f"structure grid has q_len={grid.q_len}, k_len={grid.k_len}; expected the inputs' q_len={q_len}, k_len={k_len}"
        )
    expected = (q.shape[0], q.shape[2], grid.num_query_blocks, grid.num_blocks)
    for name, t, shape in (("indices", structure.indices, expected), ("counts", structure.counts, expected[:3])):
        if tuple(t.shape) != shape or t.dtype != torch.int32:
            raise ValueError(
                f"structure.{name} is {t.dtype} of shape {tuple(t.shape)}; expected torch.int32 of shape {shape}"
            )
        if t.device != q.device:
            raise ValueError(f"structure.{name} is on {t.device}; expected q's device {q.device}")
