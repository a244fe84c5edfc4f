"""What the benchmark suite measures: shapes, ranks, prior tasks, rounds, and the masks.

The full set covers the LLaVA-1.5-7B LoRA shapes (q/k/v/o 4096×4096, gate/up 11008×4096,
down 4096×11008) at r = 128 and r = 16 (MCITlib's rank), with the merged masks of 1, 3 and
7 prior tasks at M = 2 %. With SEFE_FAST_BENCH_QUICK=1 only 4096×4096 at r = 16 with 1
and 7 prior tasks runs, 2 rounds each (CI).

Masks are real selections — the top 2 % of |B·A| of seeded random LoRA factors, one per
task — shared with `python -m sefe_fast.profile_memory` through its on-disk selection
cache (`sefe_fast.bench.workloads.task_selection`), so a second run skips them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sefe_fast.bench.workloads import (
    CURRENT_SEED,
    default_cache_dir,
    random_lora,
    task_selection,
)
from sefe_fast.reglora import KeyElements, merge_key_elements

QUICK = os.environ.get("SEFE_FAST_BENCH_QUICK", "") not in ("", "0")
# Intra-op threads for both sides: $SEFE_FAST_BENCH_THREADS, default 1 ("0": torch's
# default, all cores). On a shared, loaded machine the fast path's many short parallel
# regions stall whenever one of their threads is descheduled (2 threads on 2 busy cores ran
# it 10-100× slower, erratically, and the full suite took 9.5 minutes instead of 1.6);
# 1 thread gives stable per-core numbers for both sides.
THREADS_ENV = "SEFE_FAST_BENCH_THREADS"


def configure_threads() -> int:
    """Apply $SEFE_FAST_BENCH_THREADS (default 1; 0 keeps torch's default) to torch and
    return the number of intra-op threads in use."""
    raw = os.environ.get(THREADS_ENV, "").strip() or "1"
    try:
        threads = int(raw)
    except ValueError:
        threads = -1
    if threads < 0:
        raise ValueError(f"{THREADS_ENV}={raw!r} must be a non-negative integer")
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


RATIO = 0.02
VANILLA_BYTES_PER_ENTRY = 16  # int64 (row, col) pairs, as the official code stores them
CUDA = torch.cuda.is_available()
TRITON_SKIP_REASON = "Triton timings need CUDA; interpreter timings mean nothing"
CUDA_SKIP_REASON = "CUDA cases need a GPU (the vanilla baseline of the Triton cases)"
CUDA_SELECTION_SKIP_REASON = "selection on CUDA needs a GPU"


@dataclass(frozen=True)
class Shape:
    """ΔW = B·A of shape k×d (k = out features, d = in features) for the named linears."""

    names: str
    k: int
    d: int

    @property
    def id(self) -> str:
        return f"{self.k}x{self.d}"


LLAVA_7B_SHAPES = (
    Shape("q,k,v,o", 4096, 4096),
    Shape("gate,up", 11008, 4096),
    Shape("down", 4096, 11008),
)
SHAPES = LLAVA_7B_SHAPES[:1] if QUICK else LLAVA_7B_SHAPES
RANKS = (16,) if QUICK else (128, 16)
PRIOR_TASKS = (1, 7) if QUICK else (1, 3, 7)


def rounds_for(shape: Shape, device: str, seconds_per_call: float) -> int:
    """Timed rounds per case: as many as fit a small time budget, within [2, max].

    Cheap calls get more rounds (their minimum is then less exposed to other load on the
    shared 2-core machine); the big CPU shapes get 2 (the suite's 10-minute budget).
    """
    if device == "cuda":
        return 20
    budget_s, most = (1.5, 3) if QUICK else (2.5, 6)
    return max(2, min(most, int(budget_s / max(seconds_per_call, 1e-3))))


def current_factors(
    shape: Shape, rank: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA pair being trained (leaf tensors with gradient buffers already allocated,
    as in training, so the measured backward does not count them)."""
    lora_B, lora_A = random_lora(shape.k, shape.d, rank, seed=CURRENT_SEED)
    B = lora_B.to(device=device, dtype=dtype).requires_grad_()
    A = lora_A.to(device=device, dtype=dtype).requires_grad_()
    B.grad, A.grad = torch.zeros_like(B), torch.zeros_like(A)
    return B, A


def factor_dtype(device: str) -> torch.dtype:
    """fp32 on the CPU; bf16 on CUDA (how LLaVA LoRA trains; both sides compute in fp32)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


class MaskStore:
    """Per-task selections for (shape, rank), computed or read from the disk cache once."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[int, int, int], list[KeyElements]] = {}
        self.cache_dir = default_cache_dir()

    def merged(self, shape: Shape, rank: int, prior_tasks: int) -> KeyElements:
        """The merged key elements of tasks 0 … prior_tasks-1 (duplicates kept)."""
        key = (shape.k, shape.d, rank)
        selections = self._tasks.setdefault(key, [])
        while len(selections) < prior_tasks:
            selections.append(
                task_selection(shape.k, shape.d, rank, RATIO, len(selections), self.cache_dir)
            )
        return merge_key_elements(selections[:prior_tasks])


def case_extra_info(kind, side, device, lora_B, shape, rank, positions, peak) -> dict:
    """The benchmark metadata every penalty and selection case carries (bytes, counts)."""
    return {
        "kind": kind,
        "side": side,
        "device": device,
        "dtype": str(lora_B.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "shape_names": shape.names,
        "k": shape.k,
        "d": shape.d,
        "rank": rank,
        "ratio": RATIO,
        "positions": positions,
        "peak_extra_bytes": int(peak),
        "peak_method": "cuda max_memory_allocated"
        if device == "cuda"
        else "torch profiler memory events (tensor bytes)",
    }
