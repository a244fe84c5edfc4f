"""The measuring helpers of the benchmarks and profilers: peak memory and wall time.

One home for every measurement the tools in `sefe_fast.bench` and the benchmark suite in
`bench/` make (all in bytes or seconds):

- `peak_extra_torch_bytes`: high-water mark of the CPU tensor bytes a call allocates, net of
  frees, from the profiler's memory events (libkineto's per-session lines kept off stderr);
- `peak_extra_rss_bytes` (`rss_available`): growth of the process's resident high-water
  mark, which also sees allocator and MKL buffers (Linux /proc);
- `peak_extra_bytes`: either of the two by name; `peak_extra_bytes_on`: the right one for a
  device (CPU: tensor bytes; CUDA: `cuda_peak_extra_bytes`, the caching allocator's peak);
- `SavedTensorBytes`: the bytes of the tensors autograd saves for the backward while the
  context is active (`torch.autograd.graph.saved_tensors_hooks`), counting each storage once
  and leaving out storages that existed before (the LoRA factors, the masks, the plans):
  what a forward pins in memory until its backward runs;
- `min_time`, `interleaved_min_times`: minimum wall time over repeats (interleaved so that
  machine load hits every side alike).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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


# --- CPU peaks: resident set and tensor bytes ----------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_available() -> bool:
    """Whether /proc/self/clear_refs can reset the resident high-water mark (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim), so that a measured function
    cannot reuse pages an earlier one left resident and look free of cost."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: only less strict
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_rss_bytes(fn: Callable[[], object]) -> int:
    """Growth of the resident-set high-water mark while `fn()` runs, in bytes."""
    gc.collect()
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current VmRSS
    base = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - base)


def peak_extra_torch_bytes(fn: Callable[[], object]) -> int:
    """High-water mark of CPU tensor bytes allocated (net of frees) during `fn()`, in bytes.

    Read from the profiler's memory events (address, size, time), so it sees exactly the
    tensors torch allocates on the CPU, temporaries included. Frees of blocks allocated
    before `fn()` started (e.g. old .grad buffers) are ignored: they would hide new memory.
    libkineto's start/stop lines are kept off stderr (`quiet_kineto`).
    """
    gc.collect()
    with quiet_kineto(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [
        e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    memory.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live: dict[int, int] = {}
    current = peak = 0
    for event in memory:
        nbytes, address = int(event["args"]["Bytes"]), int(event["args"]["Addr"])
        if nbytes > 0:
            live[address] = live.get(address, 0) + nbytes
            current += nbytes
        elif address in live:
            current -= live.pop(address)
        peak = max(peak, current)
    return peak


def peak_extra_bytes(fn: Callable[[], object], method: str = "torch") -> int:
    """Peak extra memory of `fn()` in bytes: method "torch" (tensors) or "rss" (process)."""
    if method == "torch":
        return peak_extra_torch_bytes(fn)
    if method == "rss":
        return peak_extra_rss_bytes(fn)
    raise ValueError(f"unknown memory method {method!r}; use 'torch' or 'rss'")


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


# --- wall time ------------------------------------------------------------------------------
def min_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_min_times(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Minimum seconds per function, running them in turn so load affects all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


__all__ = [
    "SavedTensorBytes",
    "cuda_peak_extra_bytes",
    "interleaved_min_times",
    "min_time",
    "peak_extra_bytes",
    "peak_extra_bytes_on",
    "peak_extra_rss_bytes",
    "peak_extra_torch_bytes",
    "quiet_kineto",
    "rss_available",
]
