"""Block-sparse causal attention through flash-attn-4 (the CuTe-DSL FlashAttention), ops/README.md §6.

Same contract as ``block_sparse_triton.block_sparse_attention_triton``: q ``[B, q_len, Hq, D]``, k and v
``[B, k_len, Hkv, D]`` (fp16/bf16, CUDA, any strides with unit last stride), query head h reads KV head
``h // (Hq // Hkv)``, query row r sits at key position ``k_len - q_len + r``, and ``structure`` lists per
(batch, query head, present query block) the ascending key blocks of the END-ALIGNED grid (``ops/grid.py``).
A row attends key t iff t <= its position and block(t) is listed for its query block; a row with none
outputs 0. The oracle is ``reference.block_sparse_attention_reference``. Left padding is not taken here
(:func:`supports` says so and ``ops/backends.py`` routes it to the Triton kernel).

What flash-attn-4 offers (read from ``flash-attn-4==4.0.0b36``; paths inside the wheel, line numbers of
that version):

* ``flash_attn/cute/interface.py`` ``flash_attn_func`` (l. 4145) takes ``block_sparse_tensors`` and
  ``return_lse`` and returns ``(out, lse)``, lse fp32 ``[B, Hq, q_len]`` (l. 867). ``causal=True`` is
  bottom-right aligned (mask.py l. 300: the column limit is ``row + 1 + seqlen_k - seqlen_q``), so a suffix
  slice of q against a suffix slice of k keeps the causal relation. GQA by ``Hq % Hkv == 0`` without repeating
  K/V (l. 846). Inputs are used in place when their last stride is 1 and pointer and strides are 16-byte
  aligned (cute_dsl_utils.py l. 87 ``maybe_contiguous``), otherwise copied. q_len 0 or k_len 0 returns zeros
  (l. 897).
* ``flash_attn/cute/block_sparsity.py`` ``BlockSparseTensorsTorch`` (l. 39): ``mask_block_cnt`` int32
  ``[B, H, M]``, ``mask_block_idx`` int32 ``[B, H, M, N']`` with ``N' <= N`` (only the first cnt entries are
  read, l. 271 and l. 400), the same for ``full_block_*``, and ``block_size=(q, kv)``. B and H may be 1
  (broadcast, l. 386-397), but only a head dim of 1 keeps PackGQA on (interface.py l. 1133-1137); per-head lists
  (ours) run without it. M must equal ``ceil(q_len / block_q)`` and N ``ceil(k_len / block_kv)``: the tiles
  start at token 0 of the q and k tensors passed, not at the end (block_sparsity.py l. 372-373).
* Tiles on SM90 (interface.py l. 151-197): d <= 128 with sparse blocks of 128 gives 128 x 128 tiles (the 192-row
  tile of d <= 96 is dropped because 128 % 192 != 0); d > 128 uses tile_n 112/80, which a 128 sparse kv block
  does not match (block_sparsity.py l. 581-590 raises on SM90), so d > 128 is not taken. Sparse blocks of 64
  would shrink the tiles to 64 x 64 (l. 186-197): not measured, so block size 64 is not taken either. Head
  dims 8..256, multiple of 8 for 16-bit types (l. 121-139).
* In the SM90 block-sparse main loop (flash_fwd_sm90.py l. 1200-1225, block_sparse_utils.py l. 431-617) masked
  blocks are processed first, then full ones, each list from its last entry down; the causal mask function is
  applied to every block of both lists, the kv-length mask to the first block processed, and ``mask_mod`` only
  to masked blocks. A tile with no block gets O = 0 and lse = -inf (block_sparse_utils.py l. 616,
  flash_fwd_sm90.py l. 1230-1232, softmax.py l. 276-287). We still list as *full* only blocks wholly visible,
  so the mapping is also right where full blocks skip masking (SM100).
* Varlen (``flash_attn_varlen_func``, l. 4214) takes block sparsity with ``cu_total_m_blocks`` and
  ``cu_block_idx_offsets`` (block_sparsity.py l. 591-602; interface.py l. 1138-1149), but each sequence's tiles
  then start at its own first token: for a left-padded sequence at ``key_start[b]``, a value on the device. So
  the tile alignment against our grid would depend on data. ``seqused_k`` cuts keys at the end, not the start.
  ``mask_mod`` + ``aux_tensors`` (a CuTe-DSL callable) could mask a per-sequence prefix inside masked blocks;
  it is not used here: left padding runs the Triton kernel.
* flash-attn-4 registers no ``torch.library`` custom op, so its launch cannot be traced: called inside a trace
  the backend choice picks the Triton kernel (``ops/backends.py``). The operator under ``torch.compile`` runs
  its whole sparse route as our own custom op (``ops/compiled.py``), inside which this adapter runs eagerly.

The mapping (exact for every length, no host sync, all (batch, head) at once):
our blocks end at ``k_len``, FA4's tiles start at 0. With ``r = k_len % block`` keys in our partial block 0
and ``s`` query rows before the first block boundary at or after the first query, the slices
``q[:, s:]`` and ``k[:, r:]`` start on block boundaries of our grid, so FA4's tiles over them ARE our blocks
``1..`` (or ``0..`` when r = 0): the diagonal block of each query block is its one masked block, every listed
block before it a full block (blocks after it see nothing causally and are dropped). What the slices leave out
runs as up to three small pieces, merged by log-sum-exp:

* main: rows ``s:``, keys ``r:``, block-sparse (absent when q_len = s);
* head: rows ``:s`` (one partial query block), keys ``r : k_len - q_len + s``, block-sparse over that block's
  list (absent when s = 0, or when those rows lie in our block 0, which only sees block 0);
* block 0 (only when r > 0): every row against the r keys of our block 0, dense (causal for the rows inside
  block 0), kept only for the rows whose query block lists block 0 (the sink, always selected by
  ``select_blocks`` without padding; gated here anyway, so any structure is honoured).

When ``k_len % block == 0`` and ``(k_len - q_len) % block == 0`` the main piece is all: one FA4 call, its output
returned as is. Otherwise the extra pieces cost two or three more launches on small inputs and one pass over
the output to merge (``benchmarks/bench_decode.py --sparse`` times both kinds of length). The mapping and the
merge are checked on CPU against the float64 reference through an emulation of FA4's tile semantics, the real
kernel by the GPU tests (``tests/test_fa4_adapter.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import torch

from ..block_structure import BlockStructure
from ..grid import BlockGrid
from ..runtime import KERNEL_DTYPES, compute_capability
from ..validation import check_attention_inputs, check_softmax_scale, check_structure

# Our block sizes FA4 is used for: 128 maps onto its 128 x 128 SM90 tiles (64 would need 64 x 64 tiles: unmeasured).
FA4_BLOCK_SIZES = (128,)
# Head dims whose SM90 tiles are 128 wide in kv (interface.py _tile_size_fwd_sm90): a multiple of 8 in [16, 128].
FA4_MAX_HEAD_DIM = 128
# Oldest compute capability taken (Hopper); measured on the H200 (9.0) only.
FA4_MIN_CAPABILITY = (9, 0)
# flash-attn-4 4.0.0b36 registers no torch custom op: dynamo would trace into the CuTe DSL and break the graph.
COMPILE_REASON = "under torch.compile: flash-attn-4 registers no custom op, so its launch cannot be traced"


@functools.lru_cache(maxsize=None)
def fa4_available() -> bool:
    """True when ``flash_attn.cute`` and its block-sparsity module import (imported once, lazily; never raises).

    Importing them loads the CUTLASS DSL, a few seconds: callers check the cheap conditions (CUDA, dtype,
    compute capability) first.
    """
    try:
        import flash_attn.cute.block_sparsity  # noqa: F401
        import flash_attn.cute.interface  # noqa: F401
    except Exception:  # any failure (missing wheel, missing CUDA libs, ABI mismatch) means "not available"
        return False
    return True


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """What the backend choice looks at: plain values, no tensors (so it is testable without a GPU).

    capability: (major, minor) of the CUDA device, None off CUDA; padded: key_start is given; compiling: inside
    torch.compile tracing.
    """

    device_type: str
    capability: Optional[tuple[int, int]]
    dtype: torch.dtype
    block_size: int
    head_dim: int
    padded: bool
    compiling: bool = False

    @classmethod
    def of(cls, q: torch.Tensor, structure: BlockStructure, key_start: Optional[torch.Tensor]) -> "KernelCase":
        return cls(
            q.device.type, compute_capability(q), q.dtype, structure.grid.block_size, q.shape[-1],
            key_start is not None, torch.compiler.is_compiling(),
        )


def unsupported_reason(case: KernelCase) -> Optional[str]:
    """Why flash-attn-4 does not take ``case``, or None when it does (if it imports)."""
    if case.device_type != "cuda":
        return f"tensors on {case.device_type}; flash-attn-4 needs CUDA"
    if case.dtype not in KERNEL_DTYPES:
        return f"dtype {case.dtype} is not one of {KERNEL_DTYPES}"
    if case.capability is None or tuple(case.capability) < FA4_MIN_CAPABILITY:
        return f"compute capability {case.capability} is below {FA4_MIN_CAPABILITY}"
    if case.block_size not in FA4_BLOCK_SIZES:
        return f"block_size={case.block_size}: flash-attn-4 is used for block sizes {FA4_BLOCK_SIZES} only"
    if not fa4_head_dim(case.head_dim):
        return f"head_dim={case.head_dim}: flash-attn-4 is used for a multiple of 8 in [16, {FA4_MAX_HEAD_DIM}]"
    if case.padded:
        return "left padding (key_start): flash-attn-4 cannot mask a per-sequence key prefix on our grid"
    if case.compiling:
        return COMPILE_REASON
    return None


def fa4_head_dim(head_dim: int) -> bool:
    """Head dims flash-attn-4 is used for (sparse and dense): a multiple of 8 in [16, FA4_MAX_HEAD_DIM]."""
    return head_dim % 8 == 0 and 16 <= head_dim <= FA4_MAX_HEAD_DIM


def supports(
    q: torch.Tensor, k: torch.Tensor, structure: BlockStructure, key_start: Optional[torch.Tensor] = None
) -> tuple[bool, str]:
    """(True, what runs) when :func:`block_sparse_attention_fa4` takes this case, else (False, why not).

    Decided from devices, dtypes and shapes only (no host sync); ``fa4_available()`` is asked last. Every
    length is taken (the mapping is exact for all; see the module docstring).
    """
    reason = unsupported_reason(KernelCase.of(q, structure, key_start))
    if reason is None and not fa4_available():
        reason = "flash_attn.cute does not import (pip install flash-attn-4 and nvidia-cutlass-dsl[cu13])"
    if reason is not None:
        return False, reason
    split = Fa4Split.of(structure.grid)
    how = "one call" if split.aligned else "sliced to FA4's tiles, pieces merged by log-sum-exp"
    return True, f"flash-attn-4 block-sparse forward ({how})"


# ---------------------------------------------------------------------------------------------
# The mapping: pure torch, runs on any device (CPU in the tests)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fa4Split:
    """How one grid splits into FA4-aligned pieces (see the module docstring); all host integers.

    r: keys of our partial block 0 (``k_len % block``; 0 when the grid has none).
    s: query rows before the first block boundary at or after the first query.
    shift: 1 when r > 0 (FA4 tile n over ``k[:, r:]`` is our block n + 1), else 0.
    has_head: the rows ``:s`` run as their own block-sparse piece.
    """

    r: int
    s: int
    shift: int
    has_head: bool

    @classmethod
    def of(cls, grid: BlockGrid) -> "Fa4Split":
        r = grid.k_len % grid.block_size
        s = (-(grid.cache_len + grid.pad)) % grid.block_size
        shift = 1 if r > 0 else 0
        # Rows in our block 0 (possible only when it is partial) see block 0 alone: the block-0 piece covers them.
        has_head = s > 0 and not (shift == 1 and grid.first_query_block == 0)
        return cls(r=r, s=min(s, grid.q_len), shift=shift, has_head=has_head)

    @property
    def aligned(self) -> bool:
        """One FA4 call computes everything: our grid and FA4's tiles coincide."""
        return self.r == 0 and self.s == 0


def fa4_block_lists(
    indices: torch.Tensor, counts: torch.Tensor, first_diagonal: int, shift: int, num_tiles: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4's (mask_cnt, mask_idx, full_cnt, full_idx) for rows of our structure.

    indices int32 [B, H, R, nb] (ascending, -1 padded) and counts int32 [B, H, R]: R consecutive structure rows,
    the first with diagonal grid block ``first_diagonal``. FA4 tile n is our block ``n + shift``; blocks below
    ``shift`` belong to another piece. Returns int32 contiguous mask_cnt [B, H, R], mask_idx [B, H, R, 1] (the
    diagonal tile, listed when the diagonal block is), full_cnt [B, H, R], full_idx [B, H, R, num_tiles] (the
    listed blocks strictly before the diagonal, ascending; entries past full_cnt are -1).
    """
    batch, heads, rows, nb = indices.shape
    device = indices.device
    slot = torch.arange(nb, device=device, dtype=torch.int32)
    valid = slot < counts[..., None]  # [B, H, R, nb]
    diagonal = (torch.arange(rows, device=device, dtype=torch.int32) + first_diagonal)[:, None]  # [R, 1]
    below_shift = (valid & (indices < shift)).sum(-1, dtype=torch.int32)  # 0 or 1 (block 0 leads the list)
    full_cnt = (valid & (indices >= shift) & (indices < diagonal)).sum(-1, dtype=torch.int32)
    mask_cnt = (valid & (indices == diagonal)).any(-1).to(torch.int32)
    # The full blocks are a run of the ascending list starting after the blocks below shift.
    tile_slot = torch.arange(num_tiles, device=device, dtype=torch.int32)
    source = (tile_slot + below_shift[..., None]).clamp(max=nb - 1).long()
    full_idx = torch.where(tile_slot < full_cnt[..., None], torch.gather(indices, -1, source) - shift, -1)
    mask_idx = (diagonal - shift).expand(rows, 1).expand(batch, heads, rows, 1)
    return mask_cnt, mask_idx.to(torch.int32).contiguous(), full_cnt, full_idx.to(torch.int32).contiguous()


def block0_row_gate(structure: BlockStructure) -> torch.Tensor:
    """bool [B, H, q_len]: query row r's block lists our block 0 (ascending lists: the first entry is 0)."""
    grid = structure.grid
    listed = (structure.counts > 0) & (structure.indices[..., 0] == 0)  # [B, H, nqb]
    rows = torch.arange(grid.q_len, device=listed.device)
    block_row = (rows + grid.cache_len + grid.pad) // grid.block_size - grid.first_query_block
    return listed[:, :, block_row]


def merge_by_lse(
    parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> torch.Tensor:
    """Combine attention over disjoint key sets: parts of (out [B, S, H, D], lse fp32 [B, H, S]) -> [B, S, H, D].

    A part with lse -inf (no key) weighs 0 whatever its out holds; a row with no key in any part is 0.
    """
    acc = torch.promote_types(dtype, torch.float32)  # fp32 for fp16/bf16 outputs
    lse = torch.stack([p[1] for p in parts]).to(acc)  # [P, B, H, S]
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight = torch.exp(lse - top)  # 0 for -inf
    weight = weight / weight.sum(0).clamp_min(torch.finfo(acc).tiny)
    out = None
    for (o, _), w in zip(parts, weight):
        w = w.transpose(1, 2)[..., None]  # [B, S, H, 1]
        term = torch.where(w > 0, o.to(acc) * w, 0.0)
        out = term if out is None else out + term
    return out.to(dtype)


# attend(q, k, v, lists or None, causal) -> (out [B, Sq, Hq, D], lse fp32 [B, Hq, Sq]); lists as fa4_block_lists.
Attend = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def run_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, structure: BlockStructure, attend: Attend, with_lse: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Split, map, attend, merge (module docstring). ``attend`` is FA4 on the GPU, an emulation in the tests.

    Returns (out [B, q_len, Hq, D] in q's dtype, lse fp32 [B, Hq, q_len] or None unless ``with_lse``).
    """
    grid = structure.grid
    split = Fa4Split.of(grid)
    bs, q_len, k_len = grid.block_size, grid.q_len, grid.k_len
    t0 = 1 if split.s > 0 else 0  # structure row of the first whole query block
    pieces_a = []  # the block-sparse pieces: (rows, out, lse), rows in order
    if q_len > split.s:
        rows = slice(t0, None)
        lists = fa4_block_lists(
            structure.indices[:, :, rows], structure.counts[:, :, rows], grid.first_query_block + t0, split.shift,
            (k_len - split.r) // bs,
        )
        pieces_a.append(attend(q[:, split.s:], k[:, split.r:], v[:, split.r:], lists, True))
    if split.has_head:
        key_end = grid.cache_len + split.s  # the end of the head rows' query block
        lists = fa4_block_lists(
            structure.indices[:, :, :1], structure.counts[:, :, :1], grid.first_query_block, split.shift,
            (key_end - split.r) // bs,
        )
        pieces_a.insert(0, attend(q[:, : split.s], k[:, split.r : key_end], v[:, split.r : key_end], lists, True))
    if split.aligned and not with_lse:
        return pieces_a[0][0], None
    if split.aligned:
        return pieces_a[0]
    batch, _, q_heads, head_dim = q.shape
    parts = []
    if pieces_a:
        out_a = pieces_a[0][0] if len(pieces_a) == 1 else torch.cat([p[0] for p in pieces_a], dim=1)
        lse_a = pieces_a[0][1] if len(pieces_a) == 1 else torch.cat([p[1] for p in pieces_a], dim=2)
        missing = q_len - out_a.shape[1]  # rows :s left to the block-0 piece
        if missing:
            out_a = torch.cat([out_a.new_zeros(batch, missing, q_heads, head_dim), out_a], dim=1)
            lse_a = torch.cat([lse_a.new_full((batch, q_heads, missing), -math.inf), lse_a], dim=2)
        parts.append((out_a, lse_a))
    if split.r > 0:
        # Rows inside block 0 (positions < r - 1) see part of it causally; all later rows see all of it.
        inside = max(0, min(q_len, split.r - 1 - grid.cache_len))
        k0, v0 = k[:, : split.r], v[:, : split.r]
        pieces_0 = []
        if inside:
            seen = grid.cache_len + inside  # keys up to the last of these rows
            pieces_0.append(attend(q[:, :inside], k0[:, :seen], v0[:, :seen], None, True))
        if q_len > inside:
            pieces_0.append(attend(q[:, inside:], k0, v0, None, False))
        out_0 = torch.cat([p[0] for p in pieces_0], dim=1) if len(pieces_0) > 1 else pieces_0[0][0]
        lse_0 = torch.cat([p[1] for p in pieces_0], dim=2) if len(pieces_0) > 1 else pieces_0[0][1]
        lse_0 = torch.where(block0_row_gate(structure), lse_0, -math.inf)
        parts.append((out_0, lse_0))
    if split.r == 0:  # head and main pieces only: disjoint rows, nothing to merge
        return parts[0][0], (parts[0][1] if with_lse else None)
    out = merge_by_lse(parts, q.dtype)
    if not with_lse:
        return out, None
    return out, torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)


# ---------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------


def _fa4_attend(softmax_scale: float, block_size: int) -> Attend:
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func

    def attend(q, k, v, lists, causal):
        sparse = None
        if lists is not None:
            mask_cnt, mask_idx, full_cnt, full_idx = lists
            sparse = BlockSparseTensorsTorch(
                mask_block_cnt=mask_cnt, mask_block_idx=mask_idx, full_block_cnt=full_cnt, full_block_idx=full_idx,
                block_size=(block_size, block_size),
            )
        return flash_attn_func(
            q, k, v, softmax_scale=softmax_scale, causal=causal, block_sparse_tensors=sparse, return_lse=True
        )

    return attend


def _check_inputs(q, k, v, structure, softmax_scale, key_start) -> None:
    """What the public functions check; the operator, which chose this backend, calls the unchecked one."""
    check_attention_inputs(q, k, v, key_start, kernel=True)
    check_structure(structure, q, k)
    check_softmax_scale(softmax_scale)
    ok, reason = supports(q, k, structure, key_start)
    if not ok:
        raise ValueError(f"block_sparse_attention_fa4 does not take this case: {reason}; use the Triton kernel")


def _block_sparse_attention_fa4(q, k, v, structure, softmax_scale, with_lse: bool = False):
    """:func:`block_sparse_attention_fa4` without validation (the caller validated and chose this backend:
    the operator, through ``backends.choose_sparse_backend``, with no left padding). Returns (out, lse or None)."""
    batch, q_len, q_heads, head_dim = q.shape
    if batch == 0 or q_len == 0:
        out = q.new_zeros(q.shape)
        return out, (q.new_full((batch, q_heads, q_len), -math.inf, dtype=torch.float32) if with_lse else None)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    return run_pieces(q, k, v, structure, _fa4_attend(scale, structure.grid.block_size), with_lse)


def block_sparse_attention_fa4(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention over the key blocks of ``structure``, by flash-attn-4 (see the module docstring).

    Args:
        q: [B, q_len, Hq, D] fp16/bf16 on a CUDA device of compute capability >= 9.0; D a multiple of 8 in
            [16, 128]. k, v: [B, k_len, Hkv, D], same dtype and device, Hq a multiple of Hkv, q_len <= k_len.
        structure: grid block size 128, ``grid.q_len == q_len``, ``grid.k_len == k_len``; indices int32
            [B, Hq, nqb, nb], counts int32 [B, Hq, nqb].
        softmax_scale: default 1 / sqrt(D).
        key_start: must be None (left padding runs the Triton kernel); accepted so the signature matches.
    Returns:
        out [B, q_len, Hq, D] in q's dtype; rows with no visible key are 0.
    Raises:
        ValueError when :func:`supports` says no (with its reason), or for bad input.
    """
    _check_inputs(q, k, v, structure, softmax_scale, key_start)
    return _block_sparse_attention_fa4(q, k, v, structure, softmax_scale)[0]


def block_sparse_attention_fa4_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    structure: BlockStructure,
    *,
    softmax_scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`block_sparse_attention_fa4`; also returns the natural log-sum-exp, fp32 [B, Hq, q_len]."""
    _check_inputs(q, k, v, structure, softmax_scale, key_start)
    return _block_sparse_attention_fa4(q, k, v, structure, softmax_scale, with_lse=True)
