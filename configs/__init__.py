"""The packaged FlexPrefill presets (``*.yaml``), one file per tuned checkpoint or family, plus ``default.yaml``.

This top-level folder is installed as the subpackage ``flexprefill_hf.configs`` (``package_dir`` in setup.cfg);
``flexprefill_hf.integration.presets`` reads and matches the files, and documents their schema.
"""
