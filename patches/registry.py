"""The architecture registry: ``config.model_type`` -> its :class:`ArchitecturePatch`.

The three families need no code of their own; what differs is stated here:

* llama: Llama-3.x, Yi, SmolLM2 and every checkpoint with ``model_type`` "llama"; the standard layout.
* qwen2: Qwen2 and Qwen2.5; q/k/v projections with bias (invisible to the attention function), and
  optional sliding-window layers (``use_sliding_window=True``; off in Qwen2-7B-Instruct), which the
  common check names and the attention function runs dense once a prompt is longer than the window.
* glm: GLM-4 in transformers' own code, ``model_type`` "glm" (GLM-4-9B-Chat-hf) and "glm4"
  (GLM-4-0414). The rotary embedding covers only part of each head (applied to q and k before the
  attention function) and ``head_dim`` is explicit; GLM-4-9B has 32 query heads on 2 KV heads (G = 16).

The original THUDM/glm-4-9b-chat (``model_type`` "chatglm", remote code) fuses q, k and v and does not go
through transformers' attention registry: it is refused with a pointer to the -hf checkpoint.
How to add an architecture: ``patches/README.md``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from .common import ArchitecturePatch

PATCHES: tuple[ArchitecturePatch, ...] = (
    ArchitecturePatch(family="llama", model_types=("llama",), attention_classes=("LlamaAttention",)),
    ArchitecturePatch(family="qwen2", model_types=("qwen2",), attention_classes=("Qwen2Attention",)),
    ArchitecturePatch(
        family="glm", model_types=("glm", "glm4"), attention_classes=("GlmAttention", "Glm4Attention")
    ),
)

# Model types that look supported but are not: what to use instead, appended to the error.
_HINTS = {
    "chatglm": (
        "THUDM/glm-4-9b-chat with remote code fuses q, k and v and does not go through transformers' attention "
        "registry; load the transformers-native checkpoint THUDM/glm-4-9b-chat-hf (model_type 'glm') instead"
    ),
}


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` the registry accepts, sorted."""
    return tuple(sorted(t for patch in PATCHES for t in patch.model_types))


@functools.lru_cache(maxsize=None)
def _patch_of(model_type: str) -> Optional[ArchitecturePatch]:
    return next((patch for patch in PATCHES if model_type in patch.model_types), None)


def lookup(model_type: Optional[str]) -> ArchitecturePatch:
    """The entry of ``model_type``; ValueError naming the supported model types when there is none.

    Cached by model type: the mask function calls it on every forward.
    """
    patch = _patch_of(model_type) if isinstance(model_type, str) else None
    if patch is not None:
        return patch
    message = (
        f"model_type {model_type!r} is not supported by FlexPrefill; supported model types: "
        f"{', '.join(supported_model_types())}"
    )
    hint = _HINTS.get(model_type) if isinstance(model_type, str) else None
    raise ValueError(message if hint is None else f"{message}. {hint}")


def check_model_argument(model: Any) -> None:
    """TypeError unless ``model`` is a torch module (the public entries' first argument)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model={model!r:.80} has type {type(model).__name__}; expected a torch.nn.Module (a transformers model)"
        )


def lookup_model(model: Any) -> ArchitecturePatch:
    """The entry of a model, from ``model.config.model_type``; TypeError for a non-module, ValueError as ``lookup``."""
    check_model_argument(model)
    return lookup(getattr(getattr(model, "config", None), "model_type", None))
