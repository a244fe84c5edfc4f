"""The RegLoRA penalty: reference vs torch backend (value, gradients), edge cases, memory."""

from __future__ import annotations

import sys

import pytest
import torch

from sefe_fast.bench.measuring import peak_extra_torch_bytes
from sefe_fast.reglora import KeyElements, merge_key_elements, reglora_penalty
from sefe_fast.reglora.penalty import TRITON_MODULE, penalty_torch, resolve_backend

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _merged_tasks(shape, tasks, density, seed):
    """`tasks` selections drawn from a shared pool, so positions repeat across tasks."""
    gen = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    pool = torch.randperm(numel, generator=gen)[: max(1, int(2 * density * numel))]
    per_task = max(1, int(density * numel))
    return merge_key_elements(
        [
            KeyElements.from_linear(
                pool[torch.randperm(pool.numel(), generator=gen)[:per_task]], shape
            )
            for _ in range(tasks)
        ]
    )


def _run(lora_B, lora_A, ke, backend, **kwargs):
    B = lora_B.detach().clone().requires_grad_()
    A = lora_A.detach().clone().requires_grad_()
    if backend == "torch_chunked":
        value = penalty_torch(B, A, ke.plan(), **kwargs)
    else:
        value = reglora_penalty(B, A, ke, backend=backend)
    value.backward()
    return value.detach(), B.grad, A.grad


def _official_fp64(lora_B, lora_A, ke):
    delta = lora_B.double() @ lora_A.double()
    idx = ke.indices()
    return delta[idx[:, 0], idx[:, 1]].abs().mean()


CASES = [  # (k, d, r, tasks, density)
    (37, 53, 1, 1, 0.05),
    (37, 53, 3, 5, 0.4),
    (129, 67, 7, 8, 0.02),
    (300, 200, 17, 3, 0.3),
    (250, 130, 128, 2, 0.1),
    (513, 257, 64, 7, 0.02),
]


@pytest.mark.parametrize(("k", "d", "r", "tasks", "density"), CASES)
def test_torch_backend_matches_reference(k, d, r, tasks, density):
    gen = torch.Generator().manual_seed(k * r + tasks)
    lora_B, lora_A = torch.randn(k, r, generator=gen), torch.randn(r, d, generator=gen)
    ke = _merged_tasks((k, d), tasks, density, seed=k + d)
    ref_value, ref_gB, ref_gA = _run(lora_B, lora_A, ke, "reference")
    value, gB, gA = _run(lora_B, lora_A, ke, "torch")
    assert _rel(value, ref_value) <= 1e-5
    assert _rel(gB, ref_gB) <= 1e-4 and _rel(gA, ref_gA) <= 1e-4
    assert _rel(value, _official_fp64(lora_B, lora_A, ke)) <= 1e-5
    assert value.dtype == torch.float32 and value.ndim == 0
    if tasks > 1:
        assert ke.plan().num_unique < len(ke)  # the case really has duplicate positions


@pytest.mark.parametrize(
    ("shape", "repeats"),
    [((33_000, 5), 1), ((6, 35_000), 1), ((9, 13), 300)],
    ids=["int32-rows", "int32-cols", "int32-counts"],
)
def test_torch_backend_on_plans_with_wide_indices_or_counts(shape, repeats):
    """Plans whose rows, cols or multiplicities do not fit the narrow types still match."""
    k, d = shape
    gen = torch.Generator().manual_seed(k + d)
    lora_B, lora_A = torch.randn(k, 3, generator=gen), torch.randn(3, d, generator=gen)
    picked = torch.randperm(k * d, generator=gen)[:200]
    ke = merge_key_elements([KeyElements.from_linear(picked, shape)] * repeats)
    assert torch.int32 in (ke.plan().rows.dtype, ke.plan().cols.dtype, ke.plan().counts.dtype)
    ref = _run(lora_B, lora_A, ke, "reference")
    got = _run(lora_B, lora_A, ke, "torch")
    for g, rf in zip(got, ref):
        assert _rel(g, rf) <= 1e-5


@pytest.mark.parametrize("chunk", [4, 12, 100, 1 << 20])
def test_chunk_boundaries_inside_rows_and_columns(chunk):
    gen = torch.Generator().manual_seed(chunk)
    lora_B, lora_A = torch.randn(41, 9, generator=gen), torch.randn(9, 23, generator=gen)
    ke = _merged_tasks((41, 23), 3, 0.3, seed=1)
    ref = _run(lora_B, lora_A, ke, "reference")
    got = _run(lora_B, lora_A, ke, "torch_chunked", chunk=chunk)
    for g, rf in zip(got, ref):
        assert _rel(g, rf) <= 1e-5


def test_single_position_and_all_positions():
    gen = torch.Generator().manual_seed(3)
    lora_B, lora_A = torch.randn(13, 4, generator=gen), torch.randn(4, 11, generator=gen)
    single = KeyElements.from_indices(torch.tensor([[12, 10]]), (13, 11))
    every = merge_key_elements([KeyElements.from_linear(torch.arange(143), (13, 11))] * 2)
    for ke in (single, every):
        ref = _run(lora_B, lora_A, ke, "reference")
        got = _run(lora_B, lora_A, ke, "torch")
        for g, rf in zip(got, ref):
            assert _rel(g, rf) <= 1e-5
    value = _run(lora_B, lora_A, single, "torch")[0]
    assert value.item() == pytest.approx(abs((lora_B[12] @ lora_A[:, 10]).item()), rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_empty_key_elements_give_exact_zero_and_zero_gradients(backend):
    lora_B = torch.randn(6, 2)
    lora_B[0, 0] = float("inf")  # still exactly 0: no 0·inf anywhere
    value, gB, gA = _run(lora_B, torch.randn(2, 5), KeyElements.empty((6, 5)), backend)
    assert value.item() == 0.0 and not torch.isnan(value)
    assert torch.count_nonzero(gB) == 0 and torch.count_nonzero(gA) == 0


def test_zero_delta_gives_zero_gradients_like_reference():
    # A fresh LoRA (B = 0): ΔW = 0 everywhere, d|x|/dx at 0 is 0 in the reference.
    ke = _merged_tasks((20, 15), 2, 0.2, seed=2)
    lora_B, lora_A = torch.zeros(20, 3), torch.randn(3, 15)
    for backend in ("reference", "torch"):
        value, gB, gA = _run(lora_B, lora_A, ke, backend)
        assert value.item() == 0.0
        assert torch.count_nonzero(gB) == 0 and torch.count_nonzero(gA) == 0


def test_bf16_factors():
    gen = torch.Generator().manual_seed(4)
    lora_B = torch.randn(70, 16, generator=gen).bfloat16()
    lora_A = torch.randn(16, 45, generator=gen).bfloat16()
    ke = _merged_tasks((70, 45), 3, 0.1, seed=3)
    ref = _run(lora_B, lora_A, ke, "reference")
    got = _run(lora_B, lora_A, ke, "torch")
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert _rel(got[0], ref[0]) <= 1e-5
    assert _rel(got[1].float(), ref[1].float()) <= 1e-2  # both rounded to bf16
    assert _rel(got[2].float(), ref[2].float()) <= 1e-2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_non_finite_factors_give_a_non_finite_penalty(bad, backend):
    ke = KeyElements.from_linear(torch.arange(0, 60, 3), (10, 6))
    lora_B, lora_A = torch.randn(10, 2), torch.randn(2, 6)
    lora_B[0, 0] = bad  # row 0 of ΔW becomes non-finite; positions 0 and 3 lie in it
    assert not torch.isfinite(reglora_penalty(lora_B, lora_A, ke, backend=backend))


def test_bad_inputs_raise_clear_errors():
    ke = KeyElements.empty((5, 6))
    B, A = torch.randn(5, 2), torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"rank mismatch.*\(5, 2\).*\(3, 6\)"):
        reglora_penalty(B, torch.randn(3, 6), ke)
    with pytest.raises(ValueError, match=r"lora_B must be a 2-D tensor.*\(5,\)"):
        reglora_penalty(torch.randn(5), A, ke)
    with pytest.raises(ValueError, match=r"lora_A must be a 2-D tensor.*\(1, 2, 6\)"):
        reglora_penalty(B, torch.randn(1, 2, 6), ke)
    with pytest.raises(ValueError, match=r"lora_A has dtype torch\.int32"):
        reglora_penalty(B, torch.ones(2, 6, dtype=torch.int32), ke)
    with pytest.raises(ValueError, match=r"\(6, 5\) matrix but lora_B·lora_A is \(5, 6\)"):
        reglora_penalty(B, A, KeyElements.empty((6, 5)))
    with pytest.raises(ValueError, match="unknown RegLoRA backend 'cuda'"):
        reglora_penalty(B, A, ke, backend="cuda")
    with pytest.raises(TypeError, match="expected KeyElements"):
        reglora_penalty(B, A, torch.tensor([[0, 1]]))


def test_auto_is_torch_on_cpu_and_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("backend", ["triton", "triton_gather"])
def test_triton_backend_without_kernels_is_a_clear_error(monkeypatch, backend):
    # either kernel module may be the one the dispatch needs first: make both imports fail
    monkeypatch.setitem(sys.modules, TRITON_MODULE, None)
    monkeypatch.setitem(sys.modules, "sefe_fast_kernels.reglora_tile", None)
    ke = KeyElements.from_linear(torch.tensor([1]), (3, 3))
    with pytest.raises(RuntimeError, match=r"sefe_fast_kernels\.reglora_\w+.*backend='torch'"):
        reglora_penalty(torch.randn(3, 1), torch.randn(1, 3), ke, backend=backend)


def test_torch_backend_never_saves_or_allocates_a_k_by_d_tensor():
    k, d, r = 1024, 2048, 16
    gen = torch.Generator().manual_seed(5)
    B = torch.randn(k, r, generator=gen).requires_grad_()
    A = torch.randn(r, d, generator=gen).requires_grad_()
    ke = _merged_tasks((k, d), 7, 0.02, seed=6)
    plan = ke.plan()
    indices = ke.indices()

    saved_numels: list[int] = []

    def pack(tensor):
        saved_numels.append(tensor.numel())
        return tensor

    def fast():
        B.grad = A.grad = None
        penalty_torch(B, A, plan, chunk=1 << 12).backward()

    def reference():
        B.grad = A.grad = None
        delta = B @ A
        delta[indices[:, 0], indices[:, 1]].abs().mean().backward()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        penalty_torch(B, A, plan).backward()
    assert saved_numels and max(saved_numels) < k * d / 8

    product_bytes = k * d * 4
    fast()  # warm caches (CSC gathers) before measuring
    assert peak_extra_torch_bytes(reference) >= product_bytes  # the probe sees k×d buffers
    assert peak_extra_torch_bytes(fast) < product_bytes / 8


def test_peak_extra_torch_bytes_counts_new_memory_only():
    held = {"old": torch.empty(1_000_000)}

    def replace_old():  # frees 4 MB allocated before, allocates 4 MB: 4 MB extra, not 0
        held["old"] = None
        held["old"] = torch.ones(1_000_000)

    def temporary():  # 8 MB at the peak, 2 MB kept
        scratch = torch.ones(2_000_000)
        held["kept"] = scratch[:500_000].clone()

    assert peak_extra_torch_bytes(replace_old) == 4_000_000
    assert peak_extra_torch_bytes(temporary) == 10_000_000
