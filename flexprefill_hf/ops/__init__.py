"""FlexPrefill's tensor code, free of transformers: the operator (``flexprefill.py``), block selection
(``selection/``), attention over the selected blocks and dense attention (``attention/``), the block grid and
structure (``grid.py``, ``block_structure.py``), input validation (``validation.py``), runtime facts
(``runtime.py``) and the float64 oracles (``reference.py``). The algorithm: ``ops/README.md``.

Nothing is imported here: ``flexprefill_hf.config`` imports ``ops.runtime``, and the operator imports the
config, so a re-export here would be circular. The public names live in ``flexprefill_hf``.
"""
