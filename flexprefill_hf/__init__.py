"""flexprefill_hf: FlexPrefill context-aware sparse attention for long-prompt prefill in Hugging Face Transformers.

Where things are (README.md, "Layout of the repository", has the whole table):

* ``flexprefill_hf.ops``: the operator, independent of transformers (``ops/README.md``: the algorithm).
* ``flexprefill_hf.integration``: the transformers glue (attention and mask functions, ``patch_model``).
* ``flexprefill_hf.patches`` is the top-level folder ``patches/`` and ``flexprefill_hf.configs`` the folder
  ``configs/``: ``setup.cfg`` maps them into this package (``package_dir``), so they exist only once the
  package is installed; ``pip install -e .`` is the usual way. ``from flexprefill_hf.patches import lookup``
  therefore reads ``patches/registry.py``, and the YAML presets are ``configs/*.yaml``.

Importing the package registers ``attn_implementation="flexprefill"`` with transformers.
"""

from .config import FlexPrefillConfig
from .integration import (
    last_stats,
    layer_configs,
    load_preset,
    patch_model,
    patch_model_for_continuous_batching,
    preset_names,
    record_stats,
    register,
    set_layer_config,
    unpatch_model,
)
from .ops.flexprefill import FlexPrefillStats, flexprefill_attention, flexprefill_attention_with_stats
from .ops.varlen import flexprefill_attention_varlen, flexprefill_attention_varlen_with_stats

# Makes attn_implementation="flexprefill" known to transformers (idempotent).
register()

__all__ = [
    "FlexPrefillConfig",
    "FlexPrefillStats",
    "flexprefill_attention",
    "flexprefill_attention_varlen",
    "flexprefill_attention_varlen_with_stats",
    "flexprefill_attention_with_stats",
    "last_stats",
    "layer_configs",
    "load_preset",
    "patch_model",
    "patch_model_for_continuous_batching",
    "preset_names",
    "record_stats",
    "register",
    "set_layer_config",
    "unpatch_model",
]
__version__ = "0.1.0"
