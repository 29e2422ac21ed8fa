"""Shared test utilities."""

from __future__ import annotations

import contextlib

import torch


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_qkv(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype=torch.float32, scale=1.0, seed=0):
    """Fresh Gaussian q [B, q_len, Hq, D], k, v [B, k_len, Hkv, D]."""
    g = seeded(seed)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=g, dtype=torch.float64) * scale
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=g, dtype=torch.float64) * scale
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf, so it can never pass."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@contextlib.contextmanager
def poisoned_empty():
    """Make torch.empty / empty_like return NaN-filled memory, so unwritten outputs fail loudly."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
