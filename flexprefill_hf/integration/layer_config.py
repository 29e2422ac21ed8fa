"""Per-layer configuration: the one place that turns what a user gave into a FlexPrefillConfig per layer.

Two callers, one resolution (``resolve_layer_configs``):

* ``patch_model(model, config, **overrides)`` stores the result on each attention module under
  ``CONFIG_ATTRIBUTE``;
* a model loaded with ``attn_implementation="flexprefill"`` and never patched has no such attribute:
  ``layer_config(module)`` then resolves the preset matched from ``module.config`` (cached per model
  type, name and layer count). That first resolution is also where an unsupported architecture fails.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch

from flexprefill_hf.patches import lookup

from ..config import FlexPrefillConfig
from .presets import Preset, load_preset, match_preset

# Set on attention modules by patch_model (the layer's FlexPrefillConfig).
CONFIG_ATTRIBUTE = "flexprefill_config"

ConfigLike = Union[None, str, os.PathLike, FlexPrefillConfig, Preset]


def resolve_layer_configs(
    config: ConfigLike, model_type: Optional[str], name_or_path: str, num_layers: int, **overrides
) -> tuple[FlexPrefillConfig, ...]:
    """One FlexPrefillConfig per layer.

    Args:
        config: None (the packaged preset matched by ``model_type`` and ``name_or_path``), a preset name,
            a YAML path, a :class:`Preset`, or a :class:`FlexPrefillConfig` (the same for every layer).
        model_type, name_or_path: ``config.model_type`` and ``config._name_or_path`` of the model.
        num_layers: the number of attention layers.
        overrides: FlexPrefillConfig fields applied on top, in every layer.

    Raises:
        TypeError: ``config`` of another type, or an unknown override field.
        ValueError: an unknown preset, a bad preset file, a per-layer override past the last layer,
            a value FlexPrefillConfig rejects.
    """
    if config is None:
        config = match_preset(model_type, name_or_path)
    elif isinstance(config, (str, os.PathLike)):
        config = load_preset(config)
    if isinstance(config, Preset):
        configs = config.layer_configs(num_layers)
    elif isinstance(config, FlexPrefillConfig):
        configs = (config,) * num_layers
    else:
        raise TypeError(
            f"config={config!r:.80} has type {type(config).__name__}; expected None, a preset name, a YAML path, "
            "a Preset or a FlexPrefillConfig"
        )
    if overrides:
        configs = tuple(c.replace(**overrides) for c in configs)
    return configs


def layer_config(module: torch.nn.Module) -> FlexPrefillConfig:
    """The configuration of one attention module: set by ``patch_model``, else its model's matched preset.

    Raises ValueError (naming the supported model types) for a module of an unsupported architecture.
    """
    # A plain instance attribute: a dict lookup, cheaper than nn.Module.__getattr__ on a miss.
    config = module.__dict__.get(CONFIG_ATTRIBUTE)
    if config is not None:
        return config
    model_config = getattr(module, "config", None)
    configs = preset_layer_configs(
        getattr(model_config, "model_type", None),
        getattr(model_config, "_name_or_path", "") or "",
        getattr(model_config, "num_hidden_layers", None) or 1,
    )
    layer_idx = getattr(module, "layer_idx", None)
    return configs[layer_idx] if isinstance(layer_idx, int) and 0 <= layer_idx < len(configs) else configs[0]


@functools.lru_cache(maxsize=32)
def preset_layer_configs(model_type: Optional[str], name_or_path: str, num_layers: int) -> tuple[FlexPrefillConfig, ...]:
    """Per-layer configurations of an unpatched model's matched preset (cached: resolved once per model).

    ValueError for an unsupported ``model_type`` (not cached: it fails again on the next call).
    """
    lookup(model_type)
    return resolve_layer_configs(None, model_type, name_or_path, num_layers)
