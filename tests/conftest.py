import os

import pytest
import torch

# The Triton interpreter must be chosen before any module defining kernels is imported: on a machine
# without CUDA the kernels then run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import poisoned_empty  # noqa: E402  (after the interpreter choice, like every test module)


@pytest.fixture
def poison_empty():
    """Poison fresh memory for the whole test: torch.empty / empty_like / Tensor.new_empty return NaN-filled
    floating tensors and iinfo.min-filled signed integer tensors (iinfo.max for unsigned), so an output element
    a kernel or function never writes fails the comparison loudly. Yields a helpers.PoisonRecord (the shapes
    and dtypes allocated), e.g. ``assert poison_empty.allocated(q.shape)`` to prove an output came from it.
    Use it as an argument, or ``@pytest.mark.usefixtures("poison_empty")`` for a whole module."""
    with poisoned_empty() as record:
        yield record
