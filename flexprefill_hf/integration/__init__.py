"""Hugging Face Transformers integration: ``attn_implementation="flexprefill"``, patch_model, presets, statistics.

Files, one job each:
    routing.py         the attention function transformers calls, and which calls run dense
    dense_fallback.py  dense attention for what FlexPrefill cannot express (torch only)
    masks.py           the mask function (never a [q_len, k_len] mask), and the architecture check at first forward
    layer_config.py    per-layer configuration, resolved in one place
    patching.py        patch_model, unpatch_model, set_layer_config, layer_configs
    stats.py           record_stats, last_stats
    continuous_batching.py  generate_batch / paged KV: packed prefills through the varlen operator
    presets.py         YAML presets and their matching to a model

(``layer_config(module)``, one layer's configuration, is imported from ``.layer_config``: exported here it would
hide the module of the same name.)
"""

from .continuous_batching import CB_ATTENTION_NAME, patch_model_for_continuous_batching
from .dense_fallback import dense_attention_forward
from .masks import flexprefill_mask
from .patching import layer_configs, patch_model, set_layer_config, unpatch_model
from .presets import Preset, load_preset, match_preset, preset_names
from .routing import ATTENTION_NAME, flexprefill_attention_forward
from .stats import StatsRecorder, last_stats, record_stats


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
    "CB_ATTENTION_NAME",
    "Preset",
    "StatsRecorder",
    "dense_attention_forward",
    "flexprefill_attention_forward",
    "flexprefill_mask",
    "last_stats",
    "layer_configs",
    "load_preset",
    "match_preset",
    "patch_model",
    "patch_model_for_continuous_batching",
    "preset_names",
    "record_stats",
    "register",
    "set_layer_config",
    "unpatch_model",
]
