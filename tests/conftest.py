"""Shared test setup.

The Triton kernels run on a machine without CUDA only through triton's interpreter, and
`@triton.jit` picks interpreter or compiler when a kernel module is imported: so the
choice is made here, before any test module imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
