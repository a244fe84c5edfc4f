"""Fused Triton kernels for the RegLoRA penalty, never building ΔW = B·A.

For one LoRA pair (B: k×r, A: r×d) and its `PositionPlan` (unique positions u with
multiplicities c_u, sorted row-major, plus a column-major order; n = Σ_u c_u):

    value   = (1/n) Σ_u c_u · |Σ_j B[row_u, j] · A[j, col_u]|
    ∂/∂B[i] = (1/n) Σ_{u in row i} c_u·sign_u · A[:, col_u]      (segment sum, CSR order)
    ∂/∂A[:,j] = (1/n) Σ_{u in col j} c_u·sign_u · B[row_u, :]    (segment sum, CSC order)

The kernels work on c_u (the plan's narrow uint8 counts, int16 rows/cols, widened in
registers); the 1/n of each matrix is applied by the launcher, to the per-matrix sums on
the way out and to the upstream gradient on the way back.

Three kernels, each launched once for a whole group of same-shape matrices (grid axis 1
is the matrix index); a single matrix is a group of one:

- `_reglora_fwd_kernel`: each program takes BLOCK_U positions of one matrix, gathers the
  B rows and the Aᵀ rows (A is passed transposed and contiguous, d×r, so each position
  reads r contiguous elements: full 32-byte sectors instead of one element per sector
  with a stride of d), forms the dot products in fp32 registers, writes sign(ΔW) per
  position (int8, the only thing saved for the backward besides the factors) and one
  fp32 partial sum per program. The partials are summed by torch in a fixed order:
  deterministic, no atomics.
- `_reglora_grad_b_kernel`: a block of ROWS rows per program; for each row it walks the
  row's positions (row_ptr) and accumulates c·sign·Aᵀ[col] in fp32.
- `_reglora_grad_a_kernel`: a block of COLS columns per program; for each column it walks
  the column's positions (col_ptr/col_order) and accumulates c·sign·B[row] in fp32,
  writing the gradient of Aᵀ (contiguous rows); autograd transposes it back.

Multiplicities stay in the plan (already on the device); the forward saves only the
int8 sign (1 byte per unique position, ternary so that sign(0) = 0 exactly as
torch.abs's gradient: a fresh LoRA has B = 0, so ΔW = 0 at every position).

(Past 450 lines because this is one fused op, kept in one file by the project's rule: the
three kernels, their launchers and the autograd.Function, the grouped plan every one of
them reads (`GroupedPositionPlan`, also the tile masks' extra lists) and the ahead-of-time
launch list the compile report uses, shared with `reglora_tile.py`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sefe_fast.position_plan import PositionPlan, index_dtype, tensors_to

INTERPRET = bool(triton.knobs.runtime.interpret)

# Largest rank chunk held in registers at once; ranks above it are processed in chunks.
MAX_BLOCK_R = 128

# Autotune lists for CUDA (kwargs, num_warps). Every entry compiles for sm_80 and sm_90
# at r = 128 in bf16 and fp32 with 0 spills (python -m sefe_fast.kernel_report).
FWD_CONFIGS_CUDA: list[tuple[dict[str, int], int]] = [
    ({"BLOCK_U": 32}, 4),
    ({"BLOCK_U": 64}, 4),
    ({"BLOCK_U": 64}, 8),
    ({"BLOCK_U": 128}, 8),
]
GRAD_B_CONFIGS_CUDA: list[tuple[dict[str, int], int]] = [
    ({"ROWS": 1, "BLOCK_U": 32}, 4),
    ({"ROWS": 1, "BLOCK_U": 64}, 4),
    ({"ROWS": 1, "BLOCK_U": 64}, 8),
]
# (COLS 1, BLOCK_U 64, 4 warps) is left out: with fp32 factors (what PEFT trains) it spills
# 16 B on sm_80 at r = 128.
GRAD_A_CONFIGS_CUDA: list[tuple[dict[str, int], int]] = [
    ({"COLS": 1, "BLOCK_U": 32}, 4),
    ({"COLS": 1, "BLOCK_U": 64}, 8),
]
# Under TRITON_INTERPRET=1 each program costs about 1 ms of Python: few, large programs.
# Multi-config autotune needs a GPU, so the interpreter gets exactly one config.
FWD_CONFIG_INTERPRET = ({"BLOCK_U": 256}, 4)
GRAD_B_CONFIG_INTERPRET = ({"ROWS": 64, "BLOCK_U": 256}, 4)
GRAD_A_CONFIG_INTERPRET = ({"COLS": 64, "BLOCK_U": 256}, 4)


def _configs(
    cuda: list[tuple[dict[str, int], int]], interpret: tuple[dict[str, int], int]
) -> list[triton.Config]:
    """The autotune list: one config under the interpreter, the CUDA list otherwise."""
    chosen = [interpret] if INTERPRET else cuda
    return [triton.Config(dict(kwargs), num_warps=warps) for kwargs, warps in chosen]


# The smallest forward block: the partial-sum buffer has one slot per block of this size.
_MIN_FWD_BLOCK_U = min(
    kwargs["BLOCK_U"] for kwargs, _ in ([FWD_CONFIG_INTERPRET] if INTERPRET else FWD_CONFIGS_CUDA)
)


@triton.autotune(
    configs=_configs(FWD_CONFIGS_CUDA, FWD_CONFIG_INTERPRET),
    key=["K", "D", "R"],
    # Configs differ in BLOCK_U, hence in how many partial slots they fill: zero the
    # buffer before each benchmarked config and before the real run.
    reset_to_zero=["partial_ptr"],
)
# n_slots changes with every task's plan; it only addresses the partial-sum store, so it
# is not worth a recompile when its divisibility changes.
@triton.jit(do_not_specialize=["n_slots"])
def _reglora_fwd_kernel(
    b_ptr,  # [M, K, R] contiguous, factors' dtype
    at_ptr,  # [M, D, R] contiguous (Aᵀ per matrix)
    rows_ptr,  # int16/int32 [U] (all matrices concatenated)
    cols_ptr,  # int16/int32 [U]
    counts_ptr,  # uint8/int32 [U], multiplicity of each position
    row_ptr_ptr,  # int32 [M, K+1], global offsets into the position arrays
    sign_ptr,  # int8 [U], output: sign of ΔW at each position
    partial_ptr,  # fp32 [M, n_slots], output: per-program Σ c·|ΔW|
    n_slots,
    K,
    D,
    R,
    BLOCK_U: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    block = tl.program_id(0)
    m = tl.program_id(1)
    seg_start = tl.load(row_ptr_ptr + m * (K + 1))
    seg_end = tl.load(row_ptr_ptr + m * (K + 1) + K)
    pos = seg_start + block * BLOCK_U + tl.arange(0, BLOCK_U)
    in_seg = pos < seg_end
    rows = tl.load(rows_ptr + pos, mask=in_seg, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + pos, mask=in_seg, other=0).to(tl.int64)
    counts = tl.load(counts_ptr + pos, mask=in_seg, other=0).to(tl.float32)
    m64 = m.to(tl.int64)
    b_rows = b_ptr + m64 * K * R + rows[:, None] * R
    at_rows = at_ptr + m64 * D * R + cols[:, None] * R
    dots = tl.zeros([BLOCK_U], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        tile_mask = in_seg[:, None] & (ranks < R)[None, :]
        b = tl.load(b_rows + ranks[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        a = tl.load(at_rows + ranks[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        dots += tl.sum(b * a, axis=1)
    sign = tl.where(dots > 0, 1, 0) - tl.where(dots < 0, 1, 0)
    tl.store(sign_ptr + pos, sign.to(tl.int8), mask=in_seg)
    partial = tl.sum(counts * tl.abs(dots), axis=0)
    tl.store(partial_ptr + m64 * n_slots + block, partial)


@triton.autotune(
    configs=_configs(GRAD_B_CONFIGS_CUDA, GRAD_B_CONFIG_INTERPRET), key=["K", "D", "R"]
)
@triton.jit
def _reglora_grad_b_kernel(
    at_ptr,  # [M, D, R] contiguous
    cols_ptr,  # int16/int32 [U]
    counts_ptr,  # uint8/int32 [U]
    sign_ptr,  # int8 [U]
    row_ptr_ptr,  # int32 [M, K+1]
    grad_out_ptr,  # fp32 [M], upstream gradient of each matrix's penalty, times 1/n
    grad_b_ptr,  # [M, K, R] contiguous, output in the factors' dtype
    K,
    D,
    R,
    ROWS: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    row_block = tl.program_id(0)
    m = tl.program_id(1)
    m64 = m.to(tl.int64)
    scale = tl.load(grad_out_ptr + m)
    for i in range(ROWS):
        row = row_block * ROWS + i
        valid = row < K
        row_c = tl.minimum(row, K - 1)
        start = tl.load(row_ptr_ptr + m * (K + 1) + row_c)
        end = tl.load(row_ptr_ptr + m * (K + 1) + row_c + 1)
        end = tl.where(valid, end, start)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for off in range(start, end, BLOCK_U):
                pos = off + tl.arange(0, BLOCK_U)
                in_row = pos < end
                cols = tl.load(cols_ptr + pos, mask=in_row, other=0).to(tl.int64)
                w = tl.load(counts_ptr + pos, mask=in_row, other=0).to(tl.float32)
                s = tl.load(sign_ptr + pos, mask=in_row, other=0).to(tl.float32)
                at = tl.load(
                    at_ptr + m64 * D * R + cols[:, None] * R + ranks[None, :],
                    mask=in_row[:, None] & rank_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum((w * s)[:, None] * at, axis=0)
            tl.store(
                grad_b_ptr + m64 * K * R + row_c.to(tl.int64) * R + ranks,
                acc * scale,
                mask=rank_ok & (row + 0 * ranks < K),
            )


@triton.autotune(
    configs=_configs(GRAD_A_CONFIGS_CUDA, GRAD_A_CONFIG_INTERPRET), key=["K", "D", "R"]
)
@triton.jit
def _reglora_grad_a_kernel(
    b_ptr,  # [M, K, R] contiguous
    rows_ptr,  # int16/int32 [U]
    counts_ptr,  # uint8/int32 [U]
    sign_ptr,  # int8 [U]
    col_order_ptr,  # int32 [U], global position indices in column-major order
    col_ptr_ptr,  # int32 [M, D+1], global offsets into col_order
    grad_out_ptr,  # fp32 [M], times 1/n
    grad_at_ptr,  # [M, D, R] contiguous, output (gradient of Aᵀ) in the factors' dtype
    K,
    D,
    R,
    COLS: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    col_block = tl.program_id(0)
    m = tl.program_id(1)
    m64 = m.to(tl.int64)
    scale = tl.load(grad_out_ptr + m)
    for i in range(COLS):
        col = col_block * COLS + i
        valid = col < D
        col_c = tl.minimum(col, D - 1)
        start = tl.load(col_ptr_ptr + m * (D + 1) + col_c)
        end = tl.load(col_ptr_ptr + m * (D + 1) + col_c + 1)
        end = tl.where(valid, end, start)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for off in range(start, end, BLOCK_U):
                q = off + tl.arange(0, BLOCK_U)
                in_col = q < end
                pos = tl.load(col_order_ptr + q, mask=in_col, other=0)
                rows = tl.load(rows_ptr + pos, mask=in_col, other=0).to(tl.int64)
                w = tl.load(counts_ptr + pos, mask=in_col, other=0).to(tl.float32)
                s = tl.load(sign_ptr + pos, mask=in_col, other=0).to(tl.float32)
                b = tl.load(
                    b_ptr + m64 * K * R + rows[:, None] * R + ranks[None, :],
                    mask=in_col[:, None] & rank_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum((w * s)[:, None] * b, axis=0)
            tl.store(
                grad_at_ptr + m64 * D * R + col_c.to(tl.int64) * R + ranks,
                acc * scale,
                mask=rank_ok & (col + 0 * ranks < D),
            )


def block_r_for(rank: int) -> int:
    """Rank chunk held in registers: the next power of two ≥ rank, clamped to [16, 128]."""
    return max(16, min(MAX_BLOCK_R, triton.next_power_of_2(max(int(rank), 1))))


COUNT_DTYPES = (torch.uint8, torch.int32)


def _check_plan_tensors(index: int, plan: PositionPlan) -> None:
    """The kernels read the plan's arrays as contiguous tensors of PositionPlan's dtypes and sizes."""
    k, d = plan.shape
    u = plan.num_unique
    expected = {
        "rows": ((index_dtype(k),), u),
        "cols": ((index_dtype(d),), u),
        "counts": (COUNT_DTYPES, u),
        "row_ptr": ((torch.int32,), k + 1),
        "col_order": ((torch.int32,), u),
        "col_ptr": ((torch.int32,), d + 1),
    }
    for name, (dtypes, size) in expected.items():
        tensor = getattr(plan, name)
        if tensor.dtype not in dtypes or tensor.numel() != size or not tensor.is_contiguous():
            wanted = " or ".join(str(dtype) for dtype in dtypes)
            raise ValueError(
                f"plan {index}: {name} must be a contiguous {wanted} tensor of {size} elements, "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )


@dataclass(frozen=True)
class GroupedPositionPlan:
    """The plans of M matrices of one shape, concatenated for single-launch kernels.

    rows, cols, counts: the plans' unique positions and multiplicities concatenated in
    matrix order ([U_total], the plans' dtypes); row_ptr: int32 [M, K+1] and col_ptr: int32
    [M, D+1], each plan's offsets shifted by the number of positions before it, so both
    index the concatenated arrays; col_order: int32 [U_total], each plan's column-major
    permutation shifted likewise. inv_n: fp32 [M], 1/n_total of each matrix (the mean's
    scale). num_unique / n_total: per matrix. max_unique: the largest per-matrix position
    count (sizes the forward grid). Build once per task with `from_plans` and reuse.
    """

    shape: tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    counts: torch.Tensor
    row_ptr: torch.Tensor
    col_order: torch.Tensor
    col_ptr: torch.Tensor
    inv_n: torch.Tensor
    num_unique: tuple[int, ...]
    n_total: tuple[int, ...]

    @property
    def num_matrices(self) -> int:
        """Number of matrices M in the group."""
        return len(self.num_unique)

    @property
    def max_unique(self) -> int:
        """Largest number of unique positions of one matrix."""
        return max(self.num_unique, default=0)

    @property
    def total_unique(self) -> int:
        """Number of unique positions over the whole group."""
        return sum(self.num_unique)

    @property
    def device(self) -> torch.device:
        """Device of the plan's tensors."""
        return self.rows.device

    @classmethod
    def from_plans(cls, plans: Sequence[PositionPlan]) -> GroupedPositionPlan:
        """Concatenate same-shape plans (one copy; a single plan is used without copying)."""
        if not plans:
            raise ValueError("GroupedPositionPlan.from_plans needs at least one plan")
        shape = tuple(plans[0].shape)
        for index, plan in enumerate(plans):
            if tuple(plan.shape) != shape:
                raise ValueError(
                    f"plan {index} has shape {tuple(plan.shape)}, plan 0 has {shape}: "
                    "group matrices by shape"
                )
            if plan.rows.device != plans[0].rows.device:
                raise ValueError(
                    f"plan {index} is on {plan.rows.device}, plan 0 on {plans[0].rows.device}"
                )
            _check_plan_tensors(index, plan)
        k, d = shape
        num_unique = tuple(plan.num_unique for plan in plans)
        if sum(num_unique) >= 2**31:
            raise ValueError(
                f"{sum(num_unique)} positions in one group overflow the int32 offsets; "
                "split the group"
            )
        n_total = tuple(int(plan.n_total) for plan in plans)
        device = plans[0].rows.device
        if len(plans) == 1:
            plan = plans[0]
            # penalty_triton builds this on every call: a fill kernel, not a host-to-device
            # copy of a Python list (which would wait for the device).
            inv_n = torch.full((1,), plan.inv_n_total, dtype=torch.float32, device=device)
            return cls(
                shape=(k, d),
                rows=plan.rows,
                cols=plan.cols,
                counts=plan.counts,
                row_ptr=plan.row_ptr.reshape(1, k + 1),
                col_order=plan.col_order,
                col_ptr=plan.col_ptr.reshape(1, d + 1),
                inv_n=inv_n,
                num_unique=num_unique,
                n_total=n_total,
            )
        inv_n = torch.tensor(
            [plan.inv_n_total for plan in plans], dtype=torch.float32, device=device
        )
        # One count dtype for the group: uint8 unless some plan needed int32.
        count_dtype = max((plan.counts.dtype for plan in plans), key=COUNT_DTYPES.index)
        starts = [0]
        for count in num_unique[:-1]:
            starts.append(starts[-1] + count)
        shift = torch.tensor(starts, dtype=torch.int32, device=device)
        return cls(
            shape=(k, d),
            rows=torch.cat([plan.rows for plan in plans]),
            cols=torch.cat([plan.cols for plan in plans]),
            counts=torch.cat([plan.counts.to(count_dtype) for plan in plans]),
            row_ptr=torch.stack([plan.row_ptr for plan in plans]) + shift[:, None],
            col_order=torch.cat([plan.col_order + s for plan, s in zip(plans, starts)]),
            col_ptr=torch.stack([plan.col_ptr for plan in plans]) + shift[:, None],
            inv_n=inv_n,
            num_unique=num_unique,
            n_total=n_total,
        )

    def to(self, device: torch.device | str) -> GroupedPositionPlan:
        """A copy of the grouped plan with every tensor on `device`."""
        return tensors_to(self, device)


def _check_runnable(tensor: torch.Tensor, what: str) -> None:
    if tensor.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{what} is on {tensor.device}: the Triton RegLoRA kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, for CPU tests)"
        )


def _forward(
    b: torch.Tensor, at: torch.Tensor, plan: GroupedPositionPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-matrix penalties (fp32 [M], already × 1/n) and the int8 sign of ΔW per position."""
    num_m, k, rank = b.shape
    d = at.shape[1]
    sign = torch.empty(plan.total_unique, dtype=torch.int8, device=b.device)
    if plan.max_unique == 0:
        return torch.zeros(num_m, dtype=torch.float32, device=b.device), sign
    n_slots = triton.cdiv(plan.max_unique, _MIN_FWD_BLOCK_U)
    partial = torch.zeros(num_m, n_slots, dtype=torch.float32, device=b.device)

    def grid(meta):
        return (triton.cdiv(plan.max_unique, meta["BLOCK_U"]), num_m)

    _reglora_fwd_kernel[grid](
        b,
        at,
        plan.rows,
        plan.cols,
        plan.counts,
        plan.row_ptr,
        sign,
        partial,
        n_slots,
        k,
        d,
        rank,
        BLOCK_R=block_r_for(rank),
    )
    return partial.sum(dim=1) * plan.inv_n, sign


def _grad_b(
    at: torch.Tensor,
    sign: torch.Tensor,
    plan: GroupedPositionPlan,
    grad_out: torch.Tensor,
    b_like: torch.Tensor,
) -> torch.Tensor:
    """Gradient of the per-matrix penalties (weighted by grad_out) w.r.t. B: [M, K, R]."""
    num_m, k, rank = b_like.shape
    d = at.shape[1]
    if plan.total_unique == 0:
        return torch.zeros_like(b_like)
    grad_b = torch.empty_like(b_like)

    def grid(meta):
        return (triton.cdiv(k, meta["ROWS"]), num_m)

    _reglora_grad_b_kernel[grid](
        at,
        plan.cols,
        plan.counts,
        sign,
        plan.row_ptr,
        grad_out,
        grad_b,
        k,
        d,
        rank,
        BLOCK_R=block_r_for(rank),
    )
    return grad_b


def _grad_at(
    b: torch.Tensor,
    sign: torch.Tensor,
    plan: GroupedPositionPlan,
    grad_out: torch.Tensor,
    at_like: torch.Tensor,
) -> torch.Tensor:
    """Gradient of the per-matrix penalties (weighted by grad_out) w.r.t. Aᵀ: [M, D, R]."""
    num_m, k, rank = b.shape
    d = at_like.shape[1]
    if plan.total_unique == 0:
        return torch.zeros_like(at_like)
    grad_at = torch.empty_like(at_like)

    def grid(meta):
        return (triton.cdiv(d, meta["COLS"]), num_m)

    _reglora_grad_a_kernel[grid](
        b,
        plan.rows,
        plan.counts,
        sign,
        plan.col_order,
        plan.col_ptr,
        grad_out,
        grad_at,
        k,
        d,
        rank,
        BLOCK_R=block_r_for(rank),
    )
    return grad_at


class RegLoRAPenaltyFunction(torch.autograd.Function):
    """Per-matrix penalties of stacked factors B [M,K,R] and Aᵀ [M,D,R] (both contiguous).

    Saves B, Aᵀ and the int8 sign per unique position; the plan is held by reference.
    """

    @staticmethod
    def forward(ctx, b: torch.Tensor, at: torch.Tensor, plan: GroupedPositionPlan):
        values, sign = _forward(b, at, plan)
        ctx.save_for_backward(b, at, sign)
        ctx.plan = plan
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        b, at, sign = ctx.saved_tensors
        plan: GroupedPositionPlan = ctx.plan
        grad_out = (grad_values.to(torch.float32) * plan.inv_n).contiguous()
        grad_b = _grad_b(at, sign, plan, grad_out, b) if ctx.needs_input_grad[0] else None
        grad_at = _grad_at(b, sign, plan, grad_out, at) if ctx.needs_input_grad[1] else None
        return grad_b, grad_at, None


def _check_factors(
    lora_bs: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor], plan: GroupedPositionPlan
) -> None:
    if len(lora_bs) != len(lora_as) or len(lora_bs) != plan.num_matrices:
        raise ValueError(
            f"{len(lora_bs)} B factors, {len(lora_as)} A factors and a plan of "
            f"{plan.num_matrices} matrices: the three must match"
        )
    k, d = plan.shape
    rank = lora_bs[0].shape[1] if lora_bs[0].ndim == 2 else -1
    for index, (b, a) in enumerate(zip(lora_bs, lora_as)):
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != k or a.shape[1] != d:
            raise ValueError(
                f"matrix {index}: B {tuple(b.shape)} and A {tuple(a.shape)} do not give the "
                f"plan's ΔW shape {(k, d)}"
            )
        if b.shape[1] != rank or a.shape[0] != rank:
            raise ValueError(
                f"matrix {index}: ranks of B {tuple(b.shape)} and A {tuple(a.shape)} differ "
                f"from the group's rank {rank}"
            )
        if b.dtype != lora_bs[0].dtype or a.dtype != lora_bs[0].dtype:
            raise ValueError(
                f"matrix {index}: dtypes {b.dtype}/{a.dtype} differ from {lora_bs[0].dtype}"
            )
        if b.device != plan.device or a.device != plan.device:
            raise ValueError(
                f"matrix {index}: factors on {b.device}/{a.device}, plan on {plan.device}"
            )
    if lora_bs[0].dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported factor dtype {lora_bs[0].dtype}")
    _check_runnable(lora_bs[0], "lora_B")


def penalty_triton_grouped(
    lora_bs: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor], plan: GroupedPositionPlan
) -> torch.Tensor:
    """Per-matrix RegLoRA penalties (fp32 [M]) of M same-shape LoRA pairs, one launch each way.

    lora_bs[m]: k×r, lora_as[m]: r×d; entry m is mean over matrix m's key positions (with
    multiplicity) of |(B_m·A_m)[row, col]| — the per-matrix value, not yet summed or scaled
    by λ/N. Differentiable in every factor. The factors are stacked (B) and stacked
    transposed (A) once per call: one read and one write of every factor, and the stacks
    are kept for the backward.
    """
    _check_factors(lora_bs, lora_as, plan)
    if len(lora_bs) == 1:
        b = lora_bs[0].unsqueeze(0).contiguous()
        at = lora_as[0].t().unsqueeze(0).contiguous()
    else:
        b = torch.stack(list(lora_bs))
        at = torch.stack([a.t() for a in lora_as])
    return RegLoRAPenaltyFunction.apply(b, at, plan)


def penalty_triton(lora_B: torch.Tensor, lora_A: torch.Tensor, plan: PositionPlan) -> torch.Tensor:
    """RegLoRA penalty of one LoRA pair: Σ_u w_u |(B·A)[row_u, col_u]|, a 0-dim fp32 tensor.

    lora_B: k×r, lora_A: r×d (fp32/bf16/fp16, CUDA; fp32 on CPU under TRITON_INTERPRET=1);
    plan: the matrix's `PositionPlan` on the same device. Differentiable in both factors;
    gradients come back in the factors' dtype. Equals the mean over the key positions
    (duplicates counted) of |ΔW|; an empty plan gives 0 and zero gradients.
    """
    grouped = GroupedPositionPlan.from_plans([plan])
    return penalty_triton_grouped([lora_B], [lora_A], grouped)[0]


@dataclass(frozen=True)
class AotLaunch:
    """A representative launch of one kernel, for ahead-of-time compilation reports.

    args: every non-constexpr argument by name (tensors give dtype and alignment, ints give
    value specialisation exactly as the JIT would); constexprs: fixed constexpr arguments;
    configs: the CUDA autotune configs that may be used, each (constexpr kwargs, num_warps)
    or (constexpr kwargs, num_warps, num_stages).
    """

    kernel: object
    args: dict[str, object]
    constexprs: dict[str, object]
    configs: list[tuple[dict[str, int], int] | tuple[dict[str, int], int, int]]


def aot_launches(
    k: int = 4096, d: int = 4096, rank: int = 128, dtype: torch.dtype = torch.bfloat16
) -> list[AotLaunch]:
    """Representative launches of every kernel in this file (default: a LLaVA-7B q/k/v/o
    matrix, r = 128, bf16), built from tiny placeholder tensors of the right dtypes."""

    def tensor(tensor_dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(16, dtype=tensor_dtype)

    factor, i32, f32 = tensor(dtype), tensor(torch.int32), tensor(torch.float32)
    i8, u8 = tensor(torch.int8), tensor(torch.uint8)
    rows, cols = tensor(index_dtype(k)), tensor(index_dtype(d))
    block_r = {"BLOCK_R": block_r_for(rank)}
    n_slots = triton.cdiv(k * d // 8, FWD_CONFIGS_CUDA[0][0]["BLOCK_U"])
    return [
        AotLaunch(
            kernel=_reglora_fwd_kernel,
            args={
                "b_ptr": factor,
                "at_ptr": factor,
                "rows_ptr": rows,
                "cols_ptr": cols,
                "counts_ptr": u8,
                "row_ptr_ptr": i32,
                "sign_ptr": i8,
                "partial_ptr": f32,
                "n_slots": n_slots,
                "K": k,
                "D": d,
                "R": rank,
            },
            constexprs=block_r,
            configs=FWD_CONFIGS_CUDA,
        ),
        AotLaunch(
            kernel=_reglora_grad_b_kernel,
            args={
                "at_ptr": factor,
                "cols_ptr": cols,
                "counts_ptr": u8,
                "sign_ptr": i8,
                "row_ptr_ptr": i32,
                "grad_out_ptr": f32,
                "grad_b_ptr": factor,
                "K": k,
                "D": d,
                "R": rank,
            },
            constexprs=block_r,
            configs=GRAD_B_CONFIGS_CUDA,
        ),
        AotLaunch(
            kernel=_reglora_grad_a_kernel,
            args={
                "b_ptr": factor,
                "rows_ptr": rows,
                "counts_ptr": u8,
                "sign_ptr": i8,
                "col_order_ptr": i32,
                "col_ptr_ptr": i32,
                "grad_out_ptr": f32,
                "grad_at_ptr": factor,
                "K": k,
                "D": d,
                "R": rank,
            },
            constexprs=block_r,
            configs=GRAD_A_CONFIGS_CUDA,
        ),
    ]
