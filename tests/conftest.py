import os

import torch

# The Triton interpreter must be chosen before any module defining kernels is imported: on a machine
# without CUDA the kernels then run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
