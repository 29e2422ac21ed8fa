"""Offline accuracy evaluation: RULER-style synthetic tasks, scorers and the ``python -m flexprefill_hf.eval`` CLI."""
