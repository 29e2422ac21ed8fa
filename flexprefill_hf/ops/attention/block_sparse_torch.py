"""Block-sparse causal attention in plain PyTorch (SDPA): the CPU path of the operator (ops/README.md §6).

The function of the Triton kernel (``block_sparse_triton.py``), computed with SDPA on masks built one chunk
of query rows at a time, so memory stays O(chunk * n), never O(n^2). Layout everywhere: q [B, q_len, Hq, D],
k/v [B, n, Hkv, D], queries at the last q_len positions (bottom-right causal), query head h reads KV head
h // (Hq // Hkv). These functions do not validate: their callers (the operator) pass inputs checked by
``ops/validation.check_attention_inputs``. FlexPrefill is a prefill (inference) method: the operator
refuses inputs that require grad.

NaN/Inf inputs are not masked out: masks are additive -inf biases, and 0 * NaN is NaN, so a NaN in a key or
value of a chunk's visible range can reach every row of that chunk, also rows for which it is in the future
or padding (as in SDPA's math path). Rows of chunks that never compute its block stay unaffected.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..block_structure import BlockStructure, structure_to_block_mask

# Bytes of mask built per chunk of query rows, and the most rows in a chunk.
_MASK_CHUNK_BYTES = 1 << 28
_MAX_CHUNK_ROWS = 512


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    softmax_scale: float,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The function of the Triton kernel, in PyTorch: causal attention over the selected blocks only.

    q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D] in any float dtype; structure on the (q_len, k_len) grid;
    key_start int [B] or None. Returns [B, q_len, Hq, D] in q's dtype; rows with no real key are 0.
    Assumes what ``select_blocks`` guarantees: every real query row's diagonal block is selected.
    """
    return masked_attention_torch(q, k, v, softmax_scale, key_start, structure)


def masked_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    key_start: Optional[torch.Tensor],
    structure: Optional[BlockStructure],
) -> torch.Tensor:
    """Causal (and, given a structure, block-sparse) attention, one chunk of query rows at a time.

    q [B, q_len, Hq, D], k/v [B, k_len, Hkv, D] (any float dtype, one device); key_start int [B] or None;
    structure None (dense causal) or on the (q_len, k_len) grid. Returns [B, q_len, Hq, D] in q's dtype;
    rows with no real key (padding queries) are 0.

    Masks go to SDPA as additive float biases (on CPU about twice as fast as a bool mask). With a
    structure, a chunk is a run of whole query blocks and its bias is the block mask blown up tile by
    tile (one copy), rather than gathered element by element.
    """
    batch, q_len, q_heads, _ = q.shape
    n = k.shape[1]
    cache = n - q_len
    device = q.device
    key_pos = torch.arange(n, device=device)
    key_start = None if key_start is None else key_start.to(device)
    key_valid = None if key_start is None else key_pos[None, :] >= key_start[:, None]  # [B, n]
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    out = torch.empty_like(q)
    heads_in_mask = q_heads if structure is not None else 1
    # Small chunks let each one stop at its last visible key (the causal triangle: half the work).
    rows_per_chunk = max(1, min(_MAX_CHUNK_ROWS, _MASK_CHUNK_BYTES // max(1, 4 * batch * heads_in_mask * n)))
    if structure is None:
        bounds = [(r0, min(r0 + rows_per_chunk, q_len)) for r0 in range(0, q_len, rows_per_chunk)]
    else:
        grid = structure.grid
        bs, pad = grid.block_size, grid.pad
        # Additive bias per block pair, [B, Hq, nqb, nb]: 0 where computed, -inf elsewhere.
        block_bias = torch.zeros(structure.counts.shape + (grid.num_blocks,), dtype=q.dtype, device=device)
        block_bias.masked_fill_(~structure_to_block_mask(structure), float("-inf"))
        blocks_per_chunk = max(1, rows_per_chunk // bs)
        first_row = grid.first_query_block * bs - pad - cache  # query row of the first present block's row 0
        bounds = []
        for t0 in range(0, grid.num_query_blocks, blocks_per_chunk):
            t1 = min(t0 + blocks_per_chunk, grid.num_query_blocks)
            bounds.append((max(0, first_row + t0 * bs), min(q_len, first_row + t1 * bs), t0, t1))
    for bound in bounds:
        r0, r1 = bound[0], bound[1]
        k_end = cache + r1  # keys after the chunk's last query are invisible to all of it
        q_pos = torch.arange(r0, r1, device=device) + cache
        mask = (key_pos[None, :k_end] <= q_pos[:, None])[None, None]  # [1, 1, c, k_end]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :k_end]
        if structure is None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=device).masked_fill_(~mask, float("-inf"))
        else:
            t0, t1 = bound[2], bound[3]
            blocks = grid.first_query_block + t1  # key blocks up to the chunk's last query block
            tiles = block_bias[:, :, t0:t1, None, :blocks, None].expand(-1, -1, -1, bs, -1, bs)
            bias = tiles.reshape(batch, q_heads, (t1 - t0) * bs, blocks * bs)
            row_lo = r0 - (first_row + t0 * bs)  # rows of the chunk's first block before the first query
            bias = bias[:, :, row_lo : row_lo + (r1 - r0), pad : pad + k_end]  # a view of the fresh copy
            bias.masked_fill_(~mask, float("-inf"))
            if bias.is_cuda and pad:
                # SDPA's CUDA kernels read the mask with aligned vector loads: a view starting at column
                # ``pad`` crashed with "misaligned address" (H200, torch 2.11). The CPU path reads it in place.
                bias = bias.contiguous()
        o = F.scaled_dot_product_attention(
            q[:, r0:r1].transpose(1, 2), kh[:, :, :k_end], vh[:, :, :k_end], attn_mask=bias,
            scale=softmax_scale, enable_gqa=True,
        )
        # A row with no key (a padding query) gives NaN in SDPA; the operator defines it as 0. Every
        # real query sees at least itself: its diagonal block is always selected.
        if key_start is not None:
            real_row = q_pos[None, :] >= key_start[:, None]  # [B, c]
            o = torch.where(real_row[:, None, :, None], o, 0)
        out[:, r0:r1] = o.transpose(1, 2)
    return out
