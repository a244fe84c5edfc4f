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
- "triton": `sefe_fast_kernels.reglora_penalty.penalty_triton` (GPU kernels);
- "auto": triton for CUDA tensors, torch elsewhere.

Empty key elements give exactly 0 with zero gradients. Non-finite factors make the
penalty non-finite (NaN or inf), as in the reference; the trainer stops on a non-finite
loss, so the gradients in that case are not specified (the torch backend treats the sign
of a NaN product as 0).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from sefe_fast.position_plan import PositionPlan
from sefe_fast.reglora.key_elements import KeyElements
from sefe_fast.reglora.sparse_backend import DEFAULT_CHUNK, penalty_sparse
from sefe_fast.reglora.validation import check_factors

BACKENDS = ("auto", "reference", "torch", "triton")
TRITON_MODULE = "sefe_fast_kernels.reglora_penalty"


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


def load_triton_module() -> ModuleType:
    """Import the Triton kernels lazily; a clear error if they are not available."""
    # Triton is an optional dependency (CUDA machines only), so the kernels are imported on
    # first use, not at module level. By name, so a test can stand a fake in sys.modules.
    try:
        return importlib.import_module(TRITON_MODULE)
    except ImportError as exc:
        raise RuntimeError(
            f"the 'triton' RegLoRA backend needs {TRITON_MODULE} (sefe_fast's Triton kernels), "
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
    plan = key_elements.plan(lora_B.device)
    if backend == "torch":
        return penalty_torch(lora_B, lora_A, plan)
    return load_triton_module().penalty_triton(lora_B, lora_A, plan)
