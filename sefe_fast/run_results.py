"""Reading a run's results.json, and the paper's table layout shared by the report and compare.

results.json (written by the trainer): `{"tasks": [...], "accuracy": T x T (percent,
null where not evaluated), "metrics": {...}, "method": str, "seed": int, "config": {...},
"versions": {...}}`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sefe_fast.metrics import completed_stages, continual_metrics
from sefe_fast.run_layout import results_path
from sefe_fast.tasks import COIN_TASKS

# The paper's column names (docs/reference.md §5), in CoIN order.
PAPER_SHORT_NAMES: dict[str, str] = {
    "ScienceQA": "SQA",
    "TextVQA": "TextVQA",
    "ImageNet": "ImgNet",
    "GQA": "GQA",
    "VizWiz": "VizWiz",
    "Grounding": "Grd",
    "VQAv2": "VQAv2",
    "OCRVQA": "OCR",
}
METRIC_KEYS: tuple[str, ...] = ("MFT", "MFN", "MAA", "BWT")
PAPER_COLUMNS: tuple[str, ...] = (*(PAPER_SHORT_NAMES[t] for t in COIN_TASKS), *METRIC_KEYS)
MISSING = "–"


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read and check `run_dir/results.json`; adds `metrics_recomputed` from the matrix.

    Raises FileNotFoundError when the file is absent and ValueError (naming the file)
    for bad JSON, a missing or malformed `tasks`/`accuracy`/`method`, or unknown tasks.
    """
    path = results_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"run dir {run_dir} has no results.json")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: expected a JSON object")
    tasks = results.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{path}: 'tasks' must be a non-empty list of task names")
    unknown = [t for t in tasks if t not in PAPER_SHORT_NAMES]
    if unknown:
        raise ValueError(f"{path}: tasks {unknown} are not CoIN tasks {list(COIN_TASKS)}")
    if not isinstance(results.get("method"), str) or not results["method"]:
        raise ValueError(f"{path}: 'method' must be a non-empty string")
    accuracy = results.get("accuracy")
    if not isinstance(accuracy, list) or len(accuracy) != len(tasks):
        raise ValueError(f"{path}: 'accuracy' must be a {len(tasks)} x {len(tasks)} list of rows")
    try:
        results["metrics_recomputed"] = continual_metrics(accuracy)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return results


def final_accuracies(results: dict[str, Any]) -> dict[str, float | None]:
    """Per-task accuracy (percent) after the last completed stage; None for tasks not yet trained."""
    tasks, accuracy = results["tasks"], results["accuracy"]
    k = completed_stages(accuracy)
    return {task: (float(accuracy[k - 1][i]) if i < k else None) for i, task in enumerate(tasks)}


def metrics_mismatch(results: dict[str, Any], tolerance: float = 1e-6) -> list[str]:
    """Metric names whose stored value in results.json disagrees with the recomputed one."""
    stored = results.get("metrics") or {}
    recomputed = results["metrics_recomputed"]
    differing = []
    for key in METRIC_KEYS:
        if key not in stored:
            continue
        a, b = stored[key], recomputed[key]
        if (a is None) != (b is None) or (
            a is not None and b is not None and abs(float(a) - float(b)) > tolerance
        ):
            differing.append(key)
    return differing


def format_number(value: float | None, digits: int = 2) -> str:
    """A percent value with `digits` decimals, or "–" for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-style Markdown table."""
    for number, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"table row {number} has {len(row)} cells, header has {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def paper_row_values(results: dict[str, Any]) -> dict[str, float | None]:
    """The paper-table values of one run: per-task final accuracy by short name, then metrics."""
    finals = final_accuracies(results)
    values: dict[str, float | None] = {
        PAPER_SHORT_NAMES[task]: finals.get(task) for task in COIN_TASKS
    }
    for key in METRIC_KEYS:
        values[key] = results["metrics_recomputed"][key]
    return values


def run_dirs_cli(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    write: Callable[..., tuple[Path, Path]],
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The shared CLI of the multi-run tools: `RUN_DIR ... [--out DIR]`, `write(run_dirs, out,
    **options)` makes a Markdown file and a plot; the Markdown is printed. `add_options` adds a
    tool's own flags, passed to `write` by their dest names. Returns the exit status (1 with a
    message on stderr for missing or bad runs)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    if add_options is not None:
        add_options(parser)
    options = vars(parser.parse_args(argv))
    run_dirs, out = options.pop("run_dirs"), options.pop("out")
    try:
        markdown_path, _ = write(run_dirs, out, **options)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(markdown_path.read_text(encoding="utf-8"), end="")
    return 0
