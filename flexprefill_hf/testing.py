"""Synthetic attention inputs that look like an LLM's: for tests, examples and benchmarks."""

from __future__ import annotations

import math
from typing import Optional

import torch


def structured_qkv(
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    q_len: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v with attention sinks, a local band and vertical stripes, in varying mixes per head.

    Returns q [batch, q_len, q_heads, head_dim] (the last q_len positions; default seq_len) and k, v
    [batch, seq_len, kv_heads, head_dim], contiguous in that layout.

    Construction, per KV head: half of the dims carry a rotary code of the position (q and k share a
    content vector, so q_t . k_s grows as |t - s| shrinks: a local band); a "sink" direction u is added
    to the first 4 keys and to about 1 % of the keys (vertical stripes, isolated keys) and to every query;
    the rest is noise. The weights of the three parts vary across heads, so some heads are local, some
    striped, some diffuse.
    """
    return _synthetic_qkv(batch, seq_len, q_heads, kv_heads, head_dim, q_len, dtype, device, generator, run=1)


def clustered_qkv(
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    q_len: Optional[int] = None,
    run: int = 16,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`structured_qkv`, but the vertical stripes come in runs of ``run`` consecutive keys (default 16).

    Same shapes and layout. About 1 % of the positions start a run, so about ``run`` % of the keys are striped,
    in contiguous clusters, as retrieval heads of trained models show (a passage, not scattered tokens):
    the stripe mass then falls into few key blocks, which is what block-sparse selection exploits.
    """
    if not isinstance(run, int) or isinstance(run, bool) or run < 1:
        raise ValueError(f"run={run!r} is not supported; expected an int >= 1")
    return _synthetic_qkv(batch, seq_len, q_heads, kv_heads, head_dim, q_len, dtype, device, generator, run=run)


def _synthetic_qkv(batch, seq_len, q_heads, kv_heads, head_dim, q_len, dtype, device, generator, run: int):
    """The construction of :func:`structured_qkv`; ``run`` > 1 widens each stripe start to ``run`` keys."""
    q_len = seq_len if q_len is None else q_len
    g = generator
    # Built in float64 on the CPU for tests; in float32 on a GPU (benchmarks at 128K+ tokens).
    work = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    if g is not None and g.device != torch.device(device):
        g = torch.Generator(device=device).manual_seed(g.initial_seed())
    groups = q_heads // kv_heads
    half = head_dim // 2
    pos = torch.arange(seq_len, dtype=work, device=device)
    freqs = 1.0 / (64.0 ** (torch.arange(half // 2, dtype=work, device=device) / max(half // 2, 1)))
    angles = pos[:, None] * freqs[None, :]  # [n, half/2]
    rot_cos, rot_sin = torch.cos(angles), torch.sin(angles)

    def rotate(content: torch.Tensor) -> torch.Tensor:  # content [..., half] -> position-coded [n, ..., half]
        a, b = content[..., 0::2], content[..., 1::2]
        shape = (seq_len,) + (1,) * (content.dim() - 1) + (half // 2,)
        c, s = rot_cos.view(shape), rot_sin.view(shape)
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    local_w = 1.0 + torch.rand(batch, kv_heads, generator=g, dtype=work, device=device) * 2.0
    sink_w = torch.rand(batch, kv_heads, generator=g, dtype=work, device=device) * 2.0
    content = torch.randn(batch, kv_heads, half, generator=g, dtype=work, device=device)
    code = rotate(content)  # [n, B, Hkv, half]
    code = code.permute(1, 0, 2, 3) * local_w[:, None, :, None]  # [B, n, Hkv, half]
    u = torch.randn(batch, kv_heads, head_dim, generator=g, dtype=work, device=device)
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(head_dim)

    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=g, dtype=work, device=device) * 0.5
    k[..., :half] += code
    striped = torch.rand(batch, seq_len, generator=g, device=device) < 0.01
    if run > 1:  # key t is striped when a run starts at one of t - run + 1 .. t (a sliding max over the starts)
        starts = torch.nn.functional.pad(striped.float()[:, None], (run - 1, 0))
        striped = torch.nn.functional.max_pool1d(starts, run, stride=1)[:, 0] > 0
    striped[:, :4] = True
    stripe_w = striped * (0.5 + torch.rand(batch, seq_len, generator=g, dtype=work, device=device))  # [B, n]
    stripe_w[:, :4] = 1.5
    k += (stripe_w[:, :, None, None] * sink_w[:, None, :, None]) * u[:, None]

    q = torch.randn(batch, seq_len, kv_heads, groups, head_dim, generator=g, dtype=work, device=device) * 0.5
    q[..., :half] += code[:, :, :, None]
    q += 0.5 * sink_w[:, None, :, None, None] * u[:, None, :, None]
    q = q.flatten(2, 3)[:, seq_len - q_len :]
    v = torch.randn(batch, seq_len, kv_heads, head_dim, generator=g, dtype=work, device=device)
    return (q.to(dtype).to(device).contiguous(), k.to(dtype).to(device).contiguous(), v.to(dtype).to(device).contiguous())
