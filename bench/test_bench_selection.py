"""Key-element selection: vanilla (dense `torch.topk` on |B·A|) against sefe_fast (streamed
radix select, `select_key_elements`), at the LLaVA-7B shapes.

Each case runs one memory run (peak extra bytes; its result is checked: the official count
int(M·k·d), and the same set as the other side within rounding), then the timed rounds.
Mask bytes: vanilla stores the selection as int64 (row, col) pairs (16 B per entry);
sefe_fast as `KeyElements` (its `.nbytes`).
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.cases import (
    CUDA,
    CUDA_SELECTION_SKIP_REASON,
    RANKS,
    RATIO,
    SHAPES,
    VANILLA_BYTES_PER_ENTRY,
    Shape,
    case_extra_info,
    factor_dtype,
    rounds_for,
)
from sefe_fast.bench.measuring import peak_extra_bytes_on
from sefe_fast.bench.workloads import TASK_SEED_BASE, random_lora
from sefe_fast.reglora import KeyElements, select_key_elements, select_key_elements_dense
from sefe_fast.reglora.selection import num_selected

IMPLS = [
    pytest.param("vanilla", "cpu", id="vanilla-dense-topk-cpu"),
    pytest.param("sefe_fast", "cpu", id="sefe_fast-streaming-cpu"),
    pytest.param(
        "vanilla",
        "cuda",
        id="vanilla-dense-topk-cuda",
        marks=pytest.mark.skipif(not CUDA, reason=CUDA_SELECTION_SKIP_REASON),
    ),
    pytest.param(
        "sefe_fast",
        "cuda",
        id="sefe_fast-streaming-cuda",
        marks=pytest.mark.skipif(not CUDA, reason=CUDA_SELECTION_SKIP_REASON),
    ),
]

# Linear indices of each (shape, rank, device) selection seen in this session, by side: the
# second side of a group is compared with the first.
_SEEN: dict[tuple[int, int, int, str], dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize(("side", "device"), IMPLS)
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_selection(benchmark, shape: Shape, rank: int, side: str, device: str) -> None:
    lora_B, lora_A = random_lora(shape.k, shape.d, rank, seed=TASK_SEED_BASE)
    B = lora_B.to(device=device, dtype=factor_dtype(device))
    A = lora_A.to(device=device, dtype=factor_dtype(device))
    select = select_key_elements_dense if side == "vanilla" else select_key_elements
    result: list[KeyElements] = []

    def run() -> None:
        result[:] = [select(B, A, RATIO)]
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        run()  # warm-up: CUDA context and kernels
    start = time.perf_counter()
    peak = peak_extra_bytes_on(run, device)
    seconds = time.perf_counter() - start
    key_elements = result[-1]
    m = num_selected((shape.k, shape.d), RATIO)
    assert len(key_elements) == m, f"{side} selected {len(key_elements)}, expected {m}"

    linear = torch.unique(key_elements.linear())
    assert linear.numel() == m, f"{side} selected {m - linear.numel()} duplicate positions"
    seen = _SEEN.setdefault((shape.k, shape.d, rank, device), {})
    seen[side] = linear
    if len(seen) == 2:  # the same set within rounding at the threshold (tiles vs one matmul)
        common = torch.isin(seen["vanilla"], seen["sefe_fast"]).sum().item()
        assert m - common <= max(10, m // 10_000), f"sides differ in {m - common} of {m}"

    benchmark.group = f"selection {device} {shape.names} {shape.id} r={rank}"
    benchmark.extra_info.update(
        {
            **case_extra_info("selection", side, device, B, shape, rank, m, peak),
            # select_key_elements' default backend ("auto"): the Triton kernels on CUDA
            "impl": "dense torch.topk"
            if side == "vanilla"
            else ("Triton radix select" if device == "cuda" else "streaming radix select"),
            "mask_bytes": VANILLA_BYTES_PER_ENTRY * m if side == "vanilla" else key_elements.nbytes,
        }
    )
    benchmark.pedantic(
        run, rounds=rounds_for(shape, device, seconds), iterations=1, warmup_rounds=0
    )
