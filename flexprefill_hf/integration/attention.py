"""The attention function transformers calls for ``attn_implementation="flexprefill"``, and its routing.

transformers' attention modules (Llama, Qwen2, GLM, ...) project, apply rotary embeddings, update the
cache, then call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with

    query [B, Hq, N, D] (a transposed view), key/value [B, Hkv, K, D] (whole cache, KV heads not repeated),
    attention_mask: what the mask function of ``masks.py`` returned -- None, the 2-D padding mask
        bool [B, K] (left padding only), or a 4-D mask it could not avoid,
    scaling, dropout, and model-specific keyword arguments.

Routing (one warning per reason when leaving FlexPrefill):
    * prefill, a prefill on top of a cache, a left-padded batch -> the FlexPrefill operator, queries
      at the last N key positions, ``key_start = K - mask.sum(-1)`` computed on the device;
    * decode and prompts at or below the dense threshold -> the operator too, which runs them dense;
    * ``output_attentions=True``, dropout in training, a 4-D mask, non-causal attention, a sliding
      window active at this length -> dense attention here (torch SDPA, or explicit weights when
      they are asked for).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from flexprefill_hf.patches import lookup

from ..config import FlexPrefillConfig
from ..ops.flexprefill import flexprefill_attention_with_stats
from .presets import match_preset

ATTENTION_NAME = "flexprefill"
# Set on attention modules: by patch_model (the layer's FlexPrefillConfig) and by record_stats.
CONFIG_ATTRIBUTE = "flexprefill_config"
RECORDER_ATTRIBUTE = "flexprefill_recorder"


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
    """
    # Plain instance attributes: a dict lookup, cheaper than nn.Module.__getattr__ on a miss.
    recorder = module.__dict__.get(RECORDER_ATTRIBUTE)
    prefill = query.shape[2] > 1
    reason = _dense_reason(module, key, attention_mask, dropout, kwargs)
    if reason is not None:
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

    key_start = None
    if attention_mask is not None:
        # Left padding: the real keys of sequence b are the last mask[b].sum() ones. No host sync.
        key_start = (key.shape[2] - attention_mask.sum(-1, dtype=torch.int32)).to(query.device)
    out, stats = flexprefill_attention_with_stats(
        query.transpose(1, 2),  # [B, N, Hq, D]
        key.transpose(1, 2),  # [B, K, Hkv, D]
        value.transpose(1, 2),
        layer_config(module),
        softmax_scale=scaling,
        key_start=key_start,
    )
    if recorder is not None and prefill:
        recorder.record(module.layer_idx, stats)
    return out, None


def layer_config(module: torch.nn.Module) -> FlexPrefillConfig:
    """The layer's configuration: set by ``patch_model``, else the preset matched from ``module.config``."""
    config = module.__dict__.get(CONFIG_ATTRIBUTE)
    if config is not None:
        return config
    model_config = getattr(module, "config", None)
    configs = preset_layer_configs(
        getattr(model_config, "model_type", None),
        getattr(model_config, "_name_or_path", "") or "",
        getattr(model_config, "num_hidden_layers", None) or 0,
    )
    layer_idx = getattr(module, "layer_idx", None)
    if isinstance(layer_idx, int) and layer_idx < len(configs):
        return configs[layer_idx]
    return configs[0] if configs else FlexPrefillConfig()


@functools.lru_cache(maxsize=32)
def preset_layer_configs(model_type: Optional[str], name_or_path: str, num_layers: int) -> tuple[FlexPrefillConfig, ...]:
    """Per-layer configurations of the preset matched by model type and name (cached: one per model)."""
    preset = match_preset(model_type, name_or_path, default=lookup(model_type).default_preset)
    return preset.layer_configs(max(num_layers, 1))


def dense_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    *,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    is_causal: bool = True,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dense attention in transformers' layout, for what FlexPrefill cannot express.

    query [B, Hq, N, D], key/value [B, Hkv, K, D]; queries at the last N positions. ``attention_mask``:
    None, bool [B, K] padding, or a 4-D bool or additive mask used as given. Returns
    (out [B, N, Hq, D], weights [B, Hq, N, K] when ``output_attentions`` else None).
    Rows without any key give 0, as in the operator, so left padding never spreads NaN.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    # SDPA's is_causal covers the plain causal square; explicit weights always need the mask.
    mask = _dense_mask(query, key, attention_mask, sliding_window, is_causal, allow_none=not output_attentions)
    if output_attentions:
        scores = (query @ key.transpose(-1, -2)).float() * scale  # [B, Hq, N, K]
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0).to(query.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return (weights @ value).transpose(1, 2).contiguous(), weights
    causal_flag = mask is None and is_causal and query.shape[2] == key.shape[2]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal_flag, scale=scale
    )
    if mask is not None and mask.dtype == torch.bool:
        out = torch.where(mask.any(-1, keepdim=True), out, 0)
    return out.transpose(1, 2).contiguous(), None


def _dense_mask(query, key, attention_mask, sliding_window, is_causal, allow_none) -> Optional[torch.Tensor]:
    """The mask of the dense fallback: the 4-D mask as given, else bool [B or 1, 1, N, K].

    None (when ``allow_none``) where SDPA needs no mask: no padding, no window, and either non-causal
    or causal over a square (SDPA's ``is_causal``).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    q_len, k_len = query.shape[2], key.shape[2]
    square_or_full = q_len == k_len or not is_causal
    if allow_none and attention_mask is None and sliding_window is None and square_or_full:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # [N, 1]
    k_pos = torch.arange(k_len, device=query.device)[None, :]  # [1, K]
    mask = (k_pos <= q_pos) if is_causal else torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    mask = mask[None, None]  # [1, 1, N, K]
    if attention_mask is not None:
        mask = mask & attention_mask.to(device=query.device, dtype=torch.bool)[:, None, None, :]
    return mask


def _dense_reason(module, key, attention_mask, dropout, kwargs) -> Optional[str]:
    """Why this call cannot use FlexPrefill, or None when it can."""
    if kwargs.get("output_attentions", False):
        return "output_attentions=True needs the attention weights, which FlexPrefill never forms"
    if dropout and dropout > 0:
        return "attention dropout (training) is not supported by FlexPrefill"
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        return "a 4-D attention mask (a custom mask, a static cache or packed sequences) cannot be expressed by FlexPrefill"
    if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
        return "the padding mask and the keys differ in length (a static cache?)"
    if not _is_causal(module, kwargs):
        return "non-causal attention is not supported by FlexPrefill"
    window = _sliding_window(module, kwargs)
    if window is not None and key.shape[2] > window:
        return f"a sliding window is active (keys > sliding_window={window}); FlexPrefill cannot express it"
    return None


def _sliding_window(module, kwargs) -> Optional[int]:
    window = kwargs.get("sliding_window", None)
    if window is None:
        window = getattr(module, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def _is_causal(module, kwargs) -> bool:
    causal = kwargs.get("is_causal", None)
    return bool(getattr(module, "is_causal", True) if causal is None else causal)


@functools.lru_cache(maxsize=16)
def _warn_once(reason: str) -> None:
    warnings.warn(f"FlexPrefill: {reason}; running dense attention instead", UserWarning, stacklevel=3)
