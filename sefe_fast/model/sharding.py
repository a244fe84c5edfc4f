"""FSDP for models that do not fit one device: the frozen base sharded, the trainable replicated.

`--fsdp` shards every transformer block of the LLM and the vision tower, and the rest of
the model at the root, with PyTorch's FSDP2 (`fully_shard`): each rank keeps 1/N of the
frozen weights and all-gathers one block at a time for its forward (and backward). What
trains stays whole on every rank: the projector (left out of sharding) and each task's
LoRA factors (attached after sharding, so FSDP never sees them). Those are a few percent of
a 7B model; replicating them keeps RegLoRA's penalty, key-element selection and the fused
kernels working on plain tensors, and their gradients are averaged over ranks like DDP's
(`sefe_fast.train.distributed.average_gradients`).

Merging a task's LoRA adds each rank's rows of the scaled B·A to its shard of the weight
(no full weight is ever gathered for it).

Full fine-tuning (`--method fft`) trains the sharded weights themselves: FSDP2
reduce-scatters their gradients, AdamW's state is created per shard (each rank holds about
1/N of weights, gradients and optimizer state), the gradient norm sums the shards' squares
over ranks, and checkpoints and saved stages gather whole tensors (the helpers at the end).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.distributed.tensor import DTensor, distribute_tensor


def _block_classes(model: torch.nn.Module) -> set[str]:
    """Names of the classes HF does not split (the transformer blocks, embeddings)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules: cannot tell its "
            "transformer blocks apart for FSDP"
        )
    return names


def shard_model(
    model: torch.nn.Module,
    device: torch.device,
    world_size: int,
    keep_whole: Iterable[torch.nn.Parameter] = (),
) -> int:
    """Shard `model` in place over `world_size` ranks on `device` (FSDP2); return the number
    of blocks sharded.

    Every module of a class in `model._no_split_modules` becomes its own FSDP unit (freed
    after its forward), the root holds the rest; `keep_whole` parameters (the projector) are
    not sharded and are moved to `device` as they are. Needs an initialised process group.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    classes = _block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    whole = set(keep_whole)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    with torch.no_grad():
        for param in whole:
            param.data = param.data.to(device)
    return len(blocks)


def local_parameter_share(model: torch.nn.Module) -> float:
    """Share of the model's parameter elements this rank holds (1.0 unsharded; about 1/N
    of the sharded part plus all of the whole part when sharded over N ranks)."""
    local = total = 0
    for param in model.parameters():
        total += param.numel()
        local += param.to_local().numel() if isinstance(param, DTensor) else param.numel()
    return local / max(total, 1)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when some parameter of `model` is sharded (a DTensor)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard_all(model: torch.nn.Module) -> None:
    """Free any all-gathered weights, so every FSDP parameter is back to its shard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def add_to_weight(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """weight += delta, in place, for a plain or a sharded weight.

    For a DTensor each rank adds the part of `delta` (a full, replicated tensor of the
    weight's global shape) that its shard holds; no communication.
    """
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"delta of shape {tuple(delta.shape)} for weight {tuple(weight.shape)}")
    delta = delta.detach().to(dtype=weight.dtype, device=weight.device)
    if isinstance(weight, DTensor):
        local = distribute_tensor(
            delta, weight.device_mesh, weight.placements, src_data_rank=None
        ).to_local()
        weight.to_local().add_(local)
    else:
        weight.add_(delta)


# ---------------------------------------------------------------------- trained sharded weights
# With full fine-tuning (`--method fft --fsdp`) the trained weights themselves are sharded
# (DTensors): FSDP2 reduce-scatters their gradients, AdamW keeps its state per shard, and
# whatever leaves the rank (checkpoints, saved stages) is gathered into full tensors first.
# Every function below that gathers is a collective: every rank calls it, in the same order.


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (collective), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered_copy(obj: Any) -> Any:
    """A deep copy of `obj` (nested dicts, lists, tuples of tensors and plain values) with
    every DTensor replaced by its full tensor (collective when `obj` holds any)."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {key: gathered_copy(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(gathered_copy(value) for value in obj)
    return copy.deepcopy(obj)


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """param ← full, in place, `full` holding the whole tensor; for a DTensor each rank
    copies the part its shard holds (no communication)."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"a tensor of shape {tuple(full.shape)} for {tuple(param.shape)}")
    if isinstance(param, DTensor):
        local = distribute_tensor(
            full.to(device=param.device, dtype=param.dtype),
            param.device_mesh,
            param.placements,
            src_data_rank=None,
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of a gathered state: every per-element state tensor
    of a sharded parameter (same shape as it) becomes a DTensor sharded like it again."""
    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            per_element = isinstance(value, torch.Tensor) and value.shape == param.shape
            if per_element and not isinstance(value, DTensor):
                state[key] = distribute_tensor(
                    value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                )


def local_state_share(optimizer: torch.optim.Optimizer) -> float:
    """Share of the optimizer state's elements this rank holds (1.0 unsharded, about 1/N of
    a sharded model's state over N ranks)."""
    local = total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                total += value.numel()
                local += value.to_local().numel() if isinstance(value, DTensor) else value.numel()
    return local / max(total, 1)


@torch.no_grad()
def clip_sharded_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients of `params`, some sharded (DTensors, their squares
    summed over ranks) and some whole (the same on every rank, counted once); when
    `max_norm` > 0 the gradients are scaled by min(1, max_norm / (norm + 1e-6)), as
    `torch.nn.utils.clip_grad_norm_` does. Collective."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    device = (sharded or whole)[0].device
    square = torch.zeros((), dtype=torch.float64, device=device)
    for g in sharded:
        square += g.double().pow(2).sum()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(square, op=torch_dist.ReduceOp.SUM)
    for g in whole:
        square += g.double().pow(2).sum()
    norm = square.sqrt().float()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in sharded + whole:
            g.mul_(coef.to(g.dtype))
    return norm
