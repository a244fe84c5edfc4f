"""How much the key elements of successive tasks overlap, and what that does to a DeviceMask.

    python -m sefe_fast.reglora.overlap RUN_DIR/key_elements [--json]

Reads the per-task key-element files of a run (in task order: the file names sort as
stage01_…, stage02_…) and, for p = 1 … T merged tasks, over all matrices:

- unique / multi: the fractions of matrix entries chosen at least once / at least twice,
  measured, next to what independent choices of the same per-task fraction ρ would give
  (1 − (1 − ρ)^p and 1 − (1 − ρ)^p − p·ρ·(1 − ρ)^(p−1)); overlap = measured multi /
  independent multi (1: independent; > 1: tasks pick the same entries more often);
- the bytes of each DeviceMask representation (gather plan, 1-bit plane + list, 4-bit
  plane + list), from the real tensors `build_device_mask` builds, and of the one
  `choose_bits` takes for the tile kernels, against the official int64 masks (16 B/entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sefe_fast.reglora.device_mask import build_device_mask, choose_bits, mask_statistics
from sefe_fast.reglora.key_elements import merge_key_elements
from sefe_fast.reglora.storage import load_key_elements
from sefe_fast.roofline import mask_fractions


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
        row.update({"bytes_gather": 0, "bytes_tile1": 0, "bytes_tile4": 0, "bytes_tile": 0})
        for name in names:
            merged = merge_key_elements([task[name] for task in tasks[:p]])
            stats = mask_statistics(merged)
            k, d = merged.shape
            row["entries"] += k * d
            row["positions"] += stats.n_total
            row["unique"] += stats.num_unique
            row["multi"] += stats.above[1]
            sizes = {b: build_device_mask(merged, bits=b, stats=stats).nbytes for b in (0, 1, 4)}
            row["bytes_gather"] += sizes[0]
            row["bytes_tile1"] += sizes[1]
            row["bytes_tile4"] += sizes[4]
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


def format_rows(rows: list[dict]) -> str:
    """Markdown table of `overlap_rows`."""
    lines = [
        "| merged tasks | unique % (indep.) | chosen ≥ 2× (indep. %) | overlap | vanilla B "
        "| gather B | tile 1-bit B | tile 4-bit B | chosen tile B |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overlap = "-" if r["overlap"] is None else f"{r['overlap']:.3f}×"
        lines.append(
            f"| {r['prior_tasks']} | {100 * r['unique_fraction']:.2f} "
            f"({100 * r['independent_unique_fraction']:.2f}) | "
            f"{r['multi']:,} = {100 * r['multi_fraction']:.4f} % "
            f"({100 * r['independent_multi_fraction']:.3f} %) | "
            f"{overlap} | {r['vanilla_bytes']:,} | {r['bytes_gather']:,} | "
            f"{r['bytes_tile1']:,} | {r['bytes_tile4']:,} | {r['bytes_tile']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a run's key_elements folder")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = overlap_rows(args.directory)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
