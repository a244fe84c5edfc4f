"""The stability–plasticity view of a hyperparameter sweep (the paper's M and λ analysis).

`python -m sefe_fast.sweep RUN_DIR [RUN_DIR ...] [--out DIR]` reads each run's
results.json, labels it by the settings that differ between the runs (e.g. `mask_ratio=0.005`,
`reg_lambda=25000`), and writes `sweep.md` (one row per run: the settings, MFT, MFN, MAA,
BWT in percent) and `sweep.png` (MFN against MFT) to `--out`, printing the table. The runs
must share one task list.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sefe_fast.io_utils import atomic_write_text
from sefe_fast.plots import plot_stability_plasticity
from sefe_fast.run_layout import results_path
from sefe_fast.run_results import (
    METRIC_KEYS,
    format_number,
    load_results,
    markdown_table,
    run_dirs_cli,
)

# Settings a sweep varies; the label of a run names those that differ across the runs.
SWEPT_KEYS = ("method", "mask_ratio", "reg_lambda", "asd_ratio", "seed")


def sweep_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One dict per run: `label`, `run_dir`, the swept settings, and MFT/MFN/MAA/BWT (percent)."""
    results = [load_results(run_dir) for run_dir in run_dirs]
    tasks = {tuple(r["tasks"]) for r in results}
    if len(tasks) > 1:
        raise ValueError(f"the runs do not share one task list: {sorted(tasks)}")
    for run_dir, result in zip(run_dirs, results):
        if not isinstance(result.get("config"), dict):
            raise ValueError(f"{results_path(run_dir)}: no 'config' to read the settings from")
    varying = [key for key in SWEPT_KEYS if len({str(r["config"].get(key)) for r in results}) > 1]
    rows = []
    for run_dir, result in zip(run_dirs, results):
        metrics = result["metrics_recomputed"]
        settings = {key: result["config"].get(key) for key in SWEPT_KEYS}
        label = ", ".join(
            f"{key}={settings[key]:g}"
            if isinstance(settings[key], float)
            else f"{key}={settings[key]}"
            for key in varying
        )
        rows.append(
            {
                "label": label or str(run_dir),
                "run_dir": str(run_dir),
                **settings,
                **{key: metrics[key] for key in METRIC_KEYS},
            }
        )
    return rows


def write_sweep(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Write sweep.md and sweep.png for the runs into `out_dir`; return both paths."""
    rows = sweep_rows(run_dirs)
    out_dir = Path(out_dir)
    header = ["run", "M (mask ratio)", "λ", *METRIC_KEYS]
    body = [
        [
            row["label"],
            f"{row['mask_ratio']:g}",
            f"{row['reg_lambda']:g}",
            *(format_number(row[key]) for key in METRIC_KEYS),
        ]
        for row in rows
    ]
    markdown_path = out_dir / "sweep.md"
    atomic_write_text(markdown_path, markdown_table(header, body) + "\n")
    plot_path = plot_stability_plasticity(
        [row["label"] for row in rows],
        [row["MFT"] for row in rows],
        [row["MFN"] for row in rows],
        out_dir / "sweep.png",
    )
    return markdown_path, plot_path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: see the module docstring."""
    return run_dirs_cli(
        argv,
        prog="python -m sefe_fast.sweep",
        description=__doc__,
        write=write_sweep,
    )


if __name__ == "__main__":
    sys.exit(main())
