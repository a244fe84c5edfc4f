"""Process-group setup and the few collectives the trainer needs.

Works the same with and without `torchrun`: without it (no WORLD_SIZE in the environment)
the run is a single process and every collective is the identity. NCCL on CUDA, Gloo on
the CPU. Rank 0 is the only writer; other ranks compute and hand results to it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run: global rank, world size, local rank, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is active."""
        return self.world_size > 1


def init_distributed(timeout_minutes: float = 120.0) -> DistContext:
    """Join the torchrun process group if there is one (NCCL on CUDA, Gloo on CPU).

    The timeout is long because rank 0 may pretrain or convert data while the others wait.
    On the CPU each process gets an equal share of the cores, so two processes on two
    cores do not oversubscribe them.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Leave the process group (no-op for a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place, and return it."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over ranks (what DDP does), in one
    all-reduce of the flattened gradients. A missing gradient counts as zeros (and is
    created), so every rank reduces the same shapes."""
    if (
        not (torch_dist.is_available() and torch_dist.is_initialized())
        or torch_dist.get_world_size() == 1
    ):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat /= torch_dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank; a one-element list without torchrun)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main_first(dist: DistContext, fn, *args, **kwargs) -> Any:
    """Run `fn` on rank 0 (which may write files), then on the others after a barrier.

    For idempotent preparation steps (data generation, caches): rank 0 does the work,
    the others find it done. An exception on rank 0 is re-raised on every rank.
    """
    result, error = None, None
    if dist.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # propagate to the other ranks instead of hanging them
            error = f"{type(exc).__name__}: {exc}"
            if not dist.distributed:
                raise
    error = broadcast_object(error)
    if error is not None:
        if dist.is_main:
            raise RuntimeError(error)
        raise RuntimeError(f"rank 0 failed: {error}")
    if not dist.is_main:
        result = fn(*args, **kwargs)
    return result
