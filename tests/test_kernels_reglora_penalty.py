"""The fused RegLoRA penalty kernels against a dense plain-torch reference.

On a machine without CUDA these run under TRITON_INTERPRET=1 (tests/conftest.py) in fp32,
with small matrices so the interpreter's ~1 ms per program stays cheap.
"""

import os
import subprocess
import sys

import pytest
import torch

from sefe_fast.position_plan import PositionPlan
from sefe_fast_kernels.reglora_penalty import (
    GroupedPositionPlan,
    penalty_triton,
    penalty_triton_grouped,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dense_penalty(lora_b: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor):
    """The official formula: mean over the (duplicated) positions of |(B·A)[row, col]|."""
    if indices.shape[0] == 0:
        return (lora_b @ lora_a).sum() * 0.0
    delta = lora_b @ lora_a
    return delta[indices[:, 0], indices[:, 1]].abs().mean()


def reference(lora_b: torch.Tensor, lora_a: torch.Tensor, indices: torch.Tensor):
    """Value and gradients of the dense formula, in float64."""
    b = lora_b.detach().double().requires_grad_()
    a = lora_a.detach().double().requires_grad_()
    value = dense_penalty(b, a, indices.to(b.device))
    grad_b, grad_a = torch.autograd.grad(value, (b, a))
    return value.detach(), grad_b, grad_a


def kernel(lora_b: torch.Tensor, lora_a: torch.Tensor, plan: PositionPlan):
    """Value and gradients of penalty_triton."""
    b = lora_b.detach().clone().requires_grad_()
    a = lora_a.detach().clone().requires_grad_()
    value = penalty_triton(b, a, plan)
    grad_b, grad_a = torch.autograd.grad(value, (b, a))
    return value.detach(), grad_b, grad_a


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str):
    """max |actual − expected| ≤ rel · max(max |expected|, tiny)."""
    scale = max(expected.abs().max().item(), 1e-30)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3e} vs scale {scale:.3e}"


def factors(k: int, d: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lora_b = torch.randn(k, rank, generator=generator).to(DEVICE)
    lora_a = torch.randn(rank, d, generator=generator).to(DEVICE)
    return lora_b, lora_a


def random_indices(k: int, d: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, k, (n,), generator=generator)
    cols = torch.randint(0, d, (n,), generator=generator)
    return torch.stack([rows, cols], dim=1)


def check_against_reference(lora_b, lora_a, indices, shape):
    plan = PositionPlan.from_indices(indices, shape).to(DEVICE)
    value, grad_b, grad_a = kernel(lora_b, lora_a, plan)
    ref_value, ref_grad_b, ref_grad_a = reference(lora_b, lora_a, indices)
    assert value.ndim == 0 and value.dtype == torch.float32
    assert grad_b.dtype == lora_b.dtype and grad_a.dtype == lora_a.dtype
    assert grad_b.shape == lora_b.shape and grad_a.shape == lora_a.shape
    assert_close(value, ref_value, 1e-5, "value")
    assert_close(grad_b, ref_grad_b, 1e-4, "grad B")
    assert_close(grad_a, ref_grad_a, 1e-4, "grad A")
    return value, grad_b, grad_a


# Shapes that are not multiples of any block size; ranks from 1 to above the 128-wide
# rank chunk (130 runs the chunk loop twice).
@pytest.mark.parametrize(
    ("k", "d", "rank", "n"),
    [(37, 53, 1, 200), (37, 53, 7, 300), (70, 19, 33, 250), (45, 67, 128, 400), (23, 29, 130, 150)],
)
def test_random_positions_with_duplicates_match_dense_reference(k, d, rank, n):
    lora_b, lora_a = factors(k, d, rank, seed=k + rank)
    indices = random_indices(k, d, n, seed=rank)
    plan = PositionPlan.from_indices(indices, (k, d))
    assert plan.num_unique < n, "the case must contain duplicate positions"
    check_against_reference(lora_b, lora_a, indices, (k, d))


def test_duplicate_positions_count_with_their_multiplicity():
    lora_b, lora_a = factors(9, 11, 4, seed=1)
    once = torch.tensor([[2, 3], [5, 7]])
    thrice = torch.tensor([[2, 3], [2, 3], [2, 3], [5, 7]])
    value_once, *_ = check_against_reference(lora_b, lora_a, once, (9, 11))
    value_thrice, *_ = check_against_reference(lora_b, lora_a, thrice, (9, 11))
    delta = lora_b @ lora_a
    x, y = delta[2, 3].abs().item(), delta[5, 7].abs().item()
    assert value_once.item() == pytest.approx((x + y) / 2, rel=1e-5)
    assert value_thrice.item() == pytest.approx((3 * x + y) / 4, rel=1e-5)


def test_single_position():
    lora_b, lora_a = factors(31, 17, 16, seed=2)
    indices = torch.tensor([[30, 16]])
    value, grad_b, grad_a = check_against_reference(lora_b, lora_a, indices, (31, 17))
    delta = (lora_b @ lora_a)[30, 16]
    assert value.item() == pytest.approx(delta.abs().item(), rel=1e-5)
    # Only row 30 of B and column 16 of A receive gradient.
    assert torch.count_nonzero(grad_b.abs().sum(dim=1)).item() == 1
    assert torch.count_nonzero(grad_a.abs().sum(dim=0)).item() == 1


def test_all_positions_of_the_matrix():
    k, d = 33, 41
    lora_b, lora_a = factors(k, d, 24, seed=3)
    grid = torch.cartesian_prod(torch.arange(k), torch.arange(d))
    check_against_reference(lora_b, lora_a, grid, (k, d))


def test_int32_indices_for_dimensions_past_int16(monkeypatch):
    """Matrices with a dimension over 32768 get int32 rows/cols: the kernels' wide path.

    A real 33000-row matrix costs minutes under the interpreter (one program per row
    block), so a small matrix is given the wide dtypes by widening `index_dtype`.
    """
    import sefe_fast.position_plan as plan_module
    import sefe_fast_kernels.reglora_penalty as kernel_module

    def wide(size: int) -> torch.dtype:
        return torch.int32

    monkeypatch.setattr(plan_module, "index_dtype", wide)
    monkeypatch.setattr(kernel_module, "index_dtype", wide)
    k, d = 37, 53
    lora_b, lora_a = factors(k, d, 6, seed=5)
    indices = random_indices(k, d, 300, seed=6)
    plan = PositionPlan.from_indices(indices, (k, d))
    assert plan.rows.dtype == plan.cols.dtype == torch.int32
    check_against_reference(lora_b, lora_a, indices, (k, d))


def test_empty_plan_gives_zero_and_zero_gradients():
    lora_b, lora_a = factors(13, 21, 8, seed=4)
    plan = PositionPlan.from_indices(torch.zeros(0, 2, dtype=torch.int64), (13, 21)).to(DEVICE)
    value, grad_b, grad_a = kernel(lora_b, lora_a, plan)
    assert value.item() == 0.0
    assert torch.count_nonzero(grad_b).item() == 0 and torch.count_nonzero(grad_a).item() == 0


def test_fresh_lora_with_zero_b_has_zero_gradient_like_torch_abs():
    # A new task's LoRA starts with B = 0: ΔW = 0 everywhere, and d|x|/dx at 0 is 0.
    lora_b, lora_a = factors(19, 23, 8, seed=5)
    lora_b = torch.zeros_like(lora_b)
    indices = random_indices(19, 23, 60, seed=5)
    value, grad_b, grad_a = check_against_reference(lora_b, lora_a, indices, (19, 23))
    assert value.item() == 0.0
    assert torch.count_nonzero(grad_b).item() == 0 and torch.count_nonzero(grad_a).item() == 0


def test_results_are_bitwise_deterministic():
    lora_b, lora_a = factors(40, 50, 32, seed=6)
    plan = PositionPlan.from_indices(random_indices(40, 50, 500, seed=6), (40, 50)).to(DEVICE)
    first = kernel(lora_b, lora_a, plan)
    second = kernel(lora_b, lora_a, plan)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_grouped_matches_per_matrix_and_dense_reference():
    k, d, rank = 29, 37, 12
    counts = [120, 0, 1, 300]  # includes an empty and a single-position matrix
    pairs = [factors(k, d, rank, seed=10 + m) for m in range(len(counts))]
    indices = [random_indices(k, d, n, seed=20 + m) for m, n in enumerate(counts)]
    plans = [PositionPlan.from_indices(idx, (k, d)).to(DEVICE) for idx in indices]
    grouped = GroupedPositionPlan.from_plans(plans)
    assert grouped.num_matrices == 4 and grouped.max_unique == plans[3].num_unique

    bs = [b.clone().requires_grad_() for b, _ in pairs]
    as_ = [a.clone().requires_grad_() for _, a in pairs]
    values = penalty_triton_grouped(bs, as_, grouped)
    assert values.shape == (4,) and values.dtype == torch.float32
    # Distinct upstream weights check that each matrix's gradient is scaled by its own.
    upstream = torch.tensor([1.0, 2.0, -3.0, 0.5], device=DEVICE)
    (values * upstream).sum().backward()

    for m, ((b, a), idx, plan) in enumerate(zip(pairs, indices, plans)):
        single_value, single_grad_b, single_grad_a = kernel(b, a, plan)
        ref_value, ref_grad_b, ref_grad_a = reference(b, a, idx)
        assert_close(values[m].detach(), ref_value, 1e-5, f"matrix {m} value")
        assert torch.equal(values[m].detach(), single_value), f"matrix {m}: grouped ≠ single"
        assert_close(bs[m].grad, upstream[m] * ref_grad_b, 1e-4, f"matrix {m} grad B")
        assert_close(as_[m].grad, upstream[m] * ref_grad_a, 1e-4, f"matrix {m} grad A")
        assert_close(bs[m].grad, upstream[m] * single_grad_b, 1e-6, f"matrix {m} grad B vs single")
        assert_close(as_[m].grad, upstream[m] * single_grad_a, 1e-6, f"matrix {m} grad A vs single")
    assert values[1].item() == 0.0
    assert torch.count_nonzero(bs[1].grad).item() == 0


def test_grouped_plan_widens_uint8_counts_when_one_plan_needs_int32():
    k, d = 9, 13
    lora_b, lora_a = factors(k, d, 5, seed=7)
    few = random_indices(k, d, 40, seed=8)
    many = torch.cat([random_indices(k, d, 3, seed=9)] * 300)  # each position ≥ 300 times
    plans = [PositionPlan.from_indices(idx, (k, d)).to(DEVICE) for idx in (few, many)]
    assert [p.counts.dtype for p in plans] == [torch.uint8, torch.int32]
    grouped = GroupedPositionPlan.from_plans(plans)
    assert grouped.counts.dtype == torch.int32
    values = penalty_triton_grouped([lora_b, lora_b], [lora_a, lora_a], grouped)
    for m, idx in enumerate((few, many)):
        assert_close(values[m], reference(lora_b, lora_a, idx)[0], 1e-5, f"matrix {m}")


def test_grouped_plan_offsets_index_the_concatenated_positions():
    plans = [PositionPlan.from_indices(random_indices(6, 5, n, seed=n), (6, 5)) for n in (7, 0, 12)]
    grouped = GroupedPositionPlan.from_plans(plans)
    start = 0
    for m, plan in enumerate(plans):
        u = plan.num_unique
        assert grouped.row_ptr[m, 0].item() == start and grouped.row_ptr[m, -1].item() == start + u
        assert grouped.col_ptr[m, 0].item() == start and grouped.col_ptr[m, -1].item() == start + u
        assert torch.equal(grouped.rows[start : start + u], plan.rows)
        assert torch.equal(grouped.col_order[start : start + u] - start, plan.col_order)
        start += u
    assert grouped.total_unique == start


def test_grouped_plan_rejects_mixed_shapes():
    plans = [
        PositionPlan.from_indices(torch.tensor([[0, 0]]), (4, 5)),
        PositionPlan.from_indices(torch.tensor([[0, 0]]), (5, 4)),
    ]
    with pytest.raises(ValueError, match=r"plan 1 has shape \(5, 4\)"):
        GroupedPositionPlan.from_plans(plans)


def test_factor_shape_mismatch_names_the_matrix():
    plan = PositionPlan.from_indices(torch.tensor([[0, 0]]), (8, 9)).to(DEVICE)
    grouped = GroupedPositionPlan.from_plans([plan, plan])
    good_b, good_a = factors(8, 9, 4, seed=7)
    bad_a = torch.zeros(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="matrix 1"):
        penalty_triton_grouped([good_b, good_b], [good_a, bad_a], grouped)
    with pytest.raises(ValueError, match="unsupported factor dtype"):
        penalty_triton(good_b.double(), good_a.double(), plan)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_tensors_without_interpreter_get_a_clear_error():
    code = (
        "import torch\n"
        "from sefe_fast.position_plan import PositionPlan\n"
        "from sefe_fast_kernels.reglora_penalty import penalty_triton\n"
        "plan = PositionPlan.from_indices(torch.tensor([[0, 0]]), (2, 2))\n"
        "try:\n"
        "    penalty_triton(torch.ones(2, 1), torch.ones(1, 2), plan)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "need CUDA tensors" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu_matches_fp32(dtype):
    lora_b, lora_a = factors(512, 768, 128, seed=8)
    indices = random_indices(512, 768, 20000, seed=8)
    plan = PositionPlan.from_indices(indices, (512, 768)).to(DEVICE)
    half = kernel(lora_b.to(dtype), lora_a.to(dtype), plan)
    ref = reference(lora_b.to(dtype), lora_a.to(dtype), indices)
    assert half[1].dtype == dtype and half[2].dtype == dtype
    assert_close(half[0], ref[0], 1e-3, "value")
    assert_close(half[1], ref[1], 2e-2, "grad B")
    assert_close(half[2], ref[2], 2e-2, "grad A")


def test_grouped_plan_rejects_plans_with_wrong_index_dtypes():
    plan = PositionPlan.from_indices(torch.tensor([[1, 2]]), (4, 5))
    wide = PositionPlan(**{**plan.__dict__, "cols": plan.cols.to(torch.int64)})
    with pytest.raises(ValueError, match=r"plan 1: cols must be a contiguous torch.int16 tensor"):
        GroupedPositionPlan.from_plans([plan, wide])
