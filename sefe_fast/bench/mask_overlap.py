"""How much the key elements of successive tasks overlap, and what that does to a DeviceMask.

    python -m sefe_fast.bench.mask_overlap RUN_DIR/key_elements [--json]
    python -m sefe_fast.bench.mask_overlap --scenarios [--tasks 7] [--json]

Reads the per-task key-element files of a run (in task order: the file names sort as
stage01_…, stage02_…) and, for p = 1 … T merged tasks, over all matrices:

- unique / multi: the fractions of matrix entries chosen at least once / at least twice,
  measured, next to what independent choices of the same per-task fraction ρ would give
  (1 − (1 − ρ)^p and 1 − (1 − ρ)^p − p·ρ·(1 − ρ)^(p−1)); overlap = measured multi /
  independent multi (1: independent; > 1: tasks pick the same entries more often);
- the bytes of each DeviceMask representation (gather plan, 1-bit, 2-bit, trit and 4-bit
  plane + list), from the real tensors `build_device_mask` builds, and of the one
  `choose_bits` takes for the tile kernels, against the official int64 masks (16 B/entry).

`--scenarios` instead takes profile_memory's LLaVA-7B masks (real top-2 % selections of
seeded random factors, one per shape and task) and merges `tasks` of them three ways —
independent (tasks 0…p−1), identical (task 0 p times) and in pairs (0, 0, 1, 1, 2, 2, …,
the overlap that makes the 1-bit list longest) — and reports the bytes the triton
backend's real DeviceMaskGroups hold for the whole model (one matrix per shape, times the
matrices of that shape), per representation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sefe_fast.bench.lora_shapes import SPECS
from sefe_fast.bench.workloads import default_cache_dir, task_selection
from sefe_fast.reglora.device_mask import (
    PLANE_BITS,
    build_device_mask,
    choose_bits,
    mask_statistics,
)
from sefe_fast.reglora.key_elements import merge_key_elements
from sefe_fast.reglora.storage import load_key_elements
from sefe_fast.roofline import mask_fractions
from sefe_fast.run_results import markdown_table

PLANE_KEYS = tuple(f"tile{b}" for b in PLANE_BITS)  # bytes_tile3: the trit plane


def overlap_rows(directory: Path) -> list[dict]:
    """One row per number of merged tasks p (see the module docstring)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no key-element files (*.safetensors) in {directory}")
    tasks = [load_key_elements(path) for path in files]
    names = sorted(tasks[0])
    for path, task in zip(files, tasks):
        if sorted(task) != names:
            raise ValueError(f"{path}: its matrices differ from those of {files[0]}")
    rows = []
    for p in range(1, len(tasks) + 1):
        row = {"prior_tasks": p, "entries": 0, "positions": 0, "unique": 0, "multi": 0}
        row.update({f"bytes_{b}": 0 for b in ("gather", *PLANE_KEYS, "tile")})
        for name in names:
            merged = merge_key_elements([task[name] for task in tasks[:p]])
            stats = mask_statistics(merged)
            k, d = merged.shape
            row["entries"] += k * d
            row["positions"] += stats.n_total
            row["unique"] += stats.num_unique
            row["multi"] += stats.above[1]
            sizes = {
                b: build_device_mask(merged, bits=b, stats=stats).nbytes for b in (0, *PLANE_BITS)
            }
            row["bytes_gather"] += sizes[0]
            for b in PLANE_BITS:
                row[f"bytes_tile{b}"] += sizes[b]
            row["bytes_tile"] += sizes[choose_bits(stats, "tile")]
        rho = row["positions"] / p / row["entries"]
        independent = mask_fractions(rho, p)
        row["unique_fraction"] = row["unique"] / row["entries"]
        row["multi_fraction"] = row["multi"] / row["entries"]
        row["independent_unique_fraction"] = independent["unique"]
        row["independent_multi_fraction"] = independent["multi"]
        row["overlap"] = (
            row["multi_fraction"] / independent["multi"] if independent["multi"] else None
        )
        row["vanilla_bytes"] = 16 * row["positions"]
        rows.append(row)
    return rows


SCENARIOS = {
    "independent": lambda p: list(range(p)),
    "identical": lambda p: [0] * p,
    "pairs": lambda p: [t // 2 for t in range(p)],
}


def scenario_rows(tasks: int = 7, rank: int = 128, ratio: float = 0.02) -> list[dict]:
    """Whole-model LLaVA-7B DeviceMask bytes after `tasks` masks merged per SCENARIOS."""
    spec = SPECS["llava-7b"]
    rows = []
    for scenario, order in SCENARIOS.items():
        row = {"scenario": scenario, "prior_tasks": tasks, "positions": 0, "multi": 0}
        row.update({f"bytes_{b}": 0 for b in ("gather", *PLANE_KEYS, "tile")})
        for (k, d), count in spec.shape_counts().items():
            picks = [
                task_selection(k, d, rank, ratio, t, default_cache_dir()) for t in order(tasks)
            ]
            merged = merge_key_elements(picks)
            stats = mask_statistics(merged)
            sizes = {
                b: build_device_mask(merged, bits=b, stats=stats).nbytes for b in (0, *PLANE_BITS)
            }
            row["positions"] += count * stats.n_total
            row["multi"] += count * stats.above[1]
            row["bytes_gather"] += count * sizes[0]
            for b in PLANE_BITS:
                row[f"bytes_tile{b}"] += count * sizes[b]
            row["bytes_tile"] += count * sizes[choose_bits(stats, "tile")]
        row["vanilla_bytes"] = 16 * row["positions"]
        rows.append(row)
    return rows


def format_scenarios(rows: list[dict]) -> str:
    """Markdown table of `scenario_rows` (GB)."""
    header = ["masks merged", "positions chosen ≥ 2×", "vanilla GB", "gather GB"]
    header += ["tile 1-bit GB", "tile trit GB", "tile 4-bit GB", "chosen tile GB"]
    keys = ("vanilla_bytes", "bytes_gather", "bytes_tile1", "bytes_tile3", "bytes_tile4")
    keys += ("bytes_tile",)
    table = [
        [f"{r['prior_tasks']} {r['scenario']}", f"{r['multi']:,}"]
        + [f"{r[key] / 1e9:.3f}" for key in keys]
        for r in rows
    ]
    return markdown_table(header, table)


def format_rows(rows: list[dict]) -> str:
    """Markdown table of `overlap_rows`."""
    header = ["merged tasks", "unique % (indep.)", "chosen ≥ 2× (indep. %)", "overlap"]
    header += ["vanilla B", "gather B", "tile 1-bit B", "tile trit B", "tile 4-bit B"]
    header += ["chosen tile B"]
    keys = ("vanilla_bytes", "bytes_gather", "bytes_tile1", "bytes_tile3", "bytes_tile4")
    keys += ("bytes_tile",)
    table = [
        [
            str(r["prior_tasks"]),
            f"{100 * r['unique_fraction']:.2f} ({100 * r['independent_unique_fraction']:.2f})",
            f"{r['multi']:,} = {100 * r['multi_fraction']:.4f} % "
            f"({100 * r['independent_multi_fraction']:.3f} %)",
            "-" if r["overlap"] is None else f"{r['overlap']:.3f}×",
        ]
        + [f"{r[key]:,}" for key in keys]
        for r in rows
    ]
    return markdown_table(header, table)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, nargs="?", help="a run's key_elements folder")
    parser.add_argument("--scenarios", action="store_true", help="LLaVA-7B overlap scenarios")
    parser.add_argument("--tasks", type=int, default=7, help="masks merged (--scenarios)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.scenarios:
        rows = scenario_rows(args.tasks)
        print(json.dumps(rows, indent=1) if args.json else format_scenarios(rows))
        return 0
    if args.directory is None:
        parser.error("give a key_elements folder or --scenarios")
    rows = overlap_rows(args.directory)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
