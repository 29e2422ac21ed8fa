"""Shared test utilities."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

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


def poison_value(dtype: torch.dtype):
    """The fill for fresh memory of ``dtype``: NaN for floating/complex, the most negative value for signed
    integers (an index or count never written is then out of range), the largest for unsigned ones, None for
    bool (no value of a bool is wrong on its own)."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return None
    info = torch.iinfo(dtype)
    return info.min if info.min < 0 else info.max


@dataclass
class PoisonRecord:
    """What the poisoned allocator handed out while active: ``shapes`` lists the shape of every tensor that
    torch.empty / torch.empty_like / Tensor.new_empty returned, in order, ``dtypes`` their dtypes."""

    shapes: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)

    def allocated(self, shape, dtype=None) -> bool:
        """True if a tensor of this shape (and dtype, if given) came from the poisoned allocator."""
        shape = tuple(shape)
        return any(s == shape and (dtype is None or d == dtype) for s, d in zip(self.shapes, self.dtypes))


@contextlib.contextmanager
def poisoned_empty():
    """Poison fresh memory while active, so an output element that is never written fails loudly.

    torch.empty, torch.empty_like and Tensor.new_empty return tensors filled with :func:`poison_value`
    (NaN for floats, iinfo.min for signed integers). Yields a :class:`PoisonRecord`. The ``poison_empty``
    fixture in conftest.py is the usual way in; this context manager serves code that needs a narrower scope.
    """
    record = PoisonRecord()
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        value = poison_value(t.dtype)
        if value is not None:
            t.fill_(value)
        record.shapes.append(tuple(t.shape))
        record.dtypes.append(t.dtype)
        return t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison(real_new_empty(self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield record
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_empty_like, real_new_empty
