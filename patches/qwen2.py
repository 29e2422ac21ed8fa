"""Qwen2 models (Qwen2, Qwen2.5): grouped-query attention with bias, and optional sliding-window layers.

With ``use_sliding_window=True``, the layers of ``config.layer_types`` marked "sliding_attention" set
``module.sliding_window`` and pass it to the attention function, which runs those layers dense
(torch SDPA with the window) once a prompt is longer than the window: a FlexPrefill block pattern
cannot express the window. Qwen2-7B-Instruct ships with ``use_sliding_window=False``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .common import ArchitecturePatch, check_head_layout


def check(model: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> None:
    """Common head checks, then a warning naming the sliding-window layers, which fall back to dense."""
    check_head_layout(model, modules)
    windowed = [m.layer_idx for m in modules if getattr(m, "sliding_window", None) is not None]
    if windowed:
        window = getattr(modules[windowed[0]], "sliding_window")
        warnings.warn(
            f"Qwen2 layers {windowed} use a sliding window of {window} tokens; FlexPrefill cannot express it, "
            f"so these layers run dense attention on prompts longer than {window} tokens",
            UserWarning,
            stacklevel=3,
        )


PATCH = ArchitecturePatch(
    family="qwen2",
    model_types=("qwen2",),
    attention_classes=("Qwen2Attention",),
    default_preset="qwen2-7b-instruct",
    check=check,
)
