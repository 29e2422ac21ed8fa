"""Statistics recording: ``record_stats(model)`` and ``last_stats(model)``.

Outside ``record_stats`` the attention function looks up one missing attribute per layer and stores
nothing. Inside, each attention module carries the recorder under ``RECORDER_ATTRIBUTE``, and every
prefill call (not decode steps) writes its layer's :class:`FlexPrefillStats`, or None for a call that
ran the dense fallback outside the operator.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from flexprefill_hf.patches import check_model_argument, lookup_model

from ..ops.flexprefill import FlexPrefillStats

# Set on attention modules inside record_stats, and on the model (the last recorder) by it.
RECORDER_ATTRIBUTE = "flexprefill_recorder"
STATS_ATTRIBUTE = "_flexprefill_stats"
_MISSING = object()


class StatsRecorder:
    """Per-layer :class:`FlexPrefillStats` of the last prefill; None where a layer ran outside the operator."""

    def __init__(self, num_layers: int) -> None:
        self.stats: list[Optional[FlexPrefillStats]] = [None] * num_layers

    def record(self, layer_idx: int, stats: Optional[FlexPrefillStats]) -> None:
        self.stats[layer_idx] = stats


@contextlib.contextmanager
def record_stats(model: torch.nn.Module) -> Iterator[StatsRecorder]:
    """Record the per-layer statistics of every prefill run inside the block.

    Yields the recorder; after the block ``last_stats(model)`` returns the same list. Decode steps
    are not recorded, so after ``generate`` the statistics are those of the prompt's prefill.

    Raises:
        TypeError: ``model`` is not a torch module.
        ValueError: the model's type is not supported ("... is not supported by FlexPrefill; supported
            model types: ..."), or the model does not run FlexPrefill attention (neither patched nor loaded
            with ``attn_implementation="flexprefill"``), so there would be nothing to record.
    """
    modules = lookup_model(model).attention_modules(model)
    implementation = getattr(model.config, "_attn_implementation", None)
    # Here, not at the top: routing imports this module. A model patched for continuous batching runs
    # FlexPrefill too (its generate() calls are recorded; generate_batch's packed steps are not).
    from .continuous_batching import CB_ATTENTION_NAME, CB_PAGED_ATTENTION_NAME
    from .routing import ATTENTION_NAME

    if implementation not in (ATTENTION_NAME, CB_ATTENTION_NAME, CB_PAGED_ATTENTION_NAME):
        raise ValueError(
            f"record_stats needs a model that runs FlexPrefill attention, but its attn_implementation is "
            f"{implementation!r}; call flexprefill_hf.patch_model(model) or load it with "
            f'attn_implementation="{ATTENTION_NAME}"'
        )
    recorder = StatsRecorder(len(modules))
    model.__dict__[STATS_ATTRIBUTE] = recorder
    previous = [m.__dict__.get(RECORDER_ATTRIBUTE, _MISSING) for m in modules]
    for module in modules:
        setattr(module, RECORDER_ATTRIBUTE, recorder)
    try:
        yield recorder
    finally:
        for module, before in zip(modules, previous):
            if before is _MISSING:
                delattr(module, RECORDER_ATTRIBUTE)
            else:
                setattr(module, RECORDER_ATTRIBUTE, before)


def last_stats(model: torch.nn.Module) -> Optional[list[Optional[FlexPrefillStats]]]:
    """Per-layer statistics of the last prefill recorded by ``record_stats``; None if nothing was recorded.

    Each entry is a :class:`FlexPrefillStats` (per batch and query head: pattern chosen, JS distance,
    blocks and fraction computed), or None for a layer that ran dense outside the operator. Its tensors are
    on the device its layer ran on: for a model split over devices (accelerate's ``device_map``) move them to
    one device before combining layers (``torch.stack([s.computed_fraction.cpu() for s in stats])``).
    TypeError when ``model`` is not a torch module.
    """
    check_model_argument(model)
    recorder = model.__dict__.get(STATS_ATTRIBUTE)
    return None if recorder is None else list(recorder.stats)
