"""Side-by-side CPU measurements of the fast RegLoRA paths against the official ones.

    python -m sefe_fast.bench.penalty_cpu [--repeats 5] [--json out.json] [--quick]
        [--parts time,memory,selection] [--threads N] [--omp-wait-policy passive|active|inherit]

Measures, in one run:
- penalty forward+backward time at 4096×4096, r=128, with 1 and 7 prior tasks' 2 % masks:
  the official dense formula (int64 positions held in memory, as the official code does)
  against the "torch" backend (its PositionPlan built beforehand, as a trainer does);
- peak extra memory of forward+backward at 11008×4096, r=128, 7 tasks, for both;
- peak extra memory (and time) of key-element selection at 11008×4096: dense topk against
  the streaming selection; and the compact storage in bytes per entry.

Masks are real selections (top 2 % of |B·A| of independent random LoRA pairs), not uniform
random positions. Times are the minimum over `repeats` runs after a warm-up, interleaving
the two sides so machine load hits both alike. The command restarts itself with
OMP_WAIT_POLICY=PASSIVE unless that variable is set (`--omp-wait-policy`): with libgomp's
default spinning, each multi-threaded op on an oversubscribed machine can wait a scheduler
slice for a descheduled partner thread (the load average is reported; `--threads 1` is the
other way out). Memory is measured two ways:
"torch" = high-water mark of the bytes held by torch tensors (profiler memory events);
"rss" = growth of the process's resident high-water mark (/proc/self VmHWM after a reset
through /proc/self/clear_refs), which also sees allocator and MKL buffers. The gradient
buffers a backward creates count as extra memory on both sides.

The measuring helpers are in `sefe_fast.bench.measuring`, the workloads (random LoRA pairs,
their selections) in `sefe_fast.bench.workloads`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from sefe_fast.bench.measuring import (
    interleaved_min_times,
    peak_extra_bytes,
    rss_available,
)
from sefe_fast.bench.workloads import make_masks, random_lora
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.paper_defaults import MASK_RATIO
from sefe_fast.reglora.key_elements import KeyElements
from sefe_fast.reglora.penalty import penalty_torch, reference_penalty_from_indices
from sefe_fast.reglora.selection import select_key_elements, select_key_elements_dense

TARGETS = {  # the speed-up / memory-reduction factors the fast paths must reach
    "penalty_speedup_1task": 4.0,
    "penalty_speedup_7tasks": 2.0,
    "penalty_memory_reduction_7tasks": 20.0,
    "selection_memory_reduction": 10.0,
}


def penalty_runners(
    lora_B: torch.Tensor, lora_A: torch.Tensor, key_elements: KeyElements
) -> dict[str, Callable[[], None]]:
    """Forward+backward closures: "reference" (official) and "torch", grads reset each run."""
    B = lora_B.detach().clone().requires_grad_()
    A = lora_A.detach().clone().requires_grad_()
    indices = key_elements.indices()  # the official code holds int64 positions in memory
    plan = key_elements.plan()  # a trainer builds the plan once per task

    def reference() -> None:
        B.grad = A.grad = None
        reference_penalty_from_indices(B, A, indices).backward()

    def fast() -> None:
        B.grad = A.grad = None
        penalty_torch(B, A, plan).backward()

    fast()  # builds the cached CSC gathers outside the measured runs
    B.grad = A.grad = None
    return {"reference": reference, "torch": fast}


def measure_penalty_time(repeats: int, size: int = 4096, r: int = 128) -> dict[str, float]:
    """Fwd+bwd seconds, reference vs torch, at size×size with 1 and 7 tasks' masks."""
    lora_B, lora_A = random_lora(size, size, r, seed=1)
    out: dict[str, float] = {}
    for tasks in (1, 7):
        ke = make_masks(size, size, r, tasks)
        times = interleaved_min_times(penalty_runners(lora_B, lora_A, ke), repeats)
        label = "1task" if tasks == 1 else f"{tasks}tasks"
        out[f"penalty_time_reference_{label}_s"] = times["reference"]
        out[f"penalty_time_torch_{label}_s"] = times["torch"]
        out[f"penalty_unique_positions_{label}"] = ke.plan().num_unique
        out[f"penalty_speedup_{label}"] = times["reference"] / times["torch"]
    return out


def measure_penalty_peaks(k: int = 11008, d: int = 4096, r: int = 128, tasks: int = 7):
    """Peak extra bytes of fwd+bwd, reference vs torch, at k×d with `tasks` tasks' masks."""
    lora_B, lora_A = random_lora(k, d, r, seed=2)
    runners = penalty_runners(lora_B, lora_A, make_masks(k, d, r, tasks))
    out: dict[str, float] = {}
    methods = ["torch", "rss"] if rss_available() else ["torch"]
    for method in methods:
        ref = peak_extra_bytes(runners["reference"], method)
        fast = peak_extra_bytes(runners["torch"], method)
        out[f"penalty_peak_reference_{method}_bytes"] = ref
        out[f"penalty_peak_torch_{method}_bytes"] = fast
        out[f"penalty_memory_reduction_{method}"] = ref / max(fast, 1)
    out["penalty_memory_reduction_7tasks"] = min(
        out[f"penalty_memory_reduction_{m}"] for m in methods
    )
    return out


def measure_selection(k: int = 11008, d: int = 4096, r: int = 128, ratio: float = MASK_RATIO):
    """Peak extra bytes and seconds of dense vs streaming selection; storage bytes/entry."""
    lora_B, lora_A = random_lora(k, d, r, seed=3)
    out: dict[str, float] = {}
    methods = ["torch", "rss"] if rss_available() else ["torch"]
    for method in methods:
        dense = peak_extra_bytes(lambda: select_key_elements_dense(lora_B, lora_A, ratio), method)
        stream = peak_extra_bytes(lambda: select_key_elements(lora_B, lora_A, ratio), method)
        out[f"selection_peak_dense_{method}_bytes"] = dense
        out[f"selection_peak_streaming_{method}_bytes"] = stream
        out[f"selection_memory_reduction_{method}"] = dense / max(stream, 1)
    out["selection_memory_reduction"] = min(out[f"selection_memory_reduction_{m}"] for m in methods)
    times = interleaved_min_times(
        {
            "dense": lambda: select_key_elements_dense(lora_B, lora_A, ratio),
            "streaming": lambda: select_key_elements(lora_B, lora_A, ratio),
        },
        repeats=2,
    )
    out["selection_time_dense_s"] = times["dense"]
    out["selection_time_streaming_s"] = times["streaming"]
    ke = select_key_elements(lora_B, lora_A, ratio)
    out["key_elements_bytes_per_entry"] = ke.nbytes / len(ke)
    out["key_elements_official_bytes_per_entry"] = 16.0
    return out


PARTS = ("time", "memory", "selection")


def run(repeats: int = 5, quick: bool = False, parts=PARTS) -> dict[str, float | str]:
    """The chosen measurements; `quick` shrinks the shapes (smoke tests, not for reporting)."""
    results: dict[str, float | str] = {}
    if "time" in parts:
        results.update(measure_penalty_time(repeats, *((1024, 32) if quick else (4096, 128))))
    if "memory" in parts:
        results.update(measure_penalty_peaks(*((2048, 1024, 32) if quick else ())))
    if "selection" in parts:
        results.update(measure_selection(*((2048, 1024, 32) if quick else ())))
    results["torch_threads"] = torch.get_num_threads()
    results["load_average_1min"] = os.getloadavg()[0]
    results["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    return results


def format_report(results: dict[str, float | str]) -> str:
    """A plain-text table of every number and the targets with pass/fail."""
    lines = [
        f"{key:48s} {value:,.4g}" if isinstance(value, int | float) else f"{key:48s} {value}"
        for key, value in results.items()
    ]
    lines.append("")
    for key, target in TARGETS.items():
        value = results.get(key)
        if value is None:
            continue
        verdict = "ok" if value >= target else "BELOW TARGET"
        lines.append(f"{key:48s} {value:7.2f}x  (target ≥ {target:g}x)  {verdict}")
    return "\n".join(lines)


def _reexec_with_wait_policy(policy: str) -> None:
    """Restart this command with OMP_WAIT_POLICY=`policy` unless the variable is already set.

    libgomp reads the variable once, when torch loads it, so it cannot be changed in-process.
    With the default (spinning) policy, every multi-threaded op on an oversubscribed machine
    (here: 2 cores shared by several test runs) can wait a whole scheduler slice for a
    descheduled partner thread, which penalises code with many ops over code with a few big
    ones. The policy applies to both sides of every comparison alike.
    """
    if policy == "inherit" or "OMP_WAIT_POLICY" in os.environ:
        return
    env = dict(os.environ, OMP_WAIT_POLICY=policy.upper())
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)


def main(argv: list[str] | None = None, reexec: bool = False) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "inherit"],
        default="passive",
        help="OMP_WAIT_POLICY to restart with when it is not set (inherit: keep as is)",
    )
    args = parser.parse_args(argv)
    if reexec:
        _reexec_with_wait_policy(args.omp_wait_policy)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run(args.repeats, args.quick, parts)
    print(format_report(results))
    if args.json is not None:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(reexec=True))


__all__ = [
    "measure_penalty_peaks",
    "measure_penalty_time",
    "measure_selection",
    "penalty_runners",
]
