"""The RegLoRA penalty of one LoRA pair: mean over key positions of |(B·A)[row, col]|.

    penalty = (1/n) Σ_p |ΔW[row_p, col_p]|,   ΔW = B·A in fp32, no alpha/r scaling,

over the n merged positions of all earlier tasks, duplicates counted (docs/reference.md §2).
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
launch per kernel for a whole (shape, bits) group, a `DeviceMaskGroup` with
`penalty_mask_group`.

Empty key elements give exactly 0 with zero gradients. Non-finite factors make the
penalty non-finite (NaN or inf), as in the reference; the trainer stops on a non-finite
loss, so the gradients in that case are not specified (the torch backend treats the sign
of a NaN product as 0).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import replace
from types import ModuleType

import torch

from sefe_fast.position_plan import PositionPlan
from sefe_fast.reglora.device_mask import DeviceMask, DeviceMaskGroup, build_device_mask
from sefe_fast.reglora.key_elements import KeyElements
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


def load_triton_module(name: str) -> ModuleType:
    """Import a Triton kernel module lazily (default: the gather kernels); a clear error if
    it is not available."""
    # Triton is an optional dependency (CUDA machines only), so the kernels are imported on
    # first use, not at module level. By name, so a test can stand a fake in sys.modules.
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
    if mask.n_total == 0:
        return _zero_penalty(lora_B, lora_A)
    group = _group_of_one(mask, lora_B.device)
    return penalty_mask_group([lora_B], [lora_A], group, input_precision)[0]


def _group_of_one(mask: DeviceMask, device: torch.device) -> DeviceMaskGroup:
    """A DeviceMaskGroup of one matrix holding the mask's own tensors (no copy)."""
    inv_n = torch.full((1,), mask.inv_n_total, dtype=torch.float32, device=device)
    extra = None
    if mask.extra is not None and mask.extra.num_unique:
        grouped = load_triton_module(TRITON_MODULE).GroupedPositionPlan.from_plans([mask.extra])
        extra = replace(grouped, inv_n=inv_n)  # the whole mask's 1/n, not the list's own
    return DeviceMaskGroup(
        shape=tuple(mask.shape),
        bits=mask.bits,
        n_total=(mask.n_total,),
        planes=() if mask.plane is None else (mask.plane,),
        inv_n=inv_n,
        extra=extra,
        extra_members=() if extra is None else (0,),
    )


# (device, member indices) -> int64 index tensor: built once, so that a training step does
# not copy a host list to the device (a copy from pageable memory waits for the stream).
_MEMBER_INDEX: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}


def _member_index(members: tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (str(device), members)
    index = _MEMBER_INDEX.get(key)
    if index is None:
        index = torch.tensor(members, dtype=torch.int64, device=device)
        _MEMBER_INDEX[key] = index
    return index


def penalty_mask_group(
    lora_bs: Sequence[torch.Tensor],
    lora_as: Sequence[torch.Tensor],
    group: DeviceMaskGroup,
    input_precision: str | None = None,
) -> torch.Tensor:
    """Per-matrix penalties (fp32 [M]) of the M same-shape matrices of a DeviceMaskGroup,
    differentiable in every factor: one tile launch on the planes (bits > 0) and one gather
    launch on the extra lists, each way, both scaled by each mask's 1/n_total."""
    if len(lora_bs) != group.num_matrices or len(lora_as) != group.num_matrices:
        raise ValueError(
            f"{len(lora_bs)} B and {len(lora_as)} A factors for a group of "
            f"{group.num_matrices} masks"
        )
    total = None
    if group.bits:
        tile = load_triton_module(TILE_MODULE)
        options = {} if input_precision is None else {"input_precision": input_precision}
        total = tile.penalty_tile_grouped(
            lora_bs, lora_as, group.planes, group.bits, group.inv_n, **options
        )
    if group.extra is not None:
        members = tuple(group.extra_members)
        listed = load_triton_module(TRITON_MODULE).penalty_triton_grouped(
            [lora_bs[m] for m in members], [lora_as[m] for m in members], group.extra
        )
        if members == tuple(range(group.num_matrices)):
            total = listed if total is None else total + listed
        else:
            if total is None:
                total = torch.zeros(group.num_matrices, dtype=torch.float32, device=listed.device)
            total = total.index_add(0, _member_index(members, listed.device), listed)
    if total is None:  # neither planes nor lists: every mask is empty
        total = torch.stack([_zero_penalty(b, a) for b, a in zip(lora_bs, lora_as)])
    return total
