"""Memory profile of RegLoRA over a continual run: vanilla (official) against sefe_fast.

The measurements; the command line, tables and plot are in `sefe_fast.bench.profile_report`
(`python -m sefe_fast.profile_memory`). For every number of prior tasks p = 0 … tasks-1 (training task p+1) it reports:

- mask bytes. Vanilla: the official int64 (row, col) pairs, 16 B per entry, computed
  exactly as 16 · p · Σ_matrices int(ratio·k·d) (the format's size: nothing to measure).
  sefe_fast: the real `KeyElements.nbytes` of real selections — the top `ratio` of |B·A|
  of seeded random LoRA factors of each distinct shape, one selection per shape and task,
  cached on disk — times the number of matrices of that shape (all matrices of one shape
  are given the same selections: the compact size depends on the mask's gaps, which are
  alike across matrices of one shape).
- sefe_fast plan bytes: the `PositionPlan` the fast backends evaluate (int16 rows and
  cols, uint8 multiplicity and an int32 column-order permutation per unique position, plus
  the row/column offsets), real nbytes, scaled the same way. It is held while a task trains
  (on the GPU for the Triton backend); the torch backend also caches 3 B per unique
  position (rows and multiplicities in column order) for its column-order pass.
- gpu_resident_bytes: everything the GPU ("triton") backend keeps between steps for
  RegLoRA — the `DeviceMaskGroup`s `RegLoRA.device_groups` builds (packed planes, extra
  lists, offsets, 1/n) with the tile-or-gather choice the roofline model makes for the
  factors' dtype on `--gpu` and, per matrix, the plane the resident budget
  (`--gpu-budget-gb`, `RegLoRA(gpu_budget_gb=...)`, default 1.5 GB) picks for the whole
  model — *measured* as the sum of .nbytes of the real tensors built (here on the CPU; the
  same tensors go to the GPU) for one matrix per (shape, chosen plane), times the number of
  matrices of that shape given that plane (every group tensor is per matrix).
  `gpu_representation` names the choice per shape: "gather", "tile1" (union bit plane +
  list), "tile2" or "tile4" (count planes + list), with the number of matrices when they
  differ ("54×tile1+74×tile2"); per shape, gpu_resident_bytes is then the mean per matrix.
  gpu_budget_bytes: the budget. gpu_resident_gather_bytes / gpu_resident_tile_bytes: one
  matrix per shape with the representation forced ("triton_gather": the whole plan;
  "triton_tile": the modelled-fastest plane, the one matrix alone within the budget).
- peak and saved-for-backward bytes of the regularizer's forward+backward, *measured* on
  this machine once per distinct shape and p: the peak from the profiler's memory events
  (tensor bytes allocated net of frees; the persistent gradient buffers, which training
  holds anyway, are allocated beforehand and not counted), the saved bytes with
  `torch.autograd.graph.saved_tensors_hooks` (storages that existed before — factors,
  masks, plans — not counted). Vanilla is the official formula on int64 positions held in
  memory; sefe_fast is `reglora_penalty(..., backend="torch")` with its plan built (a
  trainer builds it once per task). The factors have the training dtype (`--dtype`,
  default bf16 as LLaVA/CoIN trains under DeepSpeed bf16); both sides compute ΔW's entries
  in fp32, so vanilla's fp32 copies of bf16 factors are saved for its backward.
- model totals (modelled aggregation of the measured per-shape numbers): L_reg sums the
  penalties of all matrices, then one backward runs, so every matrix's saved tensors are
  alive from its forward until its backward, while at most one matrix is in its transient
  (forward temporaries or its backward) at a time:
      peak_model = Σ_matrices saved + max_matrices (peak − saved).
  This holds for both sides alike.

p = 0 (the first task) has no regularizer: everything is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sefe_fast.bench.lora_shapes import ModelSpec
from sefe_fast.bench.measuring import SavedTensorBytes, peak_extra_torch_bytes
from sefe_fast.bench.workloads import (
    CURRENT_SEED,
    random_lora,
    task_selection,
)
from sefe_fast.memory_budget import budget_bytes
from sefe_fast.paper_defaults import MASK_RATIO
from sefe_fast.plane_format import plane_label
from sefe_fast.position_plan import plan_tensors
from sefe_fast.reglora import (
    KeyElements,
    RegLoRA,
    merge_key_elements,
    reference_penalty_from_indices,
    reglora_penalty,
)
from sefe_fast.reglora.device_mask import build_device_mask_group, mask_statistics
from sefe_fast.reglora.regularizer import DEFAULT_GPU_BUDGET_GB
from sefe_fast.reglora.selection import num_selected

VANILLA_BYTES_PER_ENTRY = 16  # int64 (row, col)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

ROW_KEYS = (
    "prior_tasks",
    "positions",
    "unique_positions",
    "vanilla_mask_bytes",
    "sefe_fast_mask_bytes",
    "sefe_fast_plan_bytes",
    "gpu_resident_bytes",
    "gpu_budget_bytes",
    "gpu_resident_gather_bytes",
    "gpu_resident_tile_bytes",
    "vanilla_peak_bytes",
    "sefe_fast_peak_bytes",
    "vanilla_saved_bytes",
    "sefe_fast_saved_bytes",
)


# --- measuring one matrix ------------------------------------------------------------------
@dataclass(frozen=True)
class PenaltyMemory:
    """Peak extra bytes of one forward+backward and the bytes saved for its backward."""

    peak_bytes: int
    saved_bytes: int


def measure_penalty_memory(
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    key_elements: KeyElements,
    side: str,
    dtype: torch.dtype = torch.float32,
) -> PenaltyMemory:
    """Measure the penalty of one matrix: `side` "vanilla" (official formula on int64
    positions) or "sefe_fast" (the torch backend on its plan), on the CPU, with the factors
    cast to `dtype` (both sides compute ΔW's entries in fp32).

    The factors' gradient buffers exist before (as in training) and are not counted; the
    vanilla positions and the sefe_fast plan (and the backend's caches, built by a warm-up
    run) are held before the measurement and not counted either: they are reported as mask
    and plan bytes.
    """
    B = lora_B.detach().to(dtype=dtype, copy=True).requires_grad_()
    A = lora_A.detach().to(dtype=dtype, copy=True).requires_grad_()
    B.grad, A.grad = torch.zeros_like(B), torch.zeros_like(A)
    if side == "vanilla":
        indices = key_elements.indices()
        existing = [B, A, indices]

        def forward() -> torch.Tensor:
            return reference_penalty_from_indices(B, A, indices)
    elif side == "sefe_fast":
        plan = key_elements.plan()
        existing = [B, A, *plan_tensors(plan).values()]

        def forward() -> torch.Tensor:
            return reglora_penalty(B, A, key_elements, backend="torch")

        forward().backward()  # warm-up: the backend's per-plan caches, as in training
    else:
        raise ValueError(f"unknown side {side!r}; use 'vanilla' or 'sefe_fast'")

    counter = SavedTensorBytes(existing)

    def step() -> None:
        with counter:
            loss = forward()
        loss.backward()

    peak = peak_extra_torch_bytes(step)
    return PenaltyMemory(peak_bytes=int(peak), saved_bytes=int(counter.bytes))


def aggregate_peak(per_shape: Sequence[tuple[int, PenaltyMemory]]) -> int:
    """Model-level peak from (matrix count, per-matrix measurement) pairs:
    Σ count·saved + max(peak − saved) (see the module docstring)."""
    if not per_shape:
        return 0
    saved = sum(count * m.saved_bytes for count, m in per_shape)
    transient = max(max(m.peak_bytes - m.saved_bytes, 0) for _, m in per_shape)
    return saved + transient


# --- the profile ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeMeasurement:
    """The measured numbers of one distinct shape at p prior tasks (per matrix)."""

    k: int
    d: int
    count: int
    prior_tasks: int
    positions: int
    unique_positions: int
    sefe_fast_mask_bytes: int
    sefe_fast_plan_bytes: int
    gpu_resident_bytes: int
    gpu_representation: str
    gpu_resident_gather_bytes: int
    gpu_resident_tile_bytes: int
    vanilla: PenaltyMemory
    sefe_fast: PenaltyMemory


def gpu_resident(
    key_elements: KeyElements,
    rank: int,
    dtype: torch.dtype,
    gpu: str | None = None,
    backend: str = "triton",
) -> tuple[int, str]:
    """(bytes, representation) a GPU backend keeps for one matrix: the real tensors of the
    DeviceMaskGroup(s) `RegLoRA.device_groups` builds for it (on the CPU here)."""
    reg = RegLoRA({"matrix": key_elements}, backend=backend)
    groups = reg.device_groups("cpu", rank, dtype, backend, gpu)
    nbytes = sum(t.numel() * t.element_size() for _, g in groups for t in g.tensors())
    kinds = [plane_label(g.bits) for _, g in groups]
    return nbytes, "+".join(kinds) or "empty"


def budget_resident(
    masks: dict[tuple[int, int], tuple[KeyElements, int]],
    rank: int,
    dtype: torch.dtype,
    gpu: str | None = None,
    gpu_budget_gb: float = DEFAULT_GPU_BUDGET_GB,
) -> dict[tuple[int, int], tuple[int, dict[int, int]]]:
    """Per shape (k, d) -> (bytes, {bits: matrices}): what backend="triton" keeps for a model
    whose `count` matrices of each shape share one merged mask (`masks`: shape -> (mask,
    count)), with the planes chosen for all of them together under the budget
    (`RegLoRA.choose_planes`, exactly as `device_groups` chooses), each (shape, bits) form
    measured on the real DeviceMaskGroup tensors of one matrix, times its matrices."""
    stats = {shape: mask_statistics(ke) for shape, (ke, _) in masks.items()}
    named, kernels = {}, {}
    for shape, (_, count) in masks.items():
        if stats[shape].n_total == 0:
            continue
        kernels[shape] = RegLoRA._group_kernel(
            shape, [stats[shape]] * count, "triton", rank, dtype, gpu
        )
        named.update({(shape, i): stats[shape] for i in range(count)})
    chosen = RegLoRA.choose_planes(
        {f"{k}x{d}#{i}": s for ((k, d), i), s in named.items()},
        kernels,
        rank,
        dtype,
        gpu,
        budget_bytes(gpu_budget_gb),
    )
    picks: dict[tuple[int, int], dict[int, int]] = {shape: {} for shape in masks}
    for ((k, d), i), _ in named.items():
        bits = chosen[f"{k}x{d}#{i}"]
        picks[(k, d)][bits] = picks[(k, d)].get(bits, 0) + 1
    out = {}
    for shape, by_bits in picks.items():
        ke = masks[shape][0]
        total = sum(
            n * build_device_mask_group([ke], bits, "cpu", [stats[shape]]).nbytes
            for bits, n in by_bits.items()
        )
        out[shape] = (total, by_bits)
    return out


def _representation(by_bits: dict[int, int]) -> str:
    names = {b: plane_label(b) for b in by_bits}
    if len(by_bits) == 1:
        return next(iter(names.values()))
    return "+".join(f"{n}×{names[b]}" for b, n in sorted(by_bits.items())) or "empty"


def vanilla_mask_bytes(spec: ModelSpec, ratio: float, prior_tasks: int) -> int:
    """16 B · p · Σ_matrices int(ratio·k·d): the official masks after p tasks."""
    per_task = sum(g.count * num_selected((g.k, g.d), ratio) for g in spec.groups)
    return VANILLA_BYTES_PER_ENTRY * per_task * prior_tasks


def profile(
    spec: ModelSpec,
    rank: int = 128,
    ratio: float = MASK_RATIO,
    tasks: int = 8,
    cache_dir: Path | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    gpu: str | None = None,
    gpu_budget_gb: float = DEFAULT_GPU_BUDGET_GB,
) -> tuple[list[dict], list[ShapeMeasurement]]:
    """Rows (keys ROW_KEYS, model totals, one per p = 0 … tasks-1) and per-shape details.

    `dtype`: the LoRA factors' dtype during training (the selections are made in fp32).
    `gpu`: the roofline model's GPU whose tile/gather choice gpu_resident_bytes follows;
    `gpu_budget_gb`: the regularizer's resident budget its plane choice follows.
    """
    if not gpu_budget_gb > 0:
        raise ValueError(f"gpu_budget_gb must be > 0, got {gpu_budget_gb}")
    if tasks < 1:
        raise ValueError(f"tasks must be ≥ 1, got {tasks}")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    num_selected((1, 1), ratio)  # validates the ratio
    shapes = spec.shape_counts()
    prior = range(1, tasks)
    bar = tqdm(
        total=len(shapes) * (2 * len(prior)),
        desc="profile_memory",
        unit="step",
        disable=not progress,
    )
    details: list[ShapeMeasurement] = []
    merged_at: dict[int, dict[tuple[int, int], tuple[KeyElements, int]]] = {p: {} for p in prior}
    for (k, d), count in shapes.items():
        selections: list[KeyElements] = []
        lora_B, lora_A = random_lora(k, d, rank, seed=CURRENT_SEED)
        for p in prior:
            bar.set_postfix_str(f"{k}x{d} select task {p}")
            selections.append(task_selection(k, d, rank, ratio, p - 1, cache_dir))
            bar.update(1)
            merged = merge_key_elements(selections)
            if len(merged) != p * num_selected((k, d), ratio):
                raise RuntimeError(
                    f"{k}x{d}: {p} selections hold {len(merged)} positions, expected "
                    f"{p} × {num_selected((k, d), ratio)}"
                )
            bar.set_postfix_str(f"{k}x{d} measure {p} prior")
            merged_at[p][(k, d)] = (merged, count)
            plan = merged.plan()
            forced = {
                b: gpu_resident(merged, rank, dtype, gpu, b)[0]
                for b in ("triton_gather", "triton_tile")
            }
            details.append(
                ShapeMeasurement(
                    k=k,
                    d=d,
                    count=count,
                    prior_tasks=p,
                    positions=len(merged),
                    unique_positions=plan.num_unique,
                    sefe_fast_mask_bytes=merged.nbytes,
                    sefe_fast_plan_bytes=plan.nbytes,
                    gpu_resident_bytes=0,  # below: the whole model's choice under the budget
                    gpu_representation="",
                    gpu_resident_gather_bytes=forced["triton_gather"],
                    gpu_resident_tile_bytes=forced["triton_tile"],
                    vanilla=measure_penalty_memory(lora_B, lora_A, merged, "vanilla", dtype),
                    sefe_fast=measure_penalty_memory(lora_B, lora_A, merged, "sefe_fast", dtype),
                )
            )
            bar.update(1)
    bar.close()
    budget = budget_bytes(gpu_budget_gb)
    chosen_at = {p: budget_resident(merged_at[p], rank, dtype, gpu, gpu_budget_gb) for p in prior}
    for p, chosen in chosen_at.items():
        for index, m in enumerate(details):
            if m.prior_tasks == p:
                total, by_bits = chosen[(m.k, m.d)]
                details[index] = replace(
                    m,
                    gpu_resident_bytes=round(total / m.count),
                    gpu_representation=_representation(by_bits),
                )
    rows = []
    for p in range(tasks):
        row = _row(spec, ratio, p, [m for m in details if m.prior_tasks == p])
        if p:
            row["gpu_resident_bytes"] = sum(total for total, _ in chosen_at[p].values())
        row["gpu_budget_bytes"] = budget if p else 0
        rows.append(row)
    return rows, details


def _row(spec: ModelSpec, ratio: float, p: int, measured: list[ShapeMeasurement]) -> dict:
    def total(attr: str) -> int:
        return sum(m.count * getattr(m, attr) for m in measured)

    return {
        "prior_tasks": p,
        "positions": total("positions"),
        "unique_positions": total("unique_positions"),
        "vanilla_mask_bytes": vanilla_mask_bytes(spec, ratio, p),
        "sefe_fast_mask_bytes": total("sefe_fast_mask_bytes"),
        "sefe_fast_plan_bytes": total("sefe_fast_plan_bytes"),
        "gpu_resident_bytes": total("gpu_resident_bytes"),
        "gpu_resident_gather_bytes": total("gpu_resident_gather_bytes"),
        "gpu_resident_tile_bytes": total("gpu_resident_tile_bytes"),
        "gpu_representation": ",".join(f"{m.k}x{m.d}:{m.gpu_representation}" for m in measured),
        "vanilla_peak_bytes": aggregate_peak([(m.count, m.vanilla) for m in measured]),
        "sefe_fast_peak_bytes": aggregate_peak([(m.count, m.sefe_fast) for m in measured]),
        "vanilla_saved_bytes": sum(m.count * m.vanilla.saved_bytes for m in measured),
        "sefe_fast_saved_bytes": sum(m.count * m.sefe_fast.saved_bytes for m in measured),
    }


__all__ = [
    "ROW_KEYS",
    "PenaltyMemory",
    "ShapeMeasurement",
    "aggregate_peak",
    "budget_resident",
    "measure_penalty_memory",
    "profile",
    "vanilla_mask_bytes",
]
