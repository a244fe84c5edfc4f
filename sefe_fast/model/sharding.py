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
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
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
