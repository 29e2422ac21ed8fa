"""The supported architectures: what FlexPrefill needs to know about each model family.

This top-level folder is installed as the subpackage ``flexprefill_hf.patches`` (``package_dir`` in
setup.cfg). How to add an architecture: ``patches/README.md``.
"""

from .common import ArchitecturePatch
from .registry import PATCHES, check_model_argument, lookup, lookup_model, supported_model_types

__all__ = ["ArchitecturePatch", "PATCHES", "check_model_argument", "lookup", "lookup_model", "supported_model_types"]
