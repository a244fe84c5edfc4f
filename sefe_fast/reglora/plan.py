"""PositionPlan: the index structures every fast penalty backend evaluates on.

The penalty of one LoRA pair (B: k×r, A: r×d) over n merged key positions
(duplicates kept, REFERENCE.md §2) is

    penalty = (1/n) Σ_p |(B·A)[row_p, col_p]|
            = Σ_u w_u · |Σ_j B[row_u, j] · A[j, col_u]|,   w_u = count_u / n,

where u runs over the *unique* positions and count_u is how often position u was
chosen. With s_u = w_u · sign(ΔW[row_u, col_u]) the gradients are

    ∂/∂B[i, :] = Σ_{u in row i} s_u · A[:, col_u]     (CSR order: rows/cols/row_ptr)
    ∂/∂A[:, j] = Σ_{u in col j} s_u · B[row_u, :]     (CSC order: col_order/col_ptr)

Both segment sums are deterministic (no atomics), which is why the plan keeps both
orders. A plan depends only on the key elements, so it is built once per task and
reused for every training step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class PositionPlan:
    """Unique positions of one matrix, with weights and CSR/CSC offsets.

    shape: (k, d) of ΔW. rows, cols: int32 [u], unique positions sorted row-major
    (then by column). weights: float32 [u], multiplicity / n_total. row_ptr: int32 [k+1],
    positions of row i are rows[row_ptr[i]:row_ptr[i+1]]. col_order: int32 [u], a
    permutation listing positions column-major; col_ptr: int32 [d+1], positions of
    column j are col_order[col_ptr[j]:col_ptr[j+1]]. n_total: number of positions with
    multiplicity (the mean's denominator; 0 for an empty plan).
    """

    shape: tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    weights: torch.Tensor
    row_ptr: torch.Tensor
    col_order: torch.Tensor
    col_ptr: torch.Tensor
    n_total: int

    @property
    def num_unique(self) -> int:
        """Number of distinct positions."""
        return int(self.rows.numel())

    @classmethod
    def from_indices(cls, indices: torch.Tensor, shape: tuple[int, int]) -> PositionPlan:
        """Build a plan from [n, 2] (row, col) positions, duplicates counted as multiplicity."""
        k, d = int(shape[0]), int(shape[1])
        if indices.ndim != 2 or indices.shape[1] != 2:
            raise ValueError(f"indices must have shape [n, 2], got {tuple(indices.shape)}")
        indices = indices.to(torch.int64)
        n_total = int(indices.shape[0])
        if n_total and (
            indices[:, 0].min() < 0
            or indices[:, 0].max() >= k
            or indices[:, 1].min() < 0
            or indices[:, 1].max() >= d
        ):
            raise ValueError(f"indices fall outside the matrix shape {(k, d)}")
        linear = indices[:, 0] * d + indices[:, 1]
        unique, counts = torch.unique(linear, sorted=True, return_counts=True)
        return cls.from_linear(unique, counts, (k, d), n_total)

    @classmethod
    def from_linear(
        cls, unique: torch.Tensor, counts: torch.Tensor, shape: tuple[int, int], n_total: int
    ) -> PositionPlan:
        """Build a plan from sorted unique row-major linear indices and their counts."""
        k, d = int(shape[0]), int(shape[1])
        rows = torch.div(unique, d, rounding_mode="floor")
        cols = unique - rows * d
        weights = counts.to(torch.float32) / max(n_total, 1)
        row_ptr = torch.zeros(k + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=k), 0)
        col_order = torch.sort(cols * k + rows).indices  # stable column-major order
        col_ptr = torch.zeros(d + 1, dtype=torch.int64)
        col_ptr[1:] = torch.cumsum(torch.bincount(cols, minlength=d), 0)
        return cls(
            shape=(k, d),
            rows=rows.to(torch.int32),
            cols=cols.to(torch.int32),
            weights=weights,
            row_ptr=row_ptr.to(torch.int32),
            col_order=col_order.to(torch.int32),
            col_ptr=col_ptr.to(torch.int32),
            n_total=int(n_total),
        )

    def to(self, device: torch.device | str) -> PositionPlan:
        """A copy of the plan with every tensor on `device`."""
        return tensors_to(self, device)


def tensors_to(plan, device: torch.device | str):
    """A copy of a frozen plan dataclass with every tensor field moved to `device`."""
    moved = {
        f.name: getattr(plan, f.name).to(device)
        for f in fields(plan)
        if isinstance(getattr(plan, f.name), torch.Tensor)
    }
    return replace(plan, **moved)
