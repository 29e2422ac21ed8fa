"""GLM-4 models in transformers' own code: ``model_type`` "glm" (GLM-4-9B-Chat-hf) and "glm4" (GLM-4-0414).

Two things differ from Llama, neither touches the attention function: the rotary embedding covers
only part of each head (``partial_rotary_factor``, applied to q and k before the attention function),
and ``head_dim`` is set explicitly rather than derived from the hidden size; the common check reads
the module's own ``head_dim`` and the projection widths. GLM-4-9B uses 32 query heads on 2 KV heads
(G = 16), which the grouped layout h // G covers.

The original checkpoint THUDM/glm-4-9b-chat (``model_type`` "chatglm", remote code) fuses q, k and v
in one projection and does not use transformers' attention registry: the registry refuses it and
points to THUDM/glm-4-9b-chat-hf.
"""

from __future__ import annotations

from .common import ArchitecturePatch, check_head_layout

PATCH = ArchitecturePatch(
    family="glm",
    model_types=("glm", "glm4"),
    attention_classes=("GlmAttention", "Glm4Attention"),
    default_preset="glm-4-9b-chat",
    check=check_head_layout,
)
