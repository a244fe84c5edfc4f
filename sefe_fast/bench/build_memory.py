"""Transient host memory of building a matrix's plan / DeviceMask, against one vanilla step.

    python -m sefe_fast.bench.build_memory [--k 11008] [--d 4096] [--rank 128] [--tasks 7]
        [--cases vanilla_step plan ...]

(The "before" column of docs/kernels.md came from this script's first version, commit
3cd2e28's sefe_fast/reglora/build_memory.py, copied into a checkout of 20c037c and run
there with `--cases vanilla_step plan first_penalty`.)

Each case runs in a fresh process (so no case reuses pages another left resident) on the
merged key elements of `tasks` real selections (profile_memory's cached top-2 % masks of
seeded random LoRA factors) and reports the growth of the process's resident high-water
mark (`peak_extra_rss_bytes`, /proc/self VmHWM) while it runs, and the bytes it keeps:

- vanilla_step: the official formula's forward+backward on int64 positions (the bound);
- plan: `KeyElements.plan()` (the CPU PositionPlan the torch backend evaluates);
- first_penalty: the first `reglora_penalty(..., backend="torch")` call (plan + step);
- mask_gather / mask_tile1 / mask_tile4: `build_device_mask` with bits 0 / 1 / 4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from sefe_fast.bench.measuring import peak_extra_rss_bytes
from sefe_fast.bench.workloads import default_cache_dir, random_lora, task_selection
from sefe_fast.reglora import merge_key_elements, reference_penalty_from_indices
from sefe_fast.reglora.device_mask import build_device_mask
from sefe_fast.reglora.penalty import reglora_penalty

CASES = ("vanilla_step", "plan", "first_penalty", "mask_gather", "mask_tile1", "mask_tile4")
MASK_BITS = {"mask_gather": 0, "mask_tile1": 1, "mask_tile4": 4}


def measure_case(case: str, k: int, d: int, rank: int, tasks: int) -> dict:
    """Run one case in this process: {"case", "peak_extra_rss_bytes", "kept_bytes"}."""
    torch.set_num_threads(1)
    selections = [task_selection(k, d, rank, 0.02, t, default_cache_dir()) for t in range(tasks)]
    merged = merge_key_elements(selections)
    lora_B, lora_A = random_lora(k, d, rank, seed=1)
    lora_B.requires_grad_()
    lora_A.requires_grad_()
    lora_B.grad, lora_A.grad = torch.zeros_like(lora_B), torch.zeros_like(lora_A)
    kept: list = []
    if case == "vanilla_step":
        indices = merged.indices()

        def run() -> None:
            reference_penalty_from_indices(lora_B, lora_A, indices).backward()
    elif case == "plan":

        def run() -> None:
            kept.append(merged.plan())
    elif case == "first_penalty":

        def run() -> None:
            reglora_penalty(lora_B, lora_A, merged, backend="torch").backward()
    elif case in MASK_BITS:

        def run() -> None:
            kept.append(build_device_mask(merged, bits=MASK_BITS[case]))
    else:
        raise ValueError(f"unknown case {case!r}; choose one of {CASES}")
    peak = peak_extra_rss_bytes(run)
    return {"case": case, "peak_extra_rss_bytes": peak, "kept_bytes": sum(x.nbytes for x in kept)}


def main(argv: list[str] | None = None) -> int:
    """CLI: every case in its own process, then a Markdown table (MiB)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=11008)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=7)
    parser.add_argument("--case", choices=CASES, default=None, help="run one case here")
    parser.add_argument(
        "--cases", nargs="+", choices=CASES, default=list(CASES), help="cases to run"
    )
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure_case(args.case, args.k, args.d, args.rank, args.tasks)))
        return 0
    print(f"{args.k}×{args.d}, r = {args.rank}, {args.tasks} tasks' 2 % masks (MiB):")
    print("| case | peak extra RSS | kept | transient |\n|---|---|---|---|")
    for case in args.cases:
        command = [sys.executable, "-m", "sefe_fast.bench.build_memory", "--case", case]
        command += ["--k", str(args.k), "--d", str(args.d), "--rank", str(args.rank)]
        command += ["--tasks", str(args.tasks)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        peak, kept = row["peak_extra_rss_bytes"] / 2**20, row["kept_bytes"] / 2**20
        print(f"| {case} | {peak:.1f} | {kept:.1f} | {peak - kept:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
