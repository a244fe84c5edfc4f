"""Shared test setup.

The Triton kernels run on a machine without CUDA only through triton's interpreter, and
`@triton.jit` picks interpreter or compiler when a kernel module is imported: so the
choice is made here, before any test module imports triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread: the 2 shared cores are often oversubscribed by parallel test runs,
    where every multi-threaded op waits for a descheduled partner thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
