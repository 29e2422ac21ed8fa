"""Llama-architecture models: Llama-3.x, Yi, SmolLM2 and every checkpoint with ``model_type`` "llama".

The standard layout: full causal attention in every layer, grouped-query heads, rotary embeddings
applied before the attention function. Nothing to adapt beyond the common checks. The default preset
is the paper's defaults: the family holds many unrelated checkpoints, and the two the paper tuned
(Llama-3.1-8B-Instruct, Yi-9B-200K) are matched by name.
"""

from __future__ import annotations

from .common import ArchitecturePatch, check_head_layout

PATCH = ArchitecturePatch(
    family="llama",
    model_types=("llama",),
    attention_classes=("LlamaAttention",),
    default_preset="default",
    check=check_head_layout,
)
