"""Feeding the training loop: the deterministic micro-batch schedule and a DataLoader over it.

The order of samples is fixed by `BatchSchedule`: micro-batch m of a task holds the same
dataset indices on a given rank whatever else happens (`group_by_length` decides who shares
a micro-batch). The loader
only decides *where* the samples are read: with `num_workers = 0` in the training process
(the CPU default: worker processes would compete with the model for the cores), with
`num_workers > 0` in worker processes that read, decode and pad-to-square the images and
collate the batch, `prefetch_factor` micro-batches ahead per worker, into pinned memory on
CUDA so that the copy to the GPU overlaps compute (`non_blocking`). Workers deliver batches
in the sampler's order, and reading a sample is deterministic (no random augmentation), so
the batches are identical, in order and content, with any number of workers; a resumed
task starts the sampler at its first unseen micro-batch, so it sees exactly the batches
the uninterrupted run would have seen.

The loader gets its own seeded generator: creating it then draws nothing from the global
torch RNG, whose state (LoRA dropout) is part of the checkpoint.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, get_worker_info

from sefe_fast.train.distributed import DistContext


class BatchSchedule:
    """Which dataset indices this rank's micro-batch m (0, 1, ...) holds.

    Epoch e is DistributedSampler's permutation with seed `seed` and epoch e, this rank's
    share cut into micro-batches of `batch_size` (a short last one dropped); an epoch holds
    `steps_per_epoch · grad_accum` micro-batches so every step sees whole micro-batches.
    """

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        dist: DistContext,
        lengths: Sequence[int] | None = None,
    ):
        self.n, self.batch_size, self.grad_accum, self.seed, self.dist = (
            n,
            batch_size,
            grad_accum,
            seed,
            dist,
        )
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} samples")
        self.lengths = lengths
        per_rank = n // dist.world_size
        self.steps_per_epoch = per_rank // batch_size // grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{n} samples are too few for one optimizer step of {batch_size} x "
                f"{grad_accum} micro-batches on {dist.world_size} ranks"
            )
        self._epoch, self._batches = -1, []

    def micro_batch(self, m: int) -> list[int]:
        """Indices of micro-batch `m` (counted from the start of the task)."""
        per_epoch = self.steps_per_epoch * self.grad_accum
        epoch, position = divmod(m, per_epoch)
        if epoch != self._epoch:
            sampler = DistributedSampler(
                range(self.n),
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
                shuffle=True,
                seed=self.seed,
                drop_last=True,
            )
            sampler.set_epoch(epoch)
            order = list(sampler)[: per_epoch * self.batch_size]
            if self.lengths is not None:
                self._batches = group_by_length(
                    order, self.lengths, self.batch_size, seed=self.seed + 1_000 * epoch
                )
            else:
                self._batches = [
                    order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)
                ]
            self._epoch = epoch
        return self._batches[position]


# Micro-batches whose samples are sorted together by length (LLaVA's "megabatch").
LENGTH_GROUP_BATCHES = 8


def group_by_length(
    order: Sequence[int], lengths: Sequence[int], batch_size: int, *, seed: int
) -> list[list[int]]:
    """Cut `order` into micro-batches of similar length: returns lists of dataset indices.

    Every run of `LENGTH_GROUP_BATCHES` micro-batches of `order` is sorted by length and cut
    again, then all micro-batches are shuffled (seeded). The samples, and which group a sample
    falls in, stay those of `order`; only who shares a micro-batch changes. With ASD a few
    samples carry ~300-token explanations: grouped, they no longer pad every batch they land
    in to their length (the default sefe run on 2 CPU cores: ~10.5 → 7.25 min, two runs one
    after the other, not a side-by-side benchmark).
    """
    group = batch_size * LENGTH_GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


# Workers per rank on CUDA when not set: enough to decode JPEGs for one GPU's micro-batches.
DEFAULT_CUDA_WORKERS = 4


class MicroBatchSampler(Sampler[list[int]]):
    """Yields the dataset indices of micro-batches `first`, ..., `first + count - 1`.

    `micro_batch(m)` is a callable returning micro-batch m's indices (`BatchSchedule`).
    """

    def __init__(self, micro_batch: Callable[[int], list[int]], first: int, count: int) -> None:
        if first < 0 or count < 0:
            raise ValueError(f"bad micro-batch range: first {first}, count {count}")
        self.micro_batch, self.first, self.count = micro_batch, first, count

    def __iter__(self) -> Iterator[list[int]]:
        for m in range(self.first, self.first + self.count):
            yield list(self.micro_batch(m))

    def __len__(self) -> int:
        return self.count


def _worker_without_pixel_cache(worker_id: int) -> None:
    """Worker start-up: no in-memory pixel cache in a worker (`CoinTrainDataset` keeps up
    to 1 GiB). Workers live for one task, in which an image is usually read once per
    epoch; a cache per worker would multiply host memory by workers × ranks."""
    dataset = get_worker_info().dataset
    if hasattr(dataset, "pixel_cache_bytes"):
        dataset.pixel_cache_bytes = 0


def resolve_num_workers(num_workers: int | None, device: torch.device, world_size: int) -> int:
    """Worker processes per rank: `num_workers` if set, else 0 on CPU and
    min(DEFAULT_CUDA_WORKERS, CPU cores per rank - 1) on CUDA."""
    if num_workers is not None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be ≥ 0, got {num_workers}")
        return num_workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(DEFAULT_CUDA_WORKERS, (cores or 1) // max(world_size, 1) - 1))


def micro_batch_loader(
    dataset: Any,
    collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]],
    micro_batch: Callable[[int], list[int]],
    *,
    first: int,
    count: int,
    num_workers: int,
    device: torch.device,
    seed: int,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader yielding collated micro-batches `first` … `first + count - 1` in order.

    `collate` must be picklable when `num_workers > 0` (a module-level function or a
    `functools.partial` of one). Memory is pinned when `device` is CUDA.
    """
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_sampler=MicroBatchSampler(micro_batch, first, count),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=False,
        worker_init_fn=_worker_without_pixel_cache if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
