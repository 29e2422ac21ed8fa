"""Facts about the runtime the kernels depend on, each stated once.

Every module that asks "is Triton interpreting?", "which dtypes does a kernel take?", "which block
sizes exist?" or "which GPU is this?" imports the answer from here.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

# Dtypes the Triton kernels take (q, k, v); fp32/fp64 inputs run the PyTorch paths.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Tokens per block: the kernels' tiles divide these, and FlexPrefillConfig accepts only these.
SUPPORTED_BLOCK_SIZES = (64, 128)
# Largest head dim the kernels take (the accumulator of a [BLOCK_M, D] tile must fit in registers).
MAX_HEAD_DIM = 256
# log2(e): the kernels compute softmax with exp2, so scores are scaled by softmax_scale * LOG2E.
LOG2E = math.log2(math.e)
# ln(2): turns a log2-unit log-sum-exp back into natural units.
LN2 = math.log(2.0)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``).

    Read at call time, not import time: tests set the variable before the first launch.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_capability(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """(major, minor) of the CUDA device holding ``t``, or None for a tensor not on a CUDA device.

    The one capability query of the package (backend choice, tuning tables). Not traceable: callers inside
    ``torch.compile`` decide before asking.
    """
    if t.device.type != "cuda":
        return None
    return cuda_capability(t.device.index)  # a CUDA tensor's device always has an index


@functools.lru_cache(maxsize=64)
def cuda_capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device ``index``: constant for the process and asked on every prefill, so one
    driver query per device."""
    return torch.cuda.get_device_capability(index)


def is_hopper(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a compute capability 9.0 GPU (H100/H200), where the tuning tables were measured."""
    return compute_capability(t) == (9, 0)


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 dispatch through Triton's JIT wrapper on the
# host, ~2.5 µs a call in triton 3.6; the selection and the launchers make ~20 such calls on every prefill.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for Python ints (b > 0), as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as ``triton.next_power_of_2``."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
