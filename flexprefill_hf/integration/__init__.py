"""Hugging Face Transformers integration: ``attn_implementation="flexprefill"``, patch_model, presets, statistics."""

from .attention import ATTENTION_NAME, dense_attention_forward, flexprefill_attention_forward, layer_config
from .masks import flexprefill_mask
from .patching import (
    StatsRecorder,
    last_stats,
    layer_configs,
    patch_model,
    record_stats,
    set_layer_config,
    unpatch_model,
)
from .presets import Preset, load_preset, match_preset, preset_names


def register() -> None:
    """Register the attention and mask functions with transformers under "flexprefill" (idempotent).

    Afterwards ``from_pretrained(..., attn_implementation="flexprefill")`` and
    ``model.set_attn_implementation("flexprefill")`` work. Without the mask function transformers would
    hand the attention function no mask at all, and a padded batch would go silently wrong.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, flexprefill_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, flexprefill_mask)


__all__ = [
    "ATTENTION_NAME",
    "Preset",
    "StatsRecorder",
    "dense_attention_forward",
    "flexprefill_attention_forward",
    "flexprefill_mask",
    "last_stats",
    "layer_config",
    "layer_configs",
    "load_preset",
    "match_preset",
    "patch_model",
    "preset_names",
    "record_stats",
    "register",
    "set_layer_config",
    "unpatch_model",
]
