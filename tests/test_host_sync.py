"""No host synchronisation on the CUDA prefill path, checked without a GPU.

On CUDA a host sync is any read of a tensor's value by Python (``item``, ``bool``, ``int``, ``tolist``, ...) or
an op whose output shape depends on values (``nonzero``, boolean indexing, ``masked_select``, ``unique``,
``repeat_interleave`` by a tensor). Here the functions the CUDA path runs (the selection with its Triton stages,
the Triton kernel launcher, flash-attn-4's tile mapping) run on CPU tensors, the Triton kernels interpreted,
while every such conversion and op outside a kernel launch is recorded: none may happen. The interpreter's own
work inside a launch is no device op on CUDA, so it is not counted. (tests/test_gpu.py checks the same on the
GPU with torch.cuda.set_sync_debug_mode("error").)
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch

from flexprefill_hf import FlexPrefillConfig
from flexprefill_hf.ops.attention import block_sparse_fa4 as fa4
from flexprefill_hf.ops.runtime import interpreting
from flexprefill_hf.ops.selection import coverage_triton, select_blocks

from helpers import random_qkv

# CPU tensors through Triton's interpreter; with a GPU (no interpreter) tests/test_gpu.py checks the real thing.
pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (CPU tensors through Triton)")

_CONVERSIONS = ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__",
                "masked_select")
_VALUE_SHAPED = ("nonzero", "argwhere", "masked_select", "unique", "repeat_interleave")


@contextlib.contextmanager
def host_reads():
    """Record (what, where) for every read of tensor values by Python and value-shaped op outside Triton
    launches, into the yielded list."""
    import triton.runtime.interpreter as interpreter

    found, depth = [], [0]

    def record(what):
        if depth[0] == 0:
            found.append((what, "".join(traceback.format_stack(limit=5)[:-2])))

    def method(name, real):
        def wrapped(self, *args, **kwargs):
            record(f"Tensor.{name}")
            return real(self, *args, **kwargs)
        return wrapped

    def function(name, real):
        def wrapped(*args, **kwargs):
            if name != "repeat_interleave" or (len(args) > 1 and isinstance(args[1], torch.Tensor)):
                record(f"torch.{name}")
            return real(*args, **kwargs)
        return wrapped

    def by_bool(index):
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    real_get, real_set = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem(self, index):
        if by_bool(index):
            record("boolean indexing")
        return real_get(self, index)

    def setitem(self, index, value):
        if by_bool(index):
            record("boolean index assignment")
        if not isinstance(value, torch.Tensor):
            # t[i] = 3 copies a host scalar into the tensor: on CUDA a copy that synchronises (fill_ does not)
            record("assignment of a Python value")
        return real_set(self, index, value)

    launch = interpreter.InterpretedFunction.run

    def counted_launch(self, *args, **kwargs):
        depth[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            depth[0] -= 1

    methods = {name: getattr(torch.Tensor, name) for name in _CONVERSIONS}
    functions = {name: getattr(torch, name) for name in _VALUE_SHAPED}
    try:
        for name, real in methods.items():
            setattr(torch.Tensor, name, method(name, real))
        for name, real in functions.items():
            setattr(torch, name, function(name, real))
        torch.Tensor.__getitem__, torch.Tensor.__setitem__ = getitem, setitem
        interpreter.InterpretedFunction.run = counted_launch
        yield found
    finally:
        for name, real in methods.items():
            setattr(torch.Tensor, name, real)
        for name, real in functions.items():
            setattr(torch, name, real)
        torch.Tensor.__getitem__, torch.Tensor.__setitem__ = real_get, real_set
        interpreter.InterpretedFunction.run = launch


def test_the_trap_sees_what_a_host_sync_is():
    x = torch.arange(6.0)
    with host_reads() as found:
        float(x.sum())
        x[x > 2]
        torch.nonzero(x)
        torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1, 1, 1]))
        x.tolist()
        x.sum(-1)  # device ops: nothing
        x.repeat_interleave(2)
    assert [what for what, _ in found] == ["Tensor.__float__", "boolean indexing", "torch.nonzero",
                                           "torch.repeat_interleave", "Tensor.tolist"]


@pytest.mark.parametrize(
    "q_len,k_len,starts,split,stages",
    [
        (512, 512, None, False, "triton"),  # aligned
        (500, 500, None, False, "triton"),  # a partial first block
        (300, 700, None, False, "triton"),  # a prefill on a cache
        (450, 450, [0, 130], False, "triton"),  # left padding
        (260, 260, [0, 70], True, "triton"),  # the split coverage search (long rows) forced
        (500, 500, None, False, "compose"),  # the sort-based stages (CUDA from 64K keys)
        (450, 450, [0, 130], False, "compose"),
    ],
)
def test_selection_on_the_cuda_stages_reads_no_value(q_len, k_len, starts, split, stages, monkeypatch):
    if split:
        monkeypatch.setattr(coverage_triton, "SPLIT_FROM", 8)
        # Two segments of the 260-key rows, the last partial (96 made three; each costs an interpreted program per
        # row and launch): still many programs per row, all of the split path's host code.
        monkeypatch.setattr(coverage_triton, "_SEGMENT", 160)
    batch = 1 if starts is None else len(starts)
    q, k, _ = random_qkv(batch, q_len, k_len, 4, 2, 64, dtype=torch.float16, scale=1.5, seed=k_len)
    key_start = None if starts is None else torch.tensor(starts)
    config = FlexPrefillConfig(block_size=64, min_budget=64, tau=0.5)
    kwargs = dict(scores_backend="triton", structure_backend=stages)
    select_blocks(q, k, config, 0.125, key_start, **kwargs)  # compiles the kernels outside the trap
    with host_reads() as found:
        selection = select_blocks(q, k, config, 0.125, key_start, **kwargs)
    assert not found, found[0]
    assert selection.query_aware.any() or split  # the query-aware stages ran too (τ 0.5)


@pytest.mark.parametrize("n", [4000, 4096, 300])  # pieces merged by log-sum-exp; one call; block 0 only
def test_flash_attn_4_tile_mapping_reads_no_value(n):
    """The FA4 adapter's own work (block lists, pieces, merge), with FA4 itself stubbed."""
    q, k, v = random_qkv(1, n, n, 4, 2, 64, dtype=torch.float16, seed=n)
    config = FlexPrefillConfig(block_size=128, min_budget=128, tau=0.5)
    structure = select_blocks(q, k, config, 0.125, scores_backend="triton", structure_backend="triton").structure

    def attend(q, k, v, lists, causal):  # shapes only: FA4 runs on the GPU
        return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    with host_reads() as found:
        fa4.run_pieces(q, k, v, structure, attend, with_lse=True)
    assert not found, found[0]


def test_triton_kernel_launcher_reads_no_value():
    from flexprefill_hf.ops.attention.block_sparse_triton import _block_sparse_attention_triton

    q, k, v = random_qkv(2, 300, 300, 4, 2, 32, dtype=torch.float16, seed=5)
    key_start = torch.tensor([0, 70])
    config = FlexPrefillConfig(block_size=64, min_budget=64)
    structure = select_blocks(q, k, config, 0.125, key_start, scores_backend="triton",
                              structure_backend="triton").structure
    _block_sparse_attention_triton(q, k, v, structure, 0.125, key_start)
    with host_reads() as found:
        _block_sparse_attention_triton(q, k, v, structure, 0.125, key_start)
    assert not found, found[0]
