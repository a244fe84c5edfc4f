"""The RegLoRA penalty of one LoRA pair: mean over key positions of |(B·A)[row, col]|.

    penalty = (1/n) Σ_p |ΔW[row_p, col_p]|,   ΔW = B·A in fp32, no alpha/r scaling,

over the n merged positions of all earlier tasks, duplicates counted (REFERENCE.md §2).
The value is a 0-dim fp32 tensor, differentiable in both factors. Backends:

- "reference": the official dense formula (k×d product, int64 gather, abs, mean) — the
  vanilla baseline, kept for exactness checks and benchmarks;
- "torch": CPU-fast; never builds k×d in forward or backward (sparse_backend.py): a
  sampled dense-dense product at the plan's unique positions, and the two segment sums of
  plan.py's docstring as CSR sparse × dense products, all chunked; it saves only a 2-bit
  sign code per unique position for the backward;
- "triton": the GPU kernels on the matrix's `DeviceMask` (device_mask.py): the dense-tile
  kernels (`sefe_fast_kernels.reglora_tile`) on its packed count plane plus the gather
  kernels (`sefe_fast_kernels.reglora_penalty`) on its extra list, both scaled by the
  mask's 1/n; tile or gather is chosen per matrix from the mask's density by the roofline
  model (`build_device_mask(kernel="auto")`);
- "triton_tile" / "triton_gather": the same with the representation forced (a plane with
  the tile kernels; the whole plan with the gather kernels only);
- "auto": triton for CUDA tensors, torch elsewhere.

`reglora_penalty` builds the DeviceMask on every call (fine for one-off evaluations); to
train, build the masks once per task and evaluate them with `penalty_device_mask` or, one
launch per kernel for a whole shape group, `MaskGroup` + `penalty_mask_group`.

Empty key elements give exactly 0 with zero gradients. Non-finite factors make the
penalty non-finite (NaN or inf), as in the reference; the trainer stops on a non-finite
loss, so the gradients in that case are not specified (the torch backend treats the sign
of a NaN product as 0).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import ModuleType

import torch

from sefe_fast.reglora.device_mask import DeviceMask, build_device_mask
from sefe_fast.reglora.key_elements import KeyElements
from sefe_fast.reglora.plan import PositionPlan
from sefe_fast.reglora.sparse_backend import DEFAULT_CHUNK, penalty_sparse
from sefe_fast.reglora.validation import check_factors

BACKENDS = ("auto", "reference", "torch", "triton", "triton_tile", "triton_gather")
# The DeviceMask representation each GPU backend asks build_device_mask for.
MASK_KERNELS = {"triton": "auto", "triton_tile": "tile", "triton_gather": "gather"}
TRITON_MODULE = "sefe_fast_kernels.reglora_penalty"
TILE_MODULE = "sefe_fast_kernels.reglora_tile"


def _zero_penalty(lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """Exactly 0, with exactly-zero gradients even for non-finite factors (no 0·inf)."""
    return _ZeroPenalty.apply(lora_B, lora_A)


class _ZeroPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lora_B, lora_A):
        ctx.meta = (lora_B.shape, lora_B.dtype, lora_A.shape, lora_A.dtype, lora_B.device)
        return torch.zeros((), dtype=torch.float32, device=lora_B.device)

    @staticmethod
    def backward(ctx, grad_out):
        b_shape, b_dtype, a_shape, a_dtype, device = ctx.meta
        return (
            torch.zeros(b_shape, dtype=b_dtype, device=device),
            torch.zeros(a_shape, dtype=a_dtype, device=device),
        )


def reference_penalty_from_indices(
    lora_B: torch.Tensor, lora_A: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """The official formula on int64 [n, 2] positions: mean |(B·A)[rows, cols]| (dense k×d)."""
    delta = lora_B.float() @ lora_A.float()
    return delta[indices[:, 0], indices[:, 1]].abs().mean()


def penalty_torch(
    lora_B: torch.Tensor, lora_A: torch.Tensor, plan: PositionPlan, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """The penalty on a PositionPlan with the chunked sparse backend (sparse_backend.py)."""
    if plan.n_total == 0:
        return _zero_penalty(lora_B, lora_A)
    return penalty_sparse(lora_B, lora_A, plan, chunk)


def load_triton_module(name: str = TRITON_MODULE) -> ModuleType:
    """Import a Triton kernel module lazily (default: the gather kernels); a clear error if
    it is not available."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(
            f"the 'triton' RegLoRA backends need {name} (sefe_fast's Triton kernels), "
            f"which could not be imported: {exc}. Use backend='torch' instead."
        ) from exc


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; other names are checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown RegLoRA backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_key_elements(
    key_elements: KeyElements, shape: tuple[int, int], name: str | None = None
) -> None:
    """The key elements must be KeyElements for a matrix of exactly `shape` (k, d)."""
    prefix = f"{name}: " if name else ""
    if not isinstance(key_elements, KeyElements):
        raise TypeError(f"{prefix}expected KeyElements, got {type(key_elements).__name__}")
    if key_elements.shape != tuple(shape):
        raise ValueError(
            f"{prefix}key elements are for a {key_elements.shape} matrix but "
            f"lora_B·lora_A is {tuple(shape)}"
        )


def reglora_penalty(
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    key_elements: KeyElements,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over the merged key positions of |(B·A)[row, col]| (fp32 0-dim, differentiable).

    lora_B: k×r, lora_A: r×d (float dtypes, same device); key_elements for a k×d matrix.
    Raises ValueError for non-2-D or integer factors, a rank mismatch, key elements of
    another shape, or an unknown backend.
    """
    k, _, d = check_factors(lora_B, lora_A)
    check_key_elements(key_elements, (k, d))
    return penalty_unchecked(lora_B, lora_A, key_elements, backend)


def penalty_unchecked(
    lora_B: torch.Tensor, lora_A: torch.Tensor, key_elements: KeyElements, backend: str
) -> torch.Tensor:
    """`reglora_penalty` for inputs already checked (backend names are still resolved)."""
    backend = resolve_backend(backend, lora_B.device)
    if len(key_elements) == 0:
        return _zero_penalty(lora_B, lora_A)
    if backend == "reference":
        return reference_penalty_from_indices(
            lora_B, lora_A, key_elements.indices().to(lora_B.device)
        )
    if backend == "torch":
        return penalty_torch(lora_B, lora_A, key_elements.plan(lora_B.device))
    mask = build_device_mask(
        key_elements,
        kernel=MASK_KERNELS[backend],
        rank=lora_B.shape[1],
        factor_dtype=lora_B.dtype,
        device=lora_B.device,
    )
    return penalty_device_mask(lora_B, lora_A, mask)


def penalty_device_mask(
    lora_B: torch.Tensor, lora_A: torch.Tensor, mask: DeviceMask, input_precision: str | None = None
) -> torch.Tensor:
    """The penalty of one LoRA pair on its DeviceMask with the Triton kernels (0-dim fp32).

    Plane part by the tile kernels, extra list by the gather kernels, both × 1/mask.n_total.
    input_precision: tl.dot's for fp32 factors (None: the tile module's default).
    """
    if tuple(mask.shape) != (lora_B.shape[0], lora_A.shape[1]):
        raise ValueError(
            f"the DeviceMask is for a {tuple(mask.shape)} matrix but lora_B·lora_A is "
            f"{(lora_B.shape[0], lora_A.shape[1])}"
        )
    return penalty_mask_group([lora_B], [lora_A], MaskGroup.from_masks([mask]), input_precision)[0]


@dataclass(frozen=True)
class _PlaneGroup:
    """The matrices of a MaskGroup that share one plane width: one tile launch."""

    bits: int
    members: torch.Tensor  # int64 [m], indices into the group (device)
    member_list: tuple[int, ...]
    planes: tuple[torch.Tensor, ...]
    inv_n: torch.Tensor  # fp32 [m], 1/n_total of each member's whole mask


@dataclass(frozen=True)
class MaskGroup:
    """The DeviceMasks of M same-shape matrices, arranged for one launch per kernel.

    planes: per plane width (1 or 4 bits) the members and references to their planes (no
    copy); extra: the members with an extra list and ONE GroupedPositionPlan of their lists
    (concatenated for M > 1: a copy, so keep the group and drop the masks' own lists), its
    inv_n replaced by each member's 1/mask.n_total. Build once per task with `from_masks`.
    """

    shape: tuple[int, int]
    num_matrices: int
    planes: tuple[_PlaneGroup, ...]
    extra_members: torch.Tensor | None  # int64 [e] (device)
    extra_member_list: tuple[int, ...]
    extra: object | None  # sefe_fast_kernels.reglora_penalty.GroupedPositionPlan

    @classmethod
    def from_masks(cls, masks: Sequence[DeviceMask]) -> MaskGroup:
        """Group same-shape masks (all on one device); raises ValueError naming the mask."""
        if not masks:
            raise ValueError("MaskGroup.from_masks needs at least one mask")
        shape = tuple(masks[0].shape)
        # An empty mask holds no tensor: the group's device is the first one that does.
        devices = [_mask_device(mask) for mask in masks]
        device = next((dev for dev in devices if dev is not None), torch.device("cpu"))
        for index, (mask, mask_device) in enumerate(zip(masks, devices)):
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask {index} has shape {tuple(mask.shape)}, mask 0 {shape}")
            if mask_device not in (None, device):
                raise ValueError(f"mask {index} is on {mask_device}, an earlier mask on {device}")
        planes = []
        for bits in sorted({mask.bits for mask in masks} - {0}):
            members = tuple(m for m, mask in enumerate(masks) if mask.bits == bits)
            planes.append(
                _PlaneGroup(
                    bits=bits,
                    members=torch.tensor(members, dtype=torch.int64, device=device),
                    member_list=members,
                    planes=tuple(masks[m].plane for m in members),
                    inv_n=_inv_n(masks, members, device),
                )
            )
        listed = tuple(
            m for m, mask in enumerate(masks) if mask.extra is not None and mask.extra.num_unique
        )
        extra = extra_members = None
        if listed:
            grouped_cls = load_triton_module().GroupedPositionPlan
            extra = replace(
                grouped_cls.from_plans([masks[m].extra for m in listed]),
                inv_n=_inv_n(masks, listed, device),
            )
            extra_members = torch.tensor(listed, dtype=torch.int64, device=device)
        return cls(
            shape=shape,
            num_matrices=len(masks),
            planes=tuple(planes),
            extra_members=extra_members,
            extra_member_list=listed,
            extra=extra,
        )


def _mask_device(mask: DeviceMask) -> torch.device | None:
    if mask.plane is not None:
        return mask.plane.device
    return None if mask.extra is None else mask.extra.rows.device


def _inv_n(masks: Sequence[DeviceMask], members: Sequence[int], device) -> torch.Tensor:
    values = [masks[m].inv_n_total for m in members]
    return torch.tensor(values, dtype=torch.float32, device=device)


def penalty_mask_group(
    lora_bs: Sequence[torch.Tensor],
    lora_as: Sequence[torch.Tensor],
    group: MaskGroup,
    input_precision: str | None = None,
) -> torch.Tensor:
    """Per-matrix penalties (fp32 [M]) of a shape group on its MaskGroup, differentiable in
    every factor: one tile launch per plane width present and one gather launch for all
    extra lists, each way. A matrix with neither plane nor list gives 0 (zero gradients)."""
    if len(lora_bs) != group.num_matrices or len(lora_as) != group.num_matrices:
        raise ValueError(
            f"{len(lora_bs)} B and {len(lora_as)} A factors for a group of "
            f"{group.num_matrices} masks"
        )
    device = lora_bs[0].device
    total = torch.zeros(group.num_matrices, dtype=torch.float32, device=device)
    covered = {m for part in group.planes for m in part.member_list}
    covered.update(group.extra_member_list)
    # Matrices with an empty mask: exactly 0 with exactly-zero gradients, like the others.
    for m in sorted(set(range(group.num_matrices)) - covered):
        total = total + _zero_penalty(lora_bs[m], lora_as[m]) * (
            torch.arange(group.num_matrices, device=device) == m
        )
    if group.planes:
        tile = load_triton_module(TILE_MODULE)
        extra_args = {} if input_precision is None else {"input_precision": input_precision}
        for part in group.planes:
            values = tile.penalty_tile_grouped(
                [lora_bs[m] for m in part.member_list],
                [lora_as[m] for m in part.member_list],
                part.planes,
                part.bits,
                part.inv_n,
                **extra_args,
            )
            total = total.index_add(0, part.members, values)
    if group.extra is not None:
        values = load_triton_module().penalty_triton_grouped(
            [lora_bs[m] for m in group.extra_member_list],
            [lora_as[m] for m in group.extra_member_list],
            group.extra,
        )
        total = total.index_add(0, group.extra_members, values)
    return total
