"""One command that checks every GPU path of sefe_fast on a real GPU and records the result.

    python bench/gpu_check.py --out DIR            # full check on one H100/H200 (≤ 8 minutes)
    python bench/gpu_check.py --smoke --out DIR    # tiny shapes, CPU, TRITON_INTERPRET=1 (CI)

Writes DIR/gpu_check.json atomically, after every section, so a run cut short still leaves
what it measured. Sections (BENCHMARKS.md, "GPU check", says what each number means):

- environment: versions, device, TF32 state, the penalty backends checked;
- masks: real 2 % selections of seeded random LoRAs (one per task) at every shape;
- correctness: value, ∂B and ∂A of every GPU penalty backend at 1/3/7-task masks, fp32 and
  bf16 factors, against float64 (with a rounding allowance, see `reference_with_bounds`),
  and determinism (two runs bitwise equal);
- penalty_time: forward+backward time of every backend and of the official dense formula;
- model_step: λ/N·Σ over all 224 LLaVA-7B matrices through `RegLoRA` (grouped launches),
  forward+backward time and the CUDA allocator's peak;
- selection: Triton against torch-streaming and dense-topk selection, time and agreement;
- model: a 2-layer LLaVA-7B-width random model: are FlashAttention-2 and Liger kernels
  really launched (profiler kernel names), and does the loss match the SDPA path.

The smoke mode runs the same code on tiny shapes on the CPU (the Triton kernels under the
interpreter); its times mean nothing, it only keeps the script working.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    if "--smoke" in sys.argv[1:]:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    # run as `python bench/gpu_check.py`: make the repository's `bench` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import importlib
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.gpu_check_model import model_check, synchronize
from sefe_fast.bench.workloads import random_lora
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.reglora import RegLoRA, merge_key_elements, reglora_penalty
from sefe_fast.reglora.penalty import BACKENDS
from sefe_fast.reglora.selection import select_key_elements, select_key_elements_dense
from sefe_fast.roofline import LLAVA_7B_SHAPES
from sefe_fast_kernels.key_element_selection import top_linear_indices

# The GPU penalty backends this check covers: every one that `reglora_penalty` offers.
GPU_PENALTY_BACKENDS = tuple(
    name for name in ("triton_tile", "triton_gather", "triton") if name in BACKENDS
)
OFFICIAL = "reference"  # the official dense formula, the yardstick for time
# Allowance for the kernels' fp32 rounding of one ΔW entry, relative to Σ_j |B_ij·A_jl|:
# covers ieee fp32 and 3-pass TF32/bf16 products with margin.
PRODUCT_REL_ERROR = 1e-5
VALUE_TOLERANCE = 1e-4  # relative error of the penalty value (fp32 accumulation)
GRAD_ATOL = 1e-4  # of the gradient's largest entry (accumulation order)
# Whole-model step against the official formula in fp32 (not float64): per matrix,
# ‖g − g_official‖ / ‖g_official‖. A sign decided by rounding moves it by 2/√n (≈ 1e-3 at
# n = 2.3·10⁶ positions); an indexing bug in the grouped launch moves it by O(1).
STEP_GRAD_TOLERANCE = 1e-2
OUT_NAME = "gpu_check.json"


@dataclass(frozen=True)
class CheckSize:
    """What one run checks: shapes (k, d, matrices of that shape), rank, tasks, rounds."""

    shapes: tuple[tuple[int, int, int], ...]
    rank: int
    ratio: float
    tasks: tuple[int, ...]
    dtypes: tuple[str, ...]
    rounds: int
    warmup: bool
    model: dict = field(default_factory=dict)


FULL = CheckSize(
    shapes=LLAVA_7B_SHAPES,
    rank=128,
    ratio=0.02,
    tasks=(1, 3, 7),
    dtypes=("float32", "bfloat16"),
    rounds=10,
    warmup=True,
    model={"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32064, "seq": 512},
)
# Interpreter: fp32 only (a bf16 tl.dot returns garbage there), a handful of programs,
# every path run once (each interpreted program costs about a millisecond per op).
SMOKE = CheckSize(
    shapes=((40, 24, 2), (24, 40, 1)),
    rank=4,
    ratio=0.05,
    tasks=(1, 2),
    dtypes=("float32",),
    rounds=1,
    warmup=False,
    model={"hidden": 64, "intermediate": 128, "heads": 2, "vocab": 300, "seq": 48},
)


def time_ms(
    fn: Callable[[], object], rounds: int, device: torch.device, warmup: bool = True
) -> dict[str, float]:
    """Wall time of fn() per call in ms (after one warm-up call): min and median over rounds."""
    if warmup:
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"min_ms": min(times), "median_ms": statistics.median(times)}


def environment(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "penalty_backends": list(GPU_PENALTY_BACKENDS),
        "tf32": {
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
    }
    for package in ("triton", "transformers", "peft", "flash_attn", "liger_kernel"):
        try:
            info[package] = getattr(importlib.import_module(package), "__version__", "?")
        except ImportError:
            info[package] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
    return info


def make_masks(size: CheckSize, device: torch.device) -> dict:
    """(k, d, t) -> the merged key elements of t tasks, for every shape and task count: one
    real selection per task (top ratio of |B·A| of a seeded random LoRA), merged without
    de-duplication. Built once, so each backend's plan is built once per (shape, t)."""
    masks = {}
    for k, d, _ in size.shapes:
        per_task = [
            select_key_elements(
                *(t.to(device) for t in random_lora(k, d, size.rank, seed=1000 + task)),
                size.ratio,
                backend="triton",
            )
            for task in range(max(size.tasks))
        ]
        for tasks in size.tasks:
            masks[(k, d, tasks)] = merge_key_elements(per_task[:tasks])
    return masks


def factors(k: int, d: int, rank: int, dtype: str, device: torch.device, seed: int = 7):
    lora_b, lora_a = random_lora(k, d, rank, seed=seed)
    lora_b = lora_b + 0.01  # not centred: ΔW has a spread of magnitudes and signs
    return lora_b.to(device, getattr(torch, dtype)), lora_a.to(device, getattr(torch, dtype))


def run_penalty(lora_b, lora_a, key_elements, backend: str):
    """Value, ∂B and ∂A of one forward+backward of `backend`."""
    b = lora_b.detach().clone().requires_grad_()
    a = lora_a.detach().clone().requires_grad_()
    value = reglora_penalty(b, a, key_elements, backend=backend)
    value.backward()
    return value.detach(), b.grad, a.grad


def reference_with_bounds(lora_b, lora_a, indices):
    """float64 value and gradients of the official formula, and per-entry gradient allowances.

    At positions where |ΔW| is within PRODUCT_REL_ERROR·Σ_j|B_ij·A_jl| of 0 the sign (hence
    the gradient's term) is decided by rounding: the reference leaves those terms out and
    the allowance adds their full size (|term| summed per gradient entry).
    """
    b, a = lora_b.double(), lora_a.double()
    rows, cols = indices[:, 0], indices[:, 1]
    n = indices.shape[0]
    dense = b @ a
    delta = dense[rows, cols]
    slack = PRODUCT_REL_ERROR * (b.abs() @ a.abs())[rows, cols]
    ambiguous = delta.abs() <= slack
    weights = torch.zeros_like(dense)
    del dense
    weights.index_put_((rows, cols), torch.where(ambiguous, 0.0, delta.sign()) / n, accumulate=True)
    amb = torch.zeros_like(weights)
    amb.index_put_(
        (rows[ambiguous], cols[ambiguous]), torch.full_like(delta[ambiguous], 1 / n), True
    )
    return {
        "value": delta.abs().mean(),
        "grad_b": weights @ a.t(),
        "grad_a": b.t() @ weights,
        "allow_b": amb @ a.abs().t(),
        "allow_a": b.abs().t() @ amb,
        "ambiguous": int(ambiguous.sum()),
    }


def grad_check(grad, ref, allow, dtype_eps: float) -> dict:
    """max |g − g_ref| against eps·|g_ref| + GRAD_ATOL·max|g_ref| + allowance, per entry."""
    grad = grad.double()
    scale = max(ref.abs().max().item(), 1e-30)
    error = (grad - ref).abs()
    limit = dtype_eps * ref.abs() + GRAD_ATOL * scale + allow
    return {"max_rel_error": error.max().item() / scale, "ok": bool((error <= limit).all())}


def correctness(size: CheckSize, masks: dict, device: torch.device) -> list[dict]:
    rows = []
    for k, d, _ in size.shapes:
        for tasks in size.tasks:
            key_elements = masks[(k, d, tasks)]
            indices = key_elements.indices().to(device)
            for dtype in size.dtypes:
                lora_b, lora_a = factors(k, d, size.rank, dtype, device)
                ref = reference_with_bounds(lora_b, lora_a, indices)
                eps = torch.finfo(getattr(torch, dtype)).eps
                for backend in GPU_PENALTY_BACKENDS:
                    value, grad_b, grad_a = run_penalty(lora_b, lora_a, key_elements, backend)
                    again = run_penalty(lora_b, lora_a, key_elements, backend)
                    value_error = abs(value.item() - ref["value"].item()) / ref["value"].item()
                    row = {
                        "shape": f"{k}x{d}",
                        "tasks": tasks,
                        "dtype": dtype,
                        "backend": backend,
                        "value_rel_error": value_error,
                        "value_ok": value_error <= VALUE_TOLERANCE,
                        "grad_b": grad_check(grad_b, ref["grad_b"], ref["allow_b"], eps),
                        "grad_a": grad_check(grad_a, ref["grad_a"], ref["allow_a"], eps),
                        "ambiguous_positions": ref["ambiguous"],
                        "deterministic": all(
                            torch.equal(x, y) for x, y in zip((value, grad_b, grad_a), again)
                        ),
                    }
                    row["ok"] = bool(
                        row["value_ok"]
                        and row["grad_b"]["ok"]
                        and row["grad_a"]["ok"]
                        and row["deterministic"]
                    )
                    rows.append(row)
                del ref
    return rows


def penalty_step(lora_b, lora_a, key_elements, backend: str) -> Callable[[], None]:
    """One forward+backward of `backend`, or of the official formula with its int64
    positions resident on the device (as the official code keeps them)."""
    if backend != OFFICIAL:
        return lambda: run_penalty(lora_b, lora_a, key_elements, backend)
    indices = key_elements.indices().to(lora_b.device)
    b = lora_b.detach().clone().requires_grad_()
    a = lora_a.detach().clone().requires_grad_()

    def official() -> None:
        b.grad = a.grad = None
        delta = b.float() @ a.float()
        delta[indices[:, 0], indices[:, 1]].abs().mean().backward()

    return official


def penalty_time(size: CheckSize, masks: dict, device: torch.device) -> list[dict]:
    rows = []
    for k, d, _ in size.shapes:
        for tasks in size.tasks:
            key_elements = masks[(k, d, tasks)]
            for dtype in size.dtypes:
                lora_b, lora_a = factors(k, d, size.rank, dtype, device)
                for backend in (*GPU_PENALTY_BACKENDS, OFFICIAL):
                    step = penalty_step(lora_b, lora_a, key_elements, backend)
                    timing = time_ms(step, size.rounds, device, size.warmup)
                    row = {"shape": f"{k}x{d}", "tasks": tasks, "dtype": dtype, "backend": backend}
                    rows.append(row | timing)
    return rows


def model_step(size: CheckSize, masks: dict, device: torch.device) -> dict:
    """RegLoRA over every matrix of the model (LLaVA-7B: 224), at the most tasks, fp32 factors.

    Masks: one merged selection per shape, shared by that shape's matrices (building 224
    distinct 7-task plans on the host would take minutes); each matrix has its own factors.
    """
    tasks = max(size.tasks)
    shared = {(k, d): masks[(k, d, tasks)] for k, d, _ in size.shapes}
    key_elements, pairs = {}, {}
    for k, d, count in size.shapes:
        for index in range(count):
            name = f"{k}x{d}.{index}"
            key_elements[name] = shared[(k, d)]
            pairs[name] = tuple(
                t.requires_grad_() for t in factors(k, d, size.rank, "float32", device, seed=index)
            )
    result = {"matrices": len(pairs), "tasks": tasks, "masks": "one per shape, shared"}
    lam_over_n = RegLoRA(key_elements).lam / len(pairs)
    indices = {shape: ke.indices().to(device) for shape, ke in shared.items()}

    def official() -> torch.Tensor:  # int64 positions resident, dense ΔW per matrix
        parts = []
        for name, (b, a) in pairs.items():
            where = indices[key_elements[name].shape]
            parts.append((b @ a)[where[:, 0], where[:, 1]].abs().mean())
        return torch.stack(parts).sum() * lam_over_n

    def clear_grads() -> None:
        for b, a in pairs.values():
            b.grad = a.grad = None

    def value_and_grads(loss) -> tuple[torch.Tensor, list[torch.Tensor]]:
        clear_grads()
        value = loss()
        value.backward()
        return value.detach(), [t.grad.clone() for pair in pairs.values() for t in pair]

    official_value, official_grads = value_and_grads(official)
    for backend in (*GPU_PENALTY_BACKENDS, OFFICIAL):
        regularizer = RegLoRA(key_elements, backend=backend)
        loss = official if backend == OFFICIAL else (lambda r=regularizer: r(pairs))

        def run(loss=loss) -> None:
            clear_grads()
            loss().backward()

        entry = time_ms(run, size.rounds, device, size.warmup)
        if device.type == "cuda":
            clear_grads()
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run()
            synchronize(device)
            entry["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
            entry["peak_extra_bytes"] = entry["max_memory_allocated"] - base
        if backend != OFFICIAL:  # the grouped launches agree with the official formula
            value, grads = value_and_grads(loss)
            entry["value_rel_error_vs_official"] = abs(
                (value - official_value) / official_value
            ).item()
            entry["max_grad_normwise_rel_error_vs_official"] = max(
                ((g - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                for g, ref in zip(grads, official_grads)
            )
            entry["ok"] = (
                entry["value_rel_error_vs_official"] <= VALUE_TOLERANCE
                and entry["max_grad_normwise_rel_error_vs_official"] <= STEP_GRAD_TOLERANCE
            )
            del grads
        result[backend] = entry
    return result


def launcher_syncs(lora_b, lora_a, m: int, device: torch.device) -> str:
    """'none' when the Triton selection launcher ran with CUDA's sync debug mode set to
    raise on any host synchronisation; the error text otherwise ('n/a' off CUDA)."""
    if device.type != "cuda":
        return "n/a"
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        top_linear_indices(lora_b, lora_a, m)
        return "none"
    except RuntimeError as error:
        return str(error)[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def selection(size: CheckSize, device: torch.device) -> list[dict]:
    rows = []
    for k, d, count in size.shapes:
        lora_b, lora_a = (t.to(device) for t in random_lora(k, d, size.rank, seed=99))
        picked = {}
        timings = {}
        paths = {
            "triton": lambda b=lora_b, a=lora_a: select_key_elements(
                b, a, size.ratio, backend="triton"
            ),
            "torch": lambda b=lora_b, a=lora_a: select_key_elements(
                b, a, size.ratio, backend="torch"
            ),
            "dense_topk": lambda b=lora_b, a=lora_a: select_key_elements_dense(b, a, size.ratio),
        }
        for name, fn in paths.items():
            timings[name] = time_ms(fn, size.rounds, device, size.warmup)
            picked[name] = torch.unique(fn().linear())
        m = picked["triton"].numel()
        row = {"shape": f"{k}x{d}", "matrices_in_model": count, "selected": m}
        for name in paths:
            row[name] = timings[name] | {
                "model_s_scaled": timings[name]["min_ms"] * count / 1e3,
            }
        row["launcher_host_syncs"] = launcher_syncs(lora_b, lora_a, m, device)
        for other in ("torch", "dense_topk"):
            common = int(torch.isin(picked["triton"], picked[other]).sum())
            row[f"agreement_with_{other}"] = common / m
            row[f"identical_to_{other}"] = torch.equal(picked["triton"], picked[other])
        rows.append(row)
    return rows


def _all_ok(report: dict) -> bool | None:
    """True when every recorded check passed and no section raised or was skipped for time
    (None: nothing was checked)."""
    flags = [row["ok"] for row in report.get("correctness", []) if isinstance(row, dict)]
    flags += [
        row["agreement_with_torch"] >= 0.999 and row["launcher_host_syncs"] in ("none", "n/a")
        for row in report.get("selection", [])
        if isinstance(row, dict)
    ]
    step = report.get("model_step", {})
    flags += [v["ok"] for v in step.values() if isinstance(v, dict) and "ok" in v]
    model = report.get("model", {})
    flags += [v["ok"] for v in model.values() if isinstance(v, dict) and "ok" in v]
    errors = [  # sections that raised or were skipped for time
        key
        for key, value in report.items()
        if isinstance(value, dict) and ("error" in value or "skipped" in value)
    ]
    return (all(flags) and not errors) if flags or errors else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="start no section after this many seconds (it is recorded as skipped)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        device, size = torch.device("cpu"), SMOKE
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 before triton is imported")
    elif torch.cuda.is_available():
        device, size = torch.device("cuda"), FULL
    else:
        parser.error("the full check needs a CUDA GPU; use --smoke on the CPU")
    out = args.out / OUT_NAME
    started = time.perf_counter()
    report: dict = {"mode": "smoke" if args.smoke else "full", "size": asdict(size)}
    masks: dict = {}

    def build_masks() -> dict:
        masks.update(make_masks(size, device))
        return {f"{k}x{d} t={t}": len(ke) for (k, d, t), ke in masks.items()}

    sections = {
        "environment": lambda: environment(device),
        "masks": build_masks,
        "correctness": lambda: correctness(size, masks, device),
        "penalty_time": lambda: penalty_time(size, masks, device),
        "model_step": lambda: model_step(size, masks, device),
        "selection": lambda: selection(size, device),
        "model": lambda: model_check(size.model, device),
    }
    report["seconds"] = {}
    for name, section in sections.items():
        start = time.perf_counter()
        if name != "environment" and start - started > args.budget_s:
            report[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        try:
            report[name] = section()
        except Exception as error:  # record it and go on: one broken path must not hide others
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            report[name]["traceback"] = traceback.format_exc(limit=8)
            print(f"gpu_check: section {name} failed: {error}", file=sys.stderr)
        report["seconds"][name] = round(time.perf_counter() - start, 2)
        report["all_ok"] = _all_ok(report)
        atomic_write_json(out, report)
        print(f"gpu_check: {name} done in {report['seconds'][name]} s", file=sys.stderr)
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    report["all_ok"] = _all_ok(report)
    atomic_write_json(out, report)
    print(f"gpu_check: wrote {out} (all_ok={report['all_ok']})")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
