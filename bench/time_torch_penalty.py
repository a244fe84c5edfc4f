"""Time the torch penalty backend (forward + backward) on a few LLaVA-7B cases; print JSON.

Used to compare two versions of sefe_fast side by side, one process per version, e.g.

    git worktree add /tmp/sefe_old a425cac
    for tree in /tmp/sefe_old $PWD /tmp/sefe_old $PWD; do
        PYTHONPATH=$tree OMP_NUM_THREADS=1 python bench/time_torch_penalty.py
    done

Each case: `tasks` seeded random selections at M = 2 % merged, fresh seeded factors, one
warm-up call (builds the plan and the backend's caches), then the minimum wall time in
seconds over `--rounds` calls, single-threaded.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sefe_fast.reglora import merge_key_elements, reglora_penalty
from sefe_fast.reglora.selection import select_key_elements

CASES = [(4096, 4096, 16, 7), (4096, 4096, 128, 3), (11008, 4096, 16, 3)]  # k, d, r, tasks


def time_case(k: int, d: int, rank: int, tasks: int, rounds: int) -> float:
    """Minimum seconds of one penalty forward + backward over `rounds` calls."""
    gen = torch.Generator().manual_seed(k + rank + tasks)
    selections = [
        select_key_elements(
            torch.randn(k, rank, generator=gen), torch.randn(rank, d, generator=gen)
        )
        for _ in range(tasks)
    ]
    key_elements = merge_key_elements(selections)
    lora_B = torch.randn(k, rank, generator=gen).requires_grad_()
    lora_A = torch.randn(rank, d, generator=gen).requires_grad_()
    reglora_penalty(lora_B, lora_A, key_elements, backend="torch").backward()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        reglora_penalty(lora_B, lora_A, key_elements, backend="torch").backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        json.dumps(
            {f"{k}x{d} r={r} t={t}": time_case(k, d, r, t, args.rounds) for k, d, r, t in CASES}
        )
    )


if __name__ == "__main__":
    main()
