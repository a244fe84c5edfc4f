"""PositionPlan: the index structures every fast penalty backend evaluates on.

The penalty of one LoRA pair (B: k×r, A: r×d) over n merged key positions
(duplicates kept, docs/reference.md §2) is

    penalty = (1/n) Σ_p |(B·A)[row_p, col_p]|
            = (1/n) Σ_u c_u · |Σ_j B[row_u, j] · A[j, col_u]|,

where u runs over the *unique* positions and c_u is how often position u was chosen
(its multiplicity). With s_u = c_u · sign(ΔW[row_u, col_u]) the gradients are

    ∂/∂B[i, :] = (1/n) Σ_{u in row i} s_u · A[:, col_u]     (CSR order: rows/cols/row_ptr)
    ∂/∂A[:, j] = (1/n) Σ_{u in col j} s_u · B[row_u, :]     (CSC order: col_order/col_ptr)

Both segment sums are deterministic (no atomics), which is why the plan keeps both
orders. A plan depends only on the key elements, so it is built once per task and
reused for every training step.

The plan lives in device memory for the whole task, so its per-position arrays are as
narrow as the matrix allows: rows and cols are int16 when the dimension fits (every
LLaVA-7B/13B matrix does), the multiplicity is uint8 (a position is chosen at most once
per task, so it only overflows after 255 tasks; then int32), and the 1/n is applied once
per matrix instead of being stored per position. That is 9 bytes per unique position
(2 + 2 + 1 + 4 for the int32 column-major permutation) instead of 16 with int32 indices
and fp32 weights.

Building a plan streams: `plan_from_blocks` takes the distinct positions row block by row
block (sorted, with their multiplicities, e.g. from `KeyElements.unique_row_blocks`), counts
them per column in a first pass (`mask_stats`), then writes every position straight into
its final slot in a second one — the row-major arrays in order, the column-major
permutation by a stable counting sort over the column offsets. The transient memory is one
row block's int64 temporaries, never an int64 array over all n positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace

import torch

# (linear, counts) per row block: sorted distinct row-major indices and multiplicities, int64.
RowBlocks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class PositionPlan:
    """Unique positions of one matrix, with multiplicities and CSR/CSC offsets.

    shape: (k, d) of ΔW. rows, cols: [u] unique positions sorted row-major (then by
    column), `index_dtype(k)` / `index_dtype(d)` (int16 or int32). counts: [u]
    multiplicity of each position, uint8 (int32 past 255). row_ptr: int32 [k+1],
    positions of row i are rows[row_ptr[i]:row_ptr[i+1]]. col_order: int32 [u], a
    permutation listing positions column-major; col_ptr: int32 [d+1], positions of
    column j are col_order[col_ptr[j]:col_ptr[j+1]]. n_total: number of positions with
    multiplicity (the mean's denominator; 0 for an empty plan).
    """

    shape: tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    counts: torch.Tensor
    row_ptr: torch.Tensor
    col_order: torch.Tensor
    col_ptr: torch.Tensor
    n_total: int

    @property
    def num_unique(self) -> int:
        """Number of distinct positions."""
        return int(self.rows.numel())

    @property
    def inv_n_total(self) -> float:
        """1 / n_total, the mean's scale (1 for an empty plan, whose sums are 0 anyway)."""
        return 1.0 / max(self.n_total, 1)

    @property
    def weights(self) -> torch.Tensor:
        """fp32 [u]: each position's weight in the mean, multiplicity / n_total (built on call)."""
        return self.counts.to(torch.float32) / max(self.n_total, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the plan's tensors (what a backend holds on its device for the task)."""
        return plan_nbytes(self)

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
        row_ptr = torch.zeros(k + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=k), 0)
        col_order = torch.sort(cols * k + rows).indices  # stable column-major order
        col_ptr = torch.zeros(d + 1, dtype=torch.int64)
        col_ptr[1:] = torch.cumsum(torch.bincount(cols, minlength=d), 0)
        max_count = int(counts.max()) if counts.numel() else 0
        return cls(
            shape=(k, d),
            rows=rows.to(index_dtype(k)),
            cols=cols.to(index_dtype(d)),
            counts=counts.to(torch.uint8 if max_count <= 255 else torch.int32),
            row_ptr=row_ptr.to(torch.int32),
            col_order=col_order.to(torch.int32),
            col_ptr=col_ptr.to(torch.int32),
            n_total=int(n_total),
        )

    def to(self, device: torch.device | str) -> PositionPlan:
        """A copy of the plan with every tensor on `device`."""
        return tensors_to(self, device)


@dataclass(frozen=True)
class MaskStats:
    """Counts of one merged mask, from one streamed pass (see `mask_stats`).

    shape: (k, d); n_total: positions with multiplicity; num_unique: distinct positions;
    max_count: largest multiplicity (0 for an empty mask); above[t]: how many distinct
    positions have a multiplicity > t; col_counts[t]: int64 [d], the same per column.
    """

    shape: tuple[int, int]
    n_total: int
    num_unique: int
    max_count: int
    above: dict[int, int]
    col_counts: dict[int, torch.Tensor]


def mask_stats(
    shape: tuple[int, int], blocks: RowBlocks, thresholds: Iterable[int] = (0,)
) -> MaskStats:
    """One pass over the row blocks: totals, the largest multiplicity and, for every
    threshold t, the number of distinct positions (overall and per column) with count > t."""
    d = int(shape[1])
    thresholds = sorted(set(int(t) for t in thresholds) | {0})
    above = dict.fromkeys(thresholds, 0)
    col_counts = {t: torch.zeros(d, dtype=torch.int64) for t in thresholds}
    n_total = max_count = 0
    for linear, counts in blocks():
        if linear.numel() == 0:
            continue
        n_total += int(counts.sum())
        max_count = max(max_count, int(counts.max()))
        cols = linear % d
        for t in thresholds:
            keep = cols if t == 0 else cols[counts > t]
            above[t] += int(keep.numel())
            col_counts[t] += torch.bincount(keep, minlength=d)
    return MaskStats(
        shape=(int(shape[0]), d),
        n_total=n_total,
        num_unique=above[0],
        max_count=max_count,
        above=above,
        col_counts=col_counts,
    )


def count_dtype(max_count: int) -> torch.dtype:
    """uint8 multiplicities unless one exceeds 255 (then int32)."""
    return torch.uint8 if max_count <= 255 else torch.int32


def plan_from_blocks(
    shape: tuple[int, int],
    blocks: RowBlocks,
    n_total: int,
    threshold: int = 0,
    stats: MaskStats | None = None,
) -> PositionPlan:
    """The PositionPlan of the positions whose multiplicity exceeds `threshold`, each with
    multiplicity count − threshold, built in two streamed passes over `blocks` (or one,
    given the `stats` of a previous pass). `n_total` becomes the plan's denominator.

    Holds only the plan itself plus one row block's temporaries (see the module docstring).
    """
    k, d = int(shape[0]), int(shape[1])
    if stats is None or threshold not in stats.col_counts:
        stats = mask_stats((k, d), blocks, (threshold,))
    u = stats.above[threshold]
    rows = torch.empty(u, dtype=index_dtype(k))
    cols = torch.empty(u, dtype=index_dtype(d))
    counts_out = torch.empty(u, dtype=count_dtype(max(stats.max_count - threshold, 0)))
    col_order = torch.empty(u, dtype=torch.int32)
    col_ptr = torch.zeros(d + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(stats.col_counts[threshold], 0)
    cursor = col_ptr[:-1].clone()  # next free slot of each column in col_order
    row_counts = torch.zeros(k, dtype=torch.int64)
    filled = 0
    for linear, counts in blocks():
        if threshold:
            keep = counts > threshold
            linear, counts = linear[keep], counts[keep] - threshold
        m = int(linear.numel())
        if m == 0:
            continue
        block_rows = torch.div(linear, d, rounding_mode="floor")
        block_cols = linear - block_rows * d
        rows[filled : filled + m] = block_rows
        cols[filled : filled + m] = block_cols
        counts_out[filled : filled + m] = counts
        row_counts += torch.bincount(block_rows, minlength=k)
        # stable counting sort by column: a position's slot is its column's cursor plus its
        # rank among the block's positions of that column (row-major = increasing row)
        sorted_cols, order = torch.sort(block_cols, stable=True)
        first = torch.searchsorted(sorted_cols, sorted_cols)
        slots = cursor[sorted_cols] + torch.arange(m) - first
        col_order[slots] = (order + filled).to(torch.int32)
        cursor += torch.bincount(block_cols, minlength=d)
        filled += m
    if filled != u:
        raise RuntimeError(f"row blocks changed between passes: {filled} positions, not {u}")
    row_ptr = torch.zeros(k + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(row_counts, 0)
    return PositionPlan(
        shape=(k, d),
        rows=rows,
        cols=cols,
        counts=counts_out,
        row_ptr=row_ptr.to(torch.int32),
        col_order=col_order,
        col_ptr=col_ptr.to(torch.int32),
        n_total=int(n_total),
    )


def index_dtype(size: int) -> torch.dtype:
    """The narrowest signed integer dtype the kernels accept for indices in [0, size)."""
    return torch.int16 if size <= 2**15 else torch.int32


def plan_tensors(plan) -> dict[str, torch.Tensor]:
    """The tensor-valued fields of a plan dataclass, by name."""
    values = {f.name: getattr(plan, f.name) for f in fields(plan)}
    return {name: value for name, value in values.items() if isinstance(value, torch.Tensor)}


def plan_nbytes(plan) -> int:
    """Bytes of a plan dataclass's tensors (what a backend holds on its device for the task)."""
    return sum(t.numel() * t.element_size() for t in plan_tensors(plan).values())


def tensors_to(plan, device: torch.device | str):
    """A copy of a frozen plan dataclass with every tensor field moved to `device`."""
    return replace(plan, **{name: t.to(device) for name, t in plan_tensors(plan).items()})
