"""The architecture registry: ``config.model_type`` -> its :class:`ArchitecturePatch`."""

from __future__ import annotations

from typing import Optional

from . import glm, llama, qwen2
from .common import ArchitecturePatch

PATCHES: tuple[ArchitecturePatch, ...] = (llama.PATCH, qwen2.PATCH, glm.PATCH)

# Model types that look supported but are not, with what to use instead.
_REFUSED = {
    "chatglm": (
        "model_type 'chatglm' (THUDM/glm-4-9b-chat with remote code) is not supported: its attention does not "
        "go through transformers' attention registry. Load the transformers-native checkpoint "
        "THUDM/glm-4-9b-chat-hf (model_type 'glm') instead"
    ),
}


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` the registry accepts, sorted."""
    return tuple(sorted(t for patch in PATCHES for t in patch.model_types))


def lookup(model_type: Optional[str]) -> ArchitecturePatch:
    """The patch of ``model_type``; ValueError naming the supported model types when there is none."""
    if model_type in _REFUSED:
        raise ValueError(_REFUSED[model_type])
    for patch in PATCHES:
        if model_type in patch.model_types:
            return patch
    raise ValueError(
        f"model_type {model_type!r} is not supported by FlexPrefill; supported model types: "
        f"{', '.join(supported_model_types())}"
    )
