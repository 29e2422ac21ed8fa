"""The selection replayed from CUDA graphs, where its launches cost more than its GPU work (ops/README.md, 19).

At 8K keys (32 query heads) one eager selection issues ~20 launches and ~30 other torch ops: 0.7 ms of host
time for 0.29 ms of GPU work on the H200 (benchmarks/RESULTS.md, 2026-12-03). Below ``GRAPHS_BELOW`` keys a
CUDA call therefore runs the selection from a graph captured on its second call with that key (the first runs
eagerly: a shape seen once costs no capture), replayed on later ones: the inputs are
copied into the graph's own buffers, the graph replays the same kernels in the same order (so the same
selection, bit for bit, as the eager call), and the outputs are copied out of the graph's memory, so that the
next replay (the next layer) cannot overwrite what a caller still holds.

The graphs are keyed by everything the captured work depends on that is not a tensor's values: shapes, dtypes,
device, stream, the configuration, the scale and the backend arguments. Module knobs of the kernels
(``scores_triton._SHARED_SKEW``, ``coverage_triton.SPLIT_FROM``, ...) are read at capture time: after changing
one, call :func:`clear`. At most ``MAX_GRAPHS`` are kept (least recently used first out); each holds a copy
of its keys (16 MB at 8K keys, 8 KV heads, d 128, bf16) and its intermediates.

Not used: on CPU, under ``torch.compile`` tracing, while the current stream is itself being captured (the
eager selection is capturable: the caller's graph takes it whole), with ``GRAPHS_BELOW = None``, or where a
capture failed once for a key (warned once; that key then runs eagerly, which gives the same result).
"""

from __future__ import annotations

import collections
import threading
import warnings
from typing import Callable, Hashable, Optional, Sequence

import torch

# Keys (k_len) below which a CUDA selection replays a graph; None: never. H200, 32 q / 8 kv heads, d 128, bf16, ms
# per call, graph / eager (benchmarks/RESULTS.md, 2026-12-03): 0.33 / 0.74 at 8K, 0.55 / 0.68 at 16K, 0.84 / 0.80
# at 24K, 1.14 / 1.10 at 32K, 2.22 / 1.72 at 64K: from ~20K on the eager call is GPU-bound and the copies in
# and out cost more than the launches they save.
GRAPHS_BELOW: Optional[int] = 20480
MAX_GRAPHS = 4

_lock = threading.Lock()
_graphs: "collections.OrderedDict[Hashable, Optional[_Captured]]" = collections.OrderedDict()  # None: failed
_seen: "collections.OrderedDict[Hashable, None]" = collections.OrderedDict()  # keys met once, not captured
_MAX_SEEN = 64


class _Captured:
    """One captured call: the graph, the buffers it reads its inputs from and the tensors it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple, outputs: tuple):
        self.graph = graph
        self.inputs = inputs  # static copies, None where the call's input was None
        self.outputs = outputs


def wanted(device: torch.device, k_len: int) -> bool:
    """Whether a selection over ``k_len`` keys on ``device`` replays a graph (see the module docstring)."""
    return (
        device.type == "cuda"
        and GRAPHS_BELOW is not None
        and k_len < GRAPHS_BELOW
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


def clear() -> None:
    """Drop every captured graph (and its memory); the next calls capture again."""
    with _lock:
        _graphs.clear()
        _seen.clear()


def cached_keys() -> list:
    """The keys of the graphs held now, least recently used first (for tests and diagnostics)."""
    with _lock:
        return [key for key, captured in _graphs.items() if captured is not None]


def replay(key: Hashable, body: Callable[..., tuple], inputs: Sequence[Optional[torch.Tensor]]) -> tuple:
    """``body(*inputs)``, by a CUDA graph once ``key`` has been seen before.

    body: a function of CUDA tensors (or None) returning a tuple of tensors, with no host synchronisation and
    no dependence on tensor values in Python; key: everything else its work depends on (the inputs' shapes and
    dtypes, the device and the stream are added here). The first call with a key runs ``body`` eagerly (a
    prompt length seen once costs no capture); the second captures a graph on static copies of the inputs and
    replays it, later ones replay it. Returns tensors equal to what ``body`` returns for these inputs, never
    the graph's own (later replays do not change them).
    """
    device = next(t.device for t in inputs if t is not None)
    stream = torch.cuda.current_stream(device)
    full_key = (key, device.index, stream.stream_id,
                tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs))
    with _lock:
        if full_key in _graphs:
            captured = _graphs[full_key]
            _graphs.move_to_end(full_key)
        elif full_key in _seen:  # second sighting: capture
            del _seen[full_key]
            captured = _graphs[full_key] = _capture(body, inputs, stream)
            while len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
        else:  # first sighting: eager, remembered (a prompt length seen once costs no capture)
            _seen[full_key] = None
            while len(_seen) > _MAX_SEEN:
                _seen.popitem(last=False)
            captured = None
        if captured is not None:
            for static, tensor in zip(captured.inputs, inputs):
                if static is not None:
                    static.copy_(tensor)
            captured.graph.replay()
            return tuple(out.clone() for out in captured.outputs)
    return body(*inputs)


def _capture(body, inputs, stream: torch.cuda.Stream) -> Optional[_Captured]:
    """Capture ``body`` on static copies of ``inputs`` (after one eager run on them: compiles and allocator
    warm-up happen outside the capture). None, with a warning, if the capture fails."""
    statics = tuple(None if t is None else t.clone(memory_format=torch.contiguous_format) for t in inputs)
    side = torch.cuda.Stream(stream.device)
    side.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:  # whatever happens, the caller's stream waits for the side stream's work on the copies
        with torch.cuda.stream(side):
            body(*statics)  # errors of the call itself surface here, as they would eagerly
            # capture_begin/end, not torch.cuda.graph: that one synchronises the device and empties the allocator's
            # cache on entry (a host sync on the prefill path, and cudaMallocs after it). "thread_local": other
            # threads' CUDA calls are not affected by this capture.
            try:
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    outputs = body(*statics)
                finally:
                    graph.capture_end()
            except Exception as error:  # an op that cannot be captured: this key runs eagerly from now on
                warnings.warn(f"flexprefill_hf: the selection could not be captured in a CUDA graph ({error!r}); "
                              "calls with this shape run eagerly (the same result, more host time)", RuntimeWarning,
                              stacklevel=3)
                return None
    finally:
        stream.wait_stream(side)
    return _Captured(graph, statics, tuple(outputs))


