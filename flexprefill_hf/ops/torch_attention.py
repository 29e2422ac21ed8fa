"""Attention in plain PyTorch (SDPA): dense causal attention, and block-sparse attention on CPU.

Used for decode, short prompts and dtypes the Triton kernel does not take, and as the CPU path of
the operator. Masks are built one chunk of query rows at a time, so memory stays O(chunk * n),
never O(n^2). Layout everywhere: q [B, q_len, Hq, D], k/v [B, n, Hkv, D], queries at the last
q_len positions (bottom-right causal), query head h reads KV head h // (Hq // Hkv).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from .block_structure import BlockStructure, structure_to_block_mask

# Bytes of boolean mask built per chunk of query rows.
_MASK_CHUNK_BYTES = 1 << 27


def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    return flash_attn_func


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense causal attention -> [B, q_len, Hq, D] in q's dtype; rows with no real key are 0.

    flash-attn when importable (CUDA, fp16/bf16, no padding), else torch SDPA with ``enable_gqa``.
    """
    if key_start is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q, k, v, softmax_scale=softmax_scale, causal=True)  # bottom-right aligned
    if key_start is None and q.shape[1] == k.shape[1]:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale, enable_gqa=True
        )
        return out.transpose(1, 2)
    return masked_attention(q, k, v, softmax_scale, key_start, None)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The function of the Triton kernel, in PyTorch: causal attention over the selected blocks only."""
    return masked_attention(q, k, v, softmax_scale, key_start, structure)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    key_start: Optional[torch.Tensor],
    structure: Optional[BlockStructure],
) -> torch.Tensor:
    """Causal (and, given a structure, block-sparse) attention, one chunk of query rows at a time."""
    batch, q_len, q_heads, _ = q.shape
    n = k.shape[1]
    cache = n - q_len
    device = q.device
    key_pos = torch.arange(n, device=device)
    key_valid = None if key_start is None else key_pos[None, :] >= key_start.to(device)[:, None]  # [B, n]
    if structure is not None:
        grid = structure.grid
        block_mask = structure_to_block_mask(structure)  # [B, Hq, nqb, nb]
        key_block = (key_pos + grid.pad) // grid.block_size
    heads_in_mask = q_heads if structure is not None else 1
    chunk = max(1, min(q_len, _MASK_CHUNK_BYTES // max(1, batch * heads_in_mask * n)))
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    out = torch.empty_like(q)
    for r0 in range(0, q_len, chunk):
        r1 = min(r0 + chunk, q_len)
        q_pos = torch.arange(r0, r1, device=device) + cache
        mask = (key_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, c, n]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :]
        if structure is not None:
            q_block = (q_pos + grid.pad) // grid.block_size - grid.first_query_block
            mask = mask & block_mask[:, :, q_block][..., key_block]  # [B, Hq, c, n]
        o = F.scaled_dot_product_attention(
            q[:, r0:r1].transpose(1, 2), kh, vh, attn_mask=mask, scale=softmax_scale, enable_gqa=True
        )
        # A row with no key gives NaN in SDPA; the operator defines it as 0.
        o = torch.where(mask.any(-1, keepdim=True), o, 0)
        out[:, r0:r1] = o.transpose(1, 2)
    return out
