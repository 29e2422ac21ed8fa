"""Per-architecture patches: what FlexPrefill needs to know about each supported model family."""

from .common import ArchitecturePatch
from .registry import PATCHES, lookup, supported_model_types

__all__ = ["ArchitecturePatch", "PATCHES", "lookup", "supported_model_types"]
