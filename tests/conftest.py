"""Test setup: Triton kernels run in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit runs, i.e. before kernels/ is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
