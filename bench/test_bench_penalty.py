"""RegLoRA penalty forward+backward: vanilla (official formula) against sefe_fast.

Vanilla: `reference_penalty_from_indices` on int64 (row, col) positions held in memory —
the official code's behaviour, and what `reglora_penalty(..., backend="reference")` computes
minus its per-call decoding of the compact masks (which would only slow vanilla down).
sefe_fast: `reglora_penalty(..., backend="torch")` on the CPU, `backend="triton"` on CUDA,
with the position plan built beforehand (a trainer builds it once per task).

A sefe_fast case runs one warm-up (plan on the device, backend caches, Triton compilation)
and checks its value against the official formula; every case then runs one memory run
(peak extra bytes and bytes saved for the backward) and the timed rounds (as many as fit
a small time budget, at least 2: bench/cases.py). Vanilla and
sefe_fast of one shape, rank, prior-task count and device share a benchmark group.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from bench.cases import (
    CUDA,
    CUDA_SKIP_REASON,
    PRIOR_TASKS,
    RANKS,
    SHAPES,
    TRITON_SKIP_REASON,
    VANILLA_BYTES_PER_ENTRY,
    MaskStore,
    Shape,
    case_extra_info,
    current_factors,
    factor_dtype,
    rounds_for,
)
from sefe_fast.bench.measuring import SavedTensorBytes, peak_extra_bytes_on
from sefe_fast.position_plan import plan_tensors
from sefe_fast.reglora import KeyElements, reference_penalty_from_indices, reglora_penalty

IMPLS = [
    pytest.param("vanilla", "reference", "cpu", id="vanilla-cpu"),
    pytest.param("sefe_fast", "torch", "cpu", id="sefe_fast-torch-cpu"),
    pytest.param(
        "vanilla",
        "reference",
        "cuda",
        id="vanilla-cuda",
        marks=pytest.mark.skipif(not CUDA, reason=CUDA_SKIP_REASON),
    ),
    pytest.param(
        "sefe_fast",
        "triton",
        "cuda",
        id="sefe_fast-triton-cuda",
        marks=pytest.mark.skipif(not CUDA, reason=TRITON_SKIP_REASON),
    ),
]


def _forward(side: str, backend: str, B, A, key_elements: KeyElements, indices):
    if side == "vanilla":
        return lambda: reference_penalty_from_indices(B, A, indices)
    return lambda: reglora_penalty(B, A, key_elements, backend=backend)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize(("side", "backend", "device"), IMPLS)
@pytest.mark.parametrize("prior_tasks", PRIOR_TASKS, ids=lambda p: f"tasks{p}")
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_penalty_fwd_bwd(
    benchmark,
    masks: MaskStore,
    shape: Shape,
    rank: int,
    prior_tasks: int,
    side: str,
    backend: str,
    device: str,
) -> None:
    key_elements = masks.merged(shape, rank, prior_tasks)
    n = len(key_elements)
    B, A = current_factors(shape, rank, device, factor_dtype(device))
    indices = key_elements.indices().to(device) if side == "vanilla" else None
    forward = _forward(side, backend, B, A, key_elements, indices)

    def step() -> None:
        forward().backward()
        _sync(device)

    seconds = 0.0
    if side == "sefe_fast":
        # Warm-up (plan on the device, backend caches, Triton compilation), then the value
        # against the official formula: a wrong fast path fails here.
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            value = float(forward())
            expected = float(
                reference_penalty_from_indices(B, A, key_elements.indices().to(device))
            )
        tolerance = 1e-3 if device == "cuda" else 1e-4
        assert value == pytest.approx(expected, rel=tolerance), (backend, value, expected)
    elif device == "cuda":
        step()  # CUDA context and cuBLAS warm-up

    existing = [B, A, B.grad, A.grad]
    if indices is not None:
        existing.append(indices)
    else:
        plan = key_elements.plan(device)
        existing += list(plan_tensors(plan).values())
    saved = SavedTensorBytes(existing)

    loss_value: list[torch.Tensor] = []

    def measured_step() -> None:
        with saved:
            loss = forward()
        loss.backward()
        loss_value[:] = [loss.detach()]
        _sync(device)

    start = time.perf_counter()
    peak = peak_extra_bytes_on(measured_step, device)
    seconds = seconds or time.perf_counter() - start
    assert peak > 0
    value = float(loss_value[0])
    assert value > 0 and math.isfinite(value), f"{side} penalty is {value}"

    benchmark.group = (
        f"penalty fwd+bwd {device} {shape.names} {shape.id} r={rank} prior_tasks={prior_tasks}"
    )
    info = {
        **case_extra_info("penalty", side, device, B, shape, rank, n, peak),
        "impl": backend,
        "prior_tasks": prior_tasks,  # bench.summarize labels the case with it
        "saved_for_backward_bytes": int(saved.bytes),
        "value": value,
    }
    if side == "vanilla":
        info["mask_bytes"] = VANILLA_BYTES_PER_ENTRY * n
    else:
        plan = key_elements.plan(device)
        info["mask_bytes"] = key_elements.nbytes
        info["plan_bytes"] = plan.nbytes
        info["unique_positions"] = plan.num_unique
    benchmark.extra_info.update(info)
    rounds = rounds_for(shape, device, seconds)
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
