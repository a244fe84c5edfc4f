"""Measuring helpers that `sefe_fast.reglora.measure` does not have: saved-for-backward
bytes and CUDA peaks.

The CPU peak helpers (profiler memory events, resident high-water mark) live in
`sefe_fast.reglora.measure` and are re-exported here, so the benchmark suite and the memory
profiler import every measuring helper from one place.

- `SavedTensorBytes`: the bytes of the tensors autograd saves for the backward while the
  context is active (`torch.autograd.graph.saved_tensors_hooks`), counting each storage once
  and leaving out storages that existed before (the LoRA factors, the masks, the plans):
  what a forward pins in memory until its backward runs.
- `cuda_peak_extra_bytes`: growth of `torch.cuda.max_memory_allocated` over a call.
- `peak_extra_bytes_on`: the right peak measurement for a device (CPU: tensor bytes from the
  profiler's memory events; CUDA: the caching allocator's peak).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator

import torch

from sefe_fast.reglora.measure import (
    peak_extra_bytes,
    peak_extra_rss_bytes,
    rss_available,
)
from sefe_fast.reglora.measure import peak_extra_torch_bytes as _peak_extra_torch_bytes

# Lines libkineto writes to fd 2 on every profiler start/stop (not errors).
_KINETO_NOISE = ("USDT:", "STAGE:")


@contextlib.contextmanager
def quiet_kineto() -> Iterator[None]:
    """Drop libkineto's per-session "USDT: profiler_start/stop" lines from stderr.

    fd 2 goes to a temporary file while the block runs; every other line written there is
    passed on to stderr afterwards, so real messages are delayed, never lost.
    """
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith(_KINETO_NOISE):
                    sys.stderr.write(line)
            sys.stderr.flush()


def peak_extra_torch_bytes(fn: Callable[[], object]) -> int:
    """`sefe_fast.reglora.measure.peak_extra_torch_bytes` (tensor bytes from the profiler's
    memory events, net of frees, in bytes) without libkineto's start/stop lines on stderr."""
    with quiet_kineto():
        return _peak_extra_torch_bytes(fn)


def _storage_of(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of a strided tensor's storage; None for other layouts."""
    if tensor.layout != torch.strided:
        return None
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _component_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a sparse tensor's component tensors (indices and values)."""
    if tensor.layout == torch.sparse_coo:
        parts = [tensor._indices(), tensor._values()]
    elif tensor.layout == torch.sparse_csr:
        parts = [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    else:
        return tensor.numel() * tensor.element_size()
    return sum(p.numel() * p.element_size() for p in parts)


class SavedTensorBytes:
    """Context manager: bytes autograd saves for the backward inside it (each storage once).

    `existing`: tensors whose storages do not count (they are held anyway: parameters,
    masks, plans). After the block, `.bytes` is the total and `.count` the number of newly
    saved storages. Saved tensors are passed through unchanged (the hooks only look).
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        self._existing = {
            key[0] for t in existing if (key := _storage_of(t)) is not None and key[0] != 0
        }
        self._seen: set[int] = set()
        self.bytes = 0
        self.count = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_of(tensor)
        if key is None:
            self.bytes += _component_bytes(tensor)
            self.count += 1
        elif key[0] not in self._existing and key[0] not in self._seen and key[1] > 0:
            self._seen.add(key[0])
            self.bytes += key[1]
            self.count += 1
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


def cuda_peak_extra_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Growth of the CUDA allocator's peak allocated bytes on `device` while `fn()` runs."""
    device = torch.device(device)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def peak_extra_bytes_on(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak extra bytes of `fn()` on `device`: CPU tensor bytes (profiler) or CUDA allocator."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_extra_bytes(fn, device)
    if device.type == "cpu":
        return peak_extra_torch_bytes(fn)
    raise ValueError(f"no peak-memory measurement for device type {device.type!r}")


__all__ = [
    "SavedTensorBytes",
    "cuda_peak_extra_bytes",
    "peak_extra_bytes",
    "peak_extra_bytes_on",
    "peak_extra_rss_bytes",
    "peak_extra_torch_bytes",
    "quiet_kineto",
    "rss_available",
]
