"""Offline accuracy evaluation: RULER's synthetic tasks, scorers and the ``python -m flexprefill_hf.eval`` CLI.

| module | what |
|---|---|
| ``tasks/`` | the 11 RULER synthetic tasks (8 needle-in-a-haystack variants, ``vt``, ``cwe``, ``fwe``; the two QA tasks need downloads and are left out), sized in the model's tokens |
| ``haystack.py``, ``words.py`` | filler text (RULER's noise sentences; prose from ``pydoc_data.topics``) and the shipped word lists |
| ``scoring.py`` | RULER's ``string_match_all`` / ``string_match_part`` and the teacher-forced score |
| ``methods.py`` | dense, FlexPrefill and its ablations, the streaming and vertical-slash baselines (same kernels) |
| ``runner.py`` | the rounds over (method, length, task) cells, the time budget, matched shares; prefill, greedy decoding and both scores per batch |
| ``report.py`` | the task x length x method table with 95% intervals, the samples-per-cell table, the plots |
| ``cli.py`` | the command line (``flexprefill-eval``) |
| ``needle.py`` | the single-needle prompt of ``examples/needle.py`` |

matplotlib is imported only to draw a plot.
"""
