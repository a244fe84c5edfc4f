"""The "torch" penalty backend: chunked sparse products on a PositionPlan, no k×d anywhere.

    value  = (1/n) Σ_u c_u |v_u|,   v_u = Σ_j B[row_u, j] A[j, col_u]    (sampled dense-dense)
    ∂/∂B   = S · Aᵀ,   S = sparse k×d with s_u = (g/n) · c_u · sign(v_u) at the positions
    ∂/∂A   = Bᵀ · S = (Sᵀ · B)ᵀ

Forward: `torch.sparse.sampled_addmm` over CSR slices of the plan (rows order), chunk by
chunk. Saved for backward: sign(v_u) + 1 as a 2-bit code per unique position (u/4 bytes;
zero stays zero, so an all-zero ΔW — a fresh LoRA whose B is 0 — gets zero gradients, as with
the reference's abs). Backward: grad B as CSR(S)·Aᵀ over the same row chunks; grad A as
CSR(Sᵀ)·B over column chunks, which needs the plan's positions in CSC order: their rows and
multiplicities are gathered once per plan and cached (`CscGathers`, 3 bytes per unique
position with int16 rows, freed with the plan); the signs come from the codes, addressed by
the plan's column-order permutation, through a 256×4 table (every byte's four signs) scaled
by the incoming gradient: one gather per chunk. The plan's narrow index and count types are
widened chunk by chunk (torch's sparse kernels take int32 indices and fp32 values).

Peak extra memory, apart from the two fp32 gradient buffers and one Aᵀ copy (r×d): the
u/4-byte sign codes and O(chunk) temporaries — independent of k×d, and of u but for the codes.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch

from sefe_fast.position_plan import PositionPlan

DEFAULT_CHUNK = 1 << 16  # unique positions per sparse call; a multiple of 4 (sign packing)


_CODE_WEIGHTS = torch.tensor([1, 4, 16, 64], dtype=torch.uint8)  # 2-bit fields of a byte
# _SIGN_LUT[byte, j] = sign encoded in field j of `byte`: a gather turns codes into signs.
_SIGN_LUT = ((torch.arange(256).unsqueeze(1) >> torch.tensor([0, 2, 4, 6])) & 3).float() - 1


@dataclass(frozen=True)
class CscGathers:
    """Per-plan data for the CSC (by column) pass, in CSC order: built once, then cached.

    rows: [u] the row of each position (the plan's row dtype); counts: [u] its multiplicity
    (the plan's count dtype). 3 bytes per unique position for int16 rows and uint8 counts.
    """

    rows: torch.Tensor
    counts: torch.Tensor


_CSC_CACHE: dict[int, CscGathers] = {}


def csc_gathers(plan: PositionPlan) -> CscGathers:
    """The plan's CscGathers, built on first use and freed together with the plan."""
    key = id(plan)
    cached = _CSC_CACHE.get(key)
    if cached is None:
        order = plan.col_order
        cached = CscGathers(
            rows=plan.rows.index_select(0, order), counts=plan.counts.index_select(0, order)
        )
        _CSC_CACHE[key] = cached
        weakref.finalize(plan, _CSC_CACHE.pop, key, None)
    return cached


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]):
    # Wrapped around the plan's own index tensors (checked when the plan was built), so no
    # invariant checks; torch's "sparse CSR support is in beta" warning is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _sign_codes(values: torch.Tensor) -> torch.Tensor:
    """fp32 [n] -> uint8 [ceil(n/4)]: sign(v) + 1 (0, 1 or 2) in 2-bit fields, 4 per byte.

    NaN gets code 1, i.e. sign 0 (its penalty is NaN anyway; see penalty.py).
    """
    code = torch.sign(values).add_(1).nan_to_num_(1.0).to(torch.uint8)
    pad = (-code.numel()) % 4
    if pad:
        code = torch.cat([code, code.new_ones(pad)])
    return (code.view(-1, 4) * _CODE_WEIGHTS.to(code.device)).sum(1, dtype=torch.uint8)


def _signs_in_range(lut: torch.Tensor, codes: torch.Tensor, start: int, stop: int):
    """lut-scaled signs at positions start..stop-1 (start a multiple of 4), fp32 [stop-start].

    `lut` is _SIGN_LUT times the incoming gradient ([256, 4]).
    """
    packed = codes[start // 4 : (stop + 3) // 4].int()
    return lut.index_select(0, packed).view(-1)[: stop - start]


def _signs_at(flat_lut: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor):
    """lut-scaled signs of the positions with these CSR ranks (int32), fp32.

    `flat_lut` is the field-major flattening of the scaled table ([4 · 256]): the code of
    CSR rank p sits in byte p // 4, field p % 4, at flat offset 256 · field + byte value.
    """
    # index_select, not advanced indexing: many times faster for these gathers on the CPU.
    index = codes.index_select(0, positions >> 2).int().add_((positions & 3) << 8)
    return flat_lut.index_select(0, index)


def _chunks(ptr: torch.Tensor, major_of, num: int, chunk: int):
    """Cut positions 0..num-1 into runs of ≤ chunk; yield (p0, p1, first, stop, crow).

    `major_of(p)` is the row (CSR) or column (CSC) of position p and `ptr` the matching
    offsets; [first, stop) are the rows/columns the run touches. A row/column cut by a run
    boundary belongs to two runs, so callers accumulate. crow is clamped to the run.
    """
    for p0 in range(0, num, chunk):
        p1 = min(p0 + chunk, num)
        first, stop = major_of(p0), major_of(p1 - 1) + 1
        crow = ptr[first : stop + 1].clamp(p0, p1) - p0
        yield p0, p1, first, stop, crow


class SampledPenalty(torch.autograd.Function):
    """(1/n) Σ_u c_u |ΔW[row_u, col_u]| over a PositionPlan, never forming ΔW (fp32 result)."""

    @staticmethod
    def forward(ctx, lora_B, lora_A, plan: PositionPlan, chunk: int):
        d = plan.shape[1]
        u = plan.num_unique
        B32 = lora_B.float()
        # sampled_addmm reads mat2 through mat2ᵀ contiguous: make Aᵀ once, not per call.
        A_T = lora_A.float().t().contiguous()
        zeros = B32.new_zeros(min(chunk, u))  # the (ignored, beta=0) input values of the mask
        partial, codes = [], []
        for p0, p1, r0, r1, crow in _chunks(plan.row_ptr, _RowOf(plan), u, chunk):
            mask = _csr(crow, plan.cols[p0:p1].int(), zeros[: p1 - p0], (r1 - r0, d))
            values = torch.sparse.sampled_addmm(mask, B32[r0:r1], A_T.t(), beta=0.0).values()
            codes.append(_sign_codes(values))
            partial.append(torch.dot(values.abs_(), plan.counts[p0:p1].float()))
        ctx.plan, ctx.chunk = plan, chunk
        ctx.save_for_backward(lora_B, lora_A, torch.cat(codes))
        total = torch.stack(partial).double().sum() * plan.inv_n_total
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        lora_B, lora_A, codes = ctx.saved_tensors
        plan, chunk = ctx.plan, ctx.chunk
        k, d = plan.shape
        u = plan.num_unique
        lut = _SIGN_LUT.to(codes.device) * (grad_out.to(torch.float32) * plan.inv_n_total)
        grad_B = grad_A = None
        # grad B first: its Aᵀ copy is freed before grad A is allocated (lower peak).
        if ctx.needs_input_grad[0]:
            A_T = lora_A.float().t().contiguous()
            grad_B = torch.zeros(lora_B.shape, dtype=torch.float32, device=lora_B.device)
            for p0, p1, r0, r1, crow in _chunks(plan.row_ptr, _RowOf(plan), u, chunk):
                s = _signs_in_range(lut, codes, p0, p1).mul_(plan.counts[p0:p1])
                S = _csr(crow, plan.cols[p0:p1].int(), s, (r1 - r0, d))
                grad_B[r0:r1] += torch.sparse.mm(S, A_T)
            del A_T
            grad_B = grad_B.to(lora_B.dtype)
        if ctx.needs_input_grad[1]:
            B32 = lora_B.float()
            csc = csc_gathers(plan)
            flat_lut = lut.t().reshape(-1)
            grad_A = torch.zeros(lora_A.shape, dtype=torch.float32, device=lora_A.device)
            for q0, q1, c0, c1, crow in _chunks(plan.col_ptr, _ColumnOf(plan), u, chunk):
                s = _signs_at(flat_lut, codes, plan.col_order[q0:q1]).mul_(csc.counts[q0:q1])
                S_T = _csr(crow, csc.rows[q0:q1].int(), s, (c1 - c0, k))
                grad_A[:, c0:c1] += torch.sparse.mm(S_T, B32).t()
            grad_A = grad_A.to(lora_A.dtype)
        return grad_B, grad_A, None, None


class _RowOf:
    """p -> row of the p-th position in CSR order."""

    def __init__(self, plan: PositionPlan) -> None:
        self.rows = plan.rows

    def __call__(self, p: int) -> int:
        return int(self.rows[p])


class _ColumnOf:
    """q -> column of the q-th position in CSC order."""

    def __init__(self, plan: PositionPlan) -> None:
        self.cols, self.order = plan.cols, plan.col_order

    def __call__(self, q: int) -> int:
        return int(self.cols[self.order[q]])


def penalty_sparse(
    lora_B: torch.Tensor, lora_A: torch.Tensor, plan: PositionPlan, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """(1/n) Σ_u c_u |(B·A)[row_u, col_u]| on a non-empty plan (checked inputs), differentiable."""
    if chunk <= 0 or chunk % 4:
        raise ValueError(f"chunk must be a positive multiple of 4, got {chunk}")
    return SampledPenalty.apply(lora_B, lora_A, plan, int(chunk))
