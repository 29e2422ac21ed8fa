"""``python -m flexprefill_hf.eval``: see :mod:`flexprefill_hf.eval.cli`."""

import sys

from .cli import main

sys.exit(main())
