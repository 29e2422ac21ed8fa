"""flexprefill_hf: FlexPrefill context-aware sparse attention for long-prompt prefill in Hugging Face Transformers."""

from .config import FlexPrefillConfig
from .ops.flexprefill import FlexPrefillStats, flexprefill_attention, flexprefill_attention_with_stats

__all__ = [
    "FlexPrefillConfig",
    "FlexPrefillStats",
    "flexprefill_attention",
    "flexprefill_attention_with_stats",
]
__version__ = "0.1.0"
