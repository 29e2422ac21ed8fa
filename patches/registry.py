"""The architecture registry: ``config.model_type`` -> its :class:`ArchitecturePatch`.

No family needs code of its own; what differs is stated here:

* llama: Llama-3.x (3.1, 3.2), Yi, SmolLM2 and every checkpoint with ``model_type`` "llama"; the standard layout.
* qwen2: Qwen2 and Qwen2.5; q/k/v projections with bias (invisible to the attention function), and
  optional sliding-window layers (``use_sliding_window=True``; off in Qwen2-7B-Instruct), which the
  common check names and the attention function runs dense once a prompt is longer than the window.
* qwen3: Qwen3 ("qwen3") and Qwen3-MoE ("qwen3_moe"). RMS norms on q and k per head (applied before the
  attention function), an explicit ``head_dim`` (128 in the released checkpoints, whatever the hidden size);
  the mixture of experts is in the MLP, which attention never sees. Sliding windows as qwen2 (off in the
  released checkpoints).
* mistral: Mistral-7B, Mistral-Nemo, Mistral-Small (``model_type`` "mistral"). The window is
  ``config.sliding_window`` for every layer, passed to the attention function as a keyword (the modules have
  no ``sliding_window`` attribute): 4096 in Mistral-7B-v0.1, null from v0.2 on. Where it is set, prompts longer
  than it run dense.
* phi3: Phi-3, Phi-3.5-mini, Phi-4-mini and Phi-4 ("phi3"). One fused ``qkv_proj``, split into query, key
  and value heads before the attention function; ``config.sliding_window`` as for mistral (2047 in
  Phi-3-mini-4k-instruct: prompts longer than that run dense there).
* gemma3: Gemma 3 text models ("gemma3_text", ``Gemma3ForCausalLM``: gemma-3-1b and gemma-3-270m). q/k
  RMS norms; the scale is ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``), which transformers
  passes as ``scaling`` and the attention function uses; ``config.layer_types`` makes five of every six
  layers "sliding_attention" (``module.sliding_window`` set): those run dense once a prompt is longer than
  the window, the global layers run FlexPrefill -- a decision per layer and prompt length. Gemma 3 declares
  ``attn_logit_softcapping`` but its attention modules never pass it (transformers 4.53 and 5.x), so no
  softcapping is lost. Bidirectional Gemma 3 (``use_bidirectional_attention``) is refused as non-causal.
* glm: GLM-4 in transformers' own code, ``model_type`` "glm" (GLM-4-9B-Chat-hf) and "glm4"
  (GLM-4-0414: GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1; class ``Glm4ForCausalLM``). The rotary embedding
  covers only part of each head (applied to q and k before the attention function) and ``head_dim`` is
  explicit; GLM-4-9B has 32 query heads on 2 KV heads (G = 16).

Refused with a reason (``_HINTS``): the original THUDM/glm-4-9b-chat ("chatglm", remote code) fuses q, k and
v and does not go through transformers' attention registry; Gemma 2 ("gemma2") caps its attention logits with
a tanh (``softcap``), which FlexPrefill's kernels do not apply; the multimodal Gemma 3 ("gemma3", 4B-27B) lets
image tokens attend bidirectionally.
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
        family="qwen3", model_types=("qwen3", "qwen3_moe"), attention_classes=("Qwen3Attention", "Qwen3MoeAttention")
    ),
    ArchitecturePatch(family="mistral", model_types=("mistral",), attention_classes=("MistralAttention",)),
    ArchitecturePatch(family="phi3", model_types=("phi3",), attention_classes=("Phi3Attention",)),
    ArchitecturePatch(family="gemma3", model_types=("gemma3_text",), attention_classes=("Gemma3Attention",)),
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
    "gemma2": (
        "Gemma 2 caps its attention logits with a tanh (attn_logit_softcapping, passed as `softcap`), which "
        "FlexPrefill's kernels do not apply"
    ),
    "gemma3": (
        "the multimodal Gemma 3 lets image tokens attend bidirectionally, which FlexPrefill cannot express; "
        "the text-only model (model_type 'gemma3_text', Gemma3ForCausalLM) is supported"
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
