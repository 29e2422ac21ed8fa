"""The attention function transformers calls for ``attn_implementation="flexprefill"``, and its routing.

transformers' attention modules (Llama, Qwen2, GLM, ...) project, apply rotary embeddings, update the
cache, then call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with

    query [B, Hq, N, D] (a transposed view), key/value [B, Hkv, K, D] (whole cache, KV heads not repeated),
    attention_mask: what the mask function of ``masks.py`` returned -- None, the 2-D padding mask
        bool [B, K] (left padding only), or a 4-D mask it could not avoid,
    scaling, dropout, and model-specific keyword arguments.

First the layer's configuration (``layer_config.py``): for a model that was never patched this is where
an unsupported architecture raises ValueError, before any routing, in training mode too. Then:

    * prefill, a prefill on top of a cache, a left-padded batch -> the FlexPrefill operator, queries
      at the last N key positions, ``key_start = K - mask.sum(-1)`` computed on the device;
    * decode and prompts at or below the dense threshold -> the operator too, which runs them dense
      (decode: one unmasked SDPA call, as transformers' own ``sdpa`` makes);
    * statistics (``FlexPrefillStats``) are built only for prefills inside ``record_stats``;
    * dense attention here (``dense_fallback.py``), with one warning per reason and process:
      ``output_attentions=True``, attention dropout, a 4-D mask, non-causal attention, a sliding window
      active at this length, and gradients.

Gradients: FlexPrefill is a prefill method and its operator raises ValueError ("does not support
gradients"). A patched model that is trained, or run with grad mode on and trainable weights, therefore
runs *dense* attention in every layer, which is exact, and warns once; wrap inference in
``torch.no_grad()`` or ``torch.inference_mode()`` (``generate`` does) to get the sparse prefill.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from ..ops.backends import decode_attention
from ..ops.flexprefill import flexprefill_attention, flexprefill_attention_with_stats
from .dense_fallback import dense_attention_forward
from .layer_config import CONFIG_ATTRIBUTE, layer_config
from .stats import RECORDER_ATTRIBUTE

ATTENTION_NAME = "flexprefill"

SLIDING_WINDOW_REASON = "a sliding window is active"
GRADIENT_REASON = (
    "gradients are required (grad mode is on and the query, key or value requires grad), and FlexPrefill "
    "does not support gradients; use torch.no_grad() or torch.inference_mode() for a sparse prefill"
)


def flexprefill_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers' attention-function contract; returns (out [B, N, Hq, D], None or weights).

    Args:
        module: the attention module; ``layer_idx`` selects the layer's configuration.
        query: [B, Hq, N, D]; key, value: [B, Hkv, K, D] with N <= K, the queries at the last N positions.
        attention_mask: None, bool [B, K] (True = real token, left padding), or a 4-D mask.
        scaling: softmax scale (default 1 / sqrt(D)).
        dropout: attention dropout probability (non-zero only in training).
        kwargs: ``output_attentions``, ``sliding_window``, ``is_causal`` are read; the rest is ignored.

    Raises:
        ValueError: the module's model type is not supported (a model never patched).
    """
    config = layer_config(module)
    # Plain instance attribute: a dict lookup, cheaper than nn.Module.__getattr__ on a miss.
    recorder = module.__dict__.get(RECORDER_ATTRIBUTE)
    prefill = query.shape[2] > 1
    reason = dense_reason(module, query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        # patch_model already named the windowed layers once (patches/common.py); a model loaded with
        # attn_implementation="flexprefill" and never patched hears it here, once per process.
        if not (reason.startswith(SLIDING_WINDOW_REASON) and CONFIG_ATTRIBUTE in module.__dict__):
            _warn_once(reason)
        if recorder is not None and prefill:
            recorder.record(module.layer_idx, None)
        return dense_attention_forward(
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            sliding_window=_sliding_window(module, kwargs),
            is_causal=_is_causal(module, kwargs),
            output_attentions=bool(kwargs.get("output_attentions", False)),
        )

    if not prefill and attention_mask is None:
        # Decode without padding: the call transformers' own sdpa makes (one unmasked SDPA, GQA without
        # repeating K/V), after the constant-time checks above; no transposes, no validation of shapes
        # transformers built itself, no statistics (decode steps are never recorded).
        return decode_attention(query, key, value, scaling).transpose(1, 2), None
    key_start = None
    if attention_mask is not None:
        # Left padding: the real keys of sequence b are the last mask[b].sum() ones. No host sync.
        key_start = (key.shape[2] - attention_mask.sum(-1, dtype=torch.int32)).to(query.device)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, N, H, D] views, no copy
    if recorder is not None and prefill:
        out, stats = flexprefill_attention_with_stats(q, k, v, config, softmax_scale=scaling, key_start=key_start)
        recorder.record(module.layer_idx, stats)
        return out, None
    # Every other call outside record_stats (and a padded decode step): the operator without statistics.
    return flexprefill_attention(q, k, v, config, softmax_scale=scaling, key_start=key_start), None


def dense_reason(module, query, key, value, attention_mask, dropout, kwargs) -> Optional[str]:
    """Why this call cannot use FlexPrefill (the text of its warning), or None when it can."""
    if kwargs.get("output_attentions", False):
        return "output_attentions=True needs the attention weights, which FlexPrefill never forms"
    if dropout and dropout > 0:
        return "attention dropout (training) is not supported by FlexPrefill"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return GRADIENT_REASON
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        return "a 4-D attention mask (a custom mask, a static cache or packed sequences) cannot be expressed by FlexPrefill"
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        return "the padding mask and the keys differ in length (a static cache?)"
    if not _is_causal(module, kwargs):
        return "non-causal attention is not supported by FlexPrefill"
    window = _sliding_window(module, kwargs)
    if window is not None and key.shape[2] > window:
        return f"{SLIDING_WINDOW_REASON} (keys > sliding_window={window}); FlexPrefill cannot express it"
    return None


def _sliding_window(module, kwargs) -> Optional[int]:
    window = kwargs.get("sliding_window", None)
    if window is None:
        # A plain instance attribute where a module has one: no nn.Module.__getattr__ miss on the others.
        window = module.__dict__.get("sliding_window")
    return window if isinstance(window, int) and window > 0 else None


def _is_causal(module, kwargs) -> bool:
    causal = kwargs.get("is_causal", None)
    return bool(getattr(module, "is_causal", True) if causal is None else causal)


@functools.lru_cache(maxsize=16)
def _warn_once(reason: str) -> None:
    # Keyed by the reason's text: a long generate warns once, not once per layer and step.
    warnings.warn(f"FlexPrefill: {reason}; running dense attention instead", UserWarning, stacklevel=3)
