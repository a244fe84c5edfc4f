"""The run report: `run_dir/report.md` with the paper-layout table, the matrix, forgetting, plots.

`write_report(run_dir)` reads `run_dir/results.json` and, when `run_dir/predictions/`
exists, the prediction files (for the superficial/essential forgetting breakdown; without
them the section says it was skipped). Metrics in the report are recomputed from the
accuracy matrix; a disagreement with the values stored in results.json is noted.
CLI: `python -m sefe_fast.report RUN_DIR`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sefe_fast.answer_takeover import takeover_by_stage, takeover_markdown
from sefe_fast.evaluation import (
    BREAKDOWN_COUNTS,
    RunPredictions,
    forgetting_breakdown,
    load_run_predictions,
)
from sefe_fast.io_utils import atomic_write_text
from sefe_fast.plots import (
    plot_accuracy_by_stage,
    plot_accuracy_matrix,
    plot_forgetting_breakdown,
)
from sefe_fast.run_layout import predictions_root, report_path
from sefe_fast.run_results import (
    PAPER_COLUMNS,
    format_number,
    load_results,
    markdown_table,
    metrics_mismatch,
    paper_row_values,
)

MATRIX_PNG = "accuracy_matrix.png"
STAGES_PNG = "accuracy_by_stage.png"
BREAKDOWN_PNG = "forgetting_breakdown.png"
BREAKDOWN_HEADER = (
    "task",
    "records",
    "wrong at end",
    "wrong: superficial",
    "wrong: essential",
    "forgotten",
    "forgotten: superficial",
    "forgotten: essential",
)


def _paper_table(results: dict[str, Any]) -> str:
    values = paper_row_values(results)
    row = [results["method"], *(format_number(values[column]) for column in PAPER_COLUMNS)]
    return markdown_table(("method", *PAPER_COLUMNS), [row])


def _matrix_table(tasks: Sequence[str], accuracy: Sequence[Sequence[float | None]]) -> str:
    rows = [
        [f"{stage + 1}. {tasks[stage]}", *(format_number(v) for v in accuracy[stage])]
        for stage in range(len(tasks))
    ]
    return markdown_table(("after stage \\ evaluated on", *tasks), rows)


def _share(part: int, whole: int) -> str:
    """`part` as a percentage of `whole`; "n/a" when there is nothing to share out."""
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _breakdown_section(
    run_dir: Path, results: dict[str, Any], run: RunPredictions | None
) -> list[str]:
    lines = ["## Forgetting: superficial vs essential", ""]
    if run is None:
        lines.append(
            "_Skipped: no prediction files under `predictions/`, so the errors cannot be "
            "classified. Rerun the evaluation with predictions saved to get this section._"
        )
        return lines
    breakdown = forgetting_breakdown(run_dir, run=run)
    k_results = results["metrics_recomputed"]["tasks_completed"]
    lines += [
        f"After the last stage with predictions (stage {breakdown['final_stage']}, "
        f"{breakdown['final_task']}), each task's test records that are wrong are split into "
        "**superficial** (the response does not have the task's format, e.g. a box where an "
        "option letter was asked) and **essential** (right format, wrong answer). "
        "**Forgotten** records are those wrong at the end that were right when the task was "
        "just learned. Counts are numbers of test records.",
        "",
    ]
    if breakdown["final_stage"] != k_results:
        lines += [
            f"_Note: predictions cover {breakdown['final_stage']} stages, the accuracy matrix "
            f"{k_results}._",
            "",
        ]
    rows = []
    entries = [*breakdown["per_task"].items(), ("overall", breakdown["overall"])]
    for name, counts in entries:
        rows.append([name, *(str(counts[key]) for key in BREAKDOWN_COUNTS)])
    lines.append(markdown_table(BREAKDOWN_HEADER, rows))
    overall = breakdown["overall"]
    lines += [
        "",
        f"Of all records wrong at the end, {_share(overall['wrong_final_superficial'], overall['wrong_final'])} "
        f"are superficial; of the forgotten ones, "
        f"{_share(overall['forgotten_superficial'], overall['forgotten'])} are superficial.",
        "",
    ]
    plot_forgetting_breakdown(breakdown, run_dir / BREAKDOWN_PNG)
    lines.append(f"![Forgetting breakdown]({BREAKDOWN_PNG})")
    return lines


def _takeover_section(run_dir: Path, run: RunPredictions) -> list[str]:
    lines = ["## Answers taken over by the task just trained", ""]
    try:
        stages = takeover_by_stage(run_dir, run=run)
    except (FileNotFoundError, ValueError) as error:
        # The report is written at the end of a training run: a missing or malformed
        # training file (e.g. records skipped with --skip-bad) must not fail it.
        return [*lines, f"_Skipped: {error}._"]
    if not stages:
        return [*lines, "_Skipped: one stage only, no earlier task to take over._"]
    return [
        *lines,
        "After each stage, the share of the earlier tasks' predictions that are answers of the "
        "task just trained (in its training answers, not in the earlier task's own): the "
        "model answering an old question as the new task would. The format check above counts "
        "these as essential when both tasks are free-form (`sefe_fast.answer_takeover`).",
        "",
        takeover_markdown(stages),
    ]


def render_report(run_dir: str | Path) -> str:
    """Build report.md's text for a run (and write its PNG plots beside it)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    tasks, accuracy = results["tasks"], results["accuracy"]
    metrics = results["metrics_recomputed"]
    seed = results.get("seed")
    title = f"# Run report: {results['method']}" + (f" (seed {seed})" if seed is not None else "")
    lines = [title, "", f"Run directory: `{run_dir}`. Task order: {', '.join(tasks)}.", ""]
    if metrics["partial"]:
        lines += [
            f"**Partial run**: {metrics['tasks_completed']} of {metrics['tasks_total']} tasks "
            "trained; final accuracies and metrics are over the completed tasks.",
            "",
        ]
    lines += [
        "## Results (paper layout)",
        "",
        "Final accuracy per task (percent, after the last completed stage; – for tasks not in "
        "the run or not yet trained), then MFT, MFN, MAA, BWT (percent).",
        "",
        _paper_table(results),
        "",
    ]
    if metrics["BWT"] is None:
        lines += ["BWT is undefined with a single completed task.", ""]
    mismatch = metrics_mismatch(results)
    if mismatch:
        stored = results["metrics"]
        detail = ", ".join(
            f"{k} stored {format_number(stored[k])} vs {format_number(metrics[k])}"
            for k in mismatch
        )
        lines += [f"_Note: results.json's stored metrics differ from the matrix: {detail}._", ""]
    lines += [
        "## Accuracy matrix",
        "",
        "Row: after training the stage's task; column: evaluated task (percent).",
        "",
        _matrix_table(tasks, accuracy),
        "",
        f"![Accuracy matrix]({MATRIX_PNG})",
        "",
        f"![Per-task accuracy across stages]({STAGES_PNG})",
        "",
    ]
    plot_accuracy_matrix(tasks, accuracy, run_dir / MATRIX_PNG)
    plot_accuracy_by_stage(tasks, accuracy, run_dir / STAGES_PNG)
    # The prediction files are read once, for both forgetting sections.
    run = load_run_predictions(run_dir) if predictions_root(run_dir).is_dir() else None
    lines += _breakdown_section(run_dir, results, run)
    if run is not None:
        lines += ["", *_takeover_section(run_dir, run)]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.md` and its PNG plots atomically; return the report's path."""
    run_dir = Path(run_dir)
    text = render_report(run_dir)
    path = report_path(run_dir)
    atomic_write_text(path, text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: write the report of a run directory."""
    parser = argparse.ArgumentParser(prog="python -m sefe_fast.report", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
