"""flexprefill_hf: FlexPrefill context-aware sparse attention for long-prompt prefill in Hugging Face Transformers."""

from .config import FlexPrefillConfig
from .integration import (
    last_stats,
    layer_configs,
    load_preset,
    patch_model,
    preset_names,
    record_stats,
    register,
    set_layer_config,
    unpatch_model,
)
from .ops.flexprefill import FlexPrefillStats, flexprefill_attention, flexprefill_attention_with_stats

# Makes attn_implementation="flexprefill" known to transformers (idempotent).
register()

__all__ = [
    "FlexPrefillConfig",
    "FlexPrefillStats",
    "flexprefill_attention",
    "flexprefill_attention_with_stats",
    "last_stats",
    "layer_configs",
    "load_preset",
    "patch_model",
    "preset_names",
    "record_stats",
    "register",
    "set_layer_config",
    "unpatch_model",
]
__version__ = "0.1.0"
