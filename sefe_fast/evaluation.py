"""Evaluation from prediction files: per-task scores, the accuracy matrix, the forgetting breakdown.

Prediction files are JSONL, one row per test record, `{"question_id", "prediction",
"answer"}` (`answer` is the gold the scorer uses), at
`run_dir/predictions/stage{stage:02d}_{trained_task}/{eval_task}.jsonl`, where `stage`
is the 1-based index of the task just trained. Everything here works from those files
alone: no model is needed to rescore a run.

The forgetting breakdown (`forgetting_breakdown`): with k the last stage that has
predictions, for every task i <= k, over task i's test records:

- `wrong_final`: records not correct after stage k, split by `sefe_fast.scoring.classify`
  into `wrong_final_superficial` (wrong format) and `wrong_final_essential`
  (right format, wrong answer);
- `forgotten`: those of them that were correct at stage i, when task i was just
  learned — knowledge the model had and lost — split the same way into
  `forgotten_superficial` and `forgotten_essential` (by their class at stage k).

The last task (i = k) cannot have been forgotten yet: its `forgotten` is 0. `overall`
sums the counts over tasks. "Correct" means score > 0 (see `sefe_fast.scoring`).

CLI: `python -m sefe_fast.evaluation RUN_DIR [--legacy] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sefe_fast.io_utils import atomic_write_jsonl
from sefe_fast.metrics import continual_metrics
from sefe_fast.prediction_check import (
    check_rows_answer_test,
    expected_question_ids,
    locate_test_data,
)
from sefe_fast.run_layout import (
    parse_stage_name,
    predictions_root,
    results_path,
)
from sefe_fast.scoring import classify_scored, score
from sefe_fast.tasks import task_spec

PREDICTION_KEYS = ("question_id", "prediction", "answer")
BREAKDOWN_COUNTS = (
    "n",
    "wrong_final",
    "wrong_final_superficial",
    "wrong_final_essential",
    "forgotten",
    "forgotten_superficial",
    "forgotten_essential",
)


@dataclass(frozen=True)
class TaskScore:
    """The score of one prediction file: `accuracy` in percent (mean of per-record scores).

    `n_correct` + `n_superficial` + `n_essential` = `n`; `n_correct` counts records with
    score > 0, so with VQA soft accuracy `n_correct / n` can exceed `accuracy / 100`.
    """

    accuracy: float
    n: int
    n_correct: int
    n_superficial: int
    n_essential: int
    task: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a prediction row must be a JSON object, got {row!r}")
    missing = [key for key in PREDICTION_KEYS if key not in row]
    if missing:
        raise ValueError(f"{where}: prediction row is missing keys {missing} (has {sorted(row)})")
    if not isinstance(row["prediction"], str):
        raise ValueError(f"{where}: 'prediction' must be a string, got {row['prediction']!r}")
    answer = row["answer"]
    if not isinstance(answer, str | list):
        raise ValueError(f"{where}: 'answer' must be a string or a list, got {answer!r}")
    return dict(row)


def _check_unique_ids(rows: Sequence[Mapping[str, Any]], where: str) -> None:
    seen: set[str] = set()
    for number, row in enumerate(rows, start=1):
        qid = str(row["question_id"])
        if qid in seen:
            raise ValueError(f"{where}: question_id {qid!r} appears twice (row {number})")
        seen.add(qid)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a prediction JSONL file; blank lines are skipped.

    A ValueError names the file and the line for bad JSON, a missing key, a wrong type or
    a repeated question_id; FileNotFoundError if the file is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
            row = _check_row(row, where)
            qid = str(row["question_id"])
            if qid in seen:
                raise ValueError(
                    f"{where}: question_id {qid!r} already appeared on line {seen[qid]}"
                )
            seen[qid] = line_no
            rows.append(row)
    return rows


def write_predictions(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Check the rows (keys, types, unique question_id) and write them as JSONL atomically."""
    checked = [_check_row(row, f"{path} row {n}") for n, row in enumerate(rows, start=1)]
    _check_unique_ids(checked, str(path))
    atomic_write_jsonl(path, checked)


def _classify_rows(
    task: str, rows: Sequence[Mapping[str, Any]], legacy: bool, where: str
) -> tuple[list[float], list[str]]:
    scores, classes = [], []
    for number, row in enumerate(rows, start=1):
        try:
            value = score(task, row["prediction"], row["answer"], legacy=legacy)
            klass = classify_scored(task, row["prediction"], value)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{where} row {number} (question_id {row.get('question_id')!r}): {error}"
            ) from None
        scores.append(value)
        classes.append(klass)
    return scores, classes


def score_predictions(
    task: str, rows: Sequence[Mapping[str, Any]], legacy: bool = False
) -> TaskScore:
    """Score the prediction rows of one task: accuracy (percent) and the error classes."""
    task_spec(task)
    if len(rows) == 0:
        raise ValueError(f"no prediction rows to score for task {task}")
    checked = [_check_row(row, f"{task} row {n}") for n, row in enumerate(rows, start=1)]
    scores, classes = _classify_rows(task, checked, legacy, task)
    return TaskScore(
        accuracy=100.0 * sum(scores) / len(scores),
        n=len(rows),
        n_correct=classes.count("correct"),
        n_superficial=classes.count("superficial"),
        n_essential=classes.count("essential"),
        task=task,
    )


# ---------------------------------------------------------------- whole runs


def _tasks_from_results(run_dir: Path) -> list[str] | None:
    results_file = results_path(run_dir)
    if not results_file.is_file():
        return None
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{results_file}: invalid JSON ({error})") from None
    tasks = results.get("tasks") if isinstance(results, dict) else None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{results_file}: 'tasks' must be a non-empty list of task names")
    return tasks


def _stage_dirs(run_dir: Path) -> dict[int, tuple[str, Path]]:
    pred_root = predictions_root(run_dir)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"no predictions folder in run dir {run_dir}")
    stages: dict[int, tuple[str, Path]] = {}
    for child in sorted(pred_root.iterdir()):
        if not child.is_dir():
            continue
        parsed = parse_stage_name(child.name)
        if parsed is None:
            raise ValueError(f"{child}: not a stage folder (expected stageNN_<Task>)")
        stage, trained_task = parsed
        if stage in stages:
            raise ValueError(
                f"{pred_root}: two folders for stage {stage}: {stages[stage][1]}, {child}"
            )
        stages[stage] = (trained_task, child)
    if not stages:
        raise FileNotFoundError(f"no stage folders under {pred_root}")
    expected = list(range(1, len(stages) + 1))
    if sorted(stages) != expected:
        raise ValueError(
            f"{pred_root}: stage folders must be numbered 1..{len(stages)} without gaps, "
            f"found stages {sorted(stages)}"
        )
    return stages


@dataclass
class RunPredictions:
    """Every prediction file of a run, read: task order, stages and the rows per cell."""

    tasks: list[str]
    n_stages: int
    # (stage 1-based, eval task index 0-based) -> (path, rows)
    cells: dict[tuple[int, int], tuple[Path, list[dict[str, Any]]]]


def load_run_predictions(run_dir: str | Path) -> RunPredictions:
    """Read and check every prediction file of a run (errors name the file or folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir not found: {run_dir}")
    stages = _stage_dirs(run_dir)
    tasks = _tasks_from_results(run_dir)
    if tasks is None:
        tasks = [stages[s][0] for s in sorted(stages)]
    if len(stages) > len(tasks):
        raise ValueError(f"{run_dir}: {len(stages)} stage folders but only {len(tasks)} tasks")
    for stage, (trained, folder) in stages.items():
        if trained != tasks[stage - 1]:
            raise ValueError(
                f"{folder}: stage {stage} should have trained {tasks[stage - 1]!r} "
                f"(task order {tasks}), folder says {trained!r}"
            )
    files: list[tuple[int, int, Path]] = []
    for stage, (_, folder) in sorted(stages.items()):
        present = {p.stem: p for p in folder.glob("*.jsonl")}
        unknown = sorted(set(present) - set(tasks))
        if unknown:
            raise ValueError(f"{folder}: prediction files for tasks not in the run: {unknown}")
        missing = [task for task in tasks[:stage] if task not in present]
        if missing:
            raise FileNotFoundError(
                f"{folder}: missing prediction files for tasks {missing} "
                f"(every task up to stage {stage} must be evaluated)"
            )
        files.extend((stage, tasks.index(name), path) for name, path in present.items())
    cells = {}
    for stage, index, path in tqdm(sorted(files), desc="reading predictions", unit="file"):
        cells[(stage, index)] = (path, read_predictions(path))
    return RunPredictions(tasks=tasks, n_stages=len(stages), cells=cells)


def _empty_counts() -> dict[str, int]:
    return dict.fromkeys(BREAKDOWN_COUNTS, 0)


def _breakdown(run: RunPredictions, legacy: bool) -> dict[str, Any]:
    final_stage = run.n_stages
    per_task: dict[str, dict[str, int]] = {}
    overall = _empty_counts()
    for index in range(final_stage):
        task = run.tasks[index]
        final_path, final_rows = run.cells[(final_stage, index)]
        learned_path, learned_rows = run.cells[(index + 1, index)]
        _, final_classes = _classify_rows(task, final_rows, legacy, str(final_path))
        _, learned_classes = _classify_rows(task, learned_rows, legacy, str(learned_path))
        learned_by_id = {
            str(row["question_id"]): klass for row, klass in zip(learned_rows, learned_classes)
        }
        final_ids = [str(row["question_id"]) for row in final_rows]
        if set(final_ids) != set(learned_by_id):
            only_final = sorted(set(final_ids) - set(learned_by_id))[:5]
            only_learned = sorted(set(learned_by_id) - set(final_ids))[:5]
            raise ValueError(
                f"{task}: {final_path} and {learned_path} hold different test records "
                f"(only in final: {only_final}, only at learning: {only_learned})"
            )
        counts = _empty_counts()
        counts["n"] = len(final_rows)
        for qid, klass in zip(final_ids, final_classes):
            if klass == "correct":
                continue
            counts["wrong_final"] += 1
            counts[f"wrong_final_{klass}"] += 1
            if learned_by_id[qid] == "correct":
                counts["forgotten"] += 1
                counts[f"forgotten_{klass}"] += 1
        per_task[task] = counts
        for key, value in counts.items():
            overall[key] += value
    return {
        "final_stage": final_stage,
        "final_task": run.tasks[final_stage - 1],
        "legacy": legacy,
        "per_task": per_task,
        "overall": overall,
    }


def forgetting_breakdown(
    run_dir: str | Path, legacy: bool = False, run: RunPredictions | None = None
) -> dict[str, Any]:
    """Superficial vs essential errors and forgetting at the last stage (module docstring).

    Returns `{"final_stage", "final_task", "legacy", "per_task": {task: counts},
    "overall": counts}` with counts `n`, `wrong_final`, `wrong_final_superficial`,
    `wrong_final_essential`, `forgotten`, `forgotten_superficial`, `forgotten_essential`
    (numbers of test records). `run`: the run's predictions when already read.
    """
    return _breakdown(run if run is not None else load_run_predictions(run_dir), legacy)


def rescore_run(
    run_dir: str | Path, legacy: bool = False, data_dir: str | Path | None = None
) -> dict[str, Any]:
    """Rebuild a run's accuracy matrix, metrics and forgetting breakdown from its prediction files.

    Task order comes from `run_dir/results.json` when present, else from the stage folder
    names. Every prediction file is first checked against the test records the run
    evaluated (`sefe_fast.prediction_check`; the data from results.json, or `data_dir`):
    a missing or invented row is an error. Returns `{"run_dir", "tasks", "legacy",
    "accuracy": T x T (percent, None where not evaluated), "scores": T x T of TaskScore
    dicts or None, "metrics": continual_metrics(accuracy), "breakdown":
    forgetting_breakdown, "test_data": the data folder checked against, or None when it
    could not be found (then the files were not checked)}`.
    """
    run = load_run_predictions(run_dir)
    test_data = locate_test_data(run_dir, data_dir)
    if test_data is not None:
        expected = {
            task: expected_question_ids(run_dir, task, test_data)
            for task in run.tasks[: run.n_stages]
        }
        for (_, index), (path, rows) in sorted(run.cells.items()):
            check_rows_answer_test(path, rows, expected[run.tasks[index]])
    n_tasks = len(run.tasks)
    accuracy: list[list[float | None]] = [[None] * n_tasks for _ in range(n_tasks)]
    scores: list[list[dict[str, Any] | None]] = [[None] * n_tasks for _ in range(n_tasks)]
    for (stage, index), (path, rows) in sorted(run.cells.items()):
        if not rows:
            raise ValueError(f"{path}: prediction file has no rows")
        try:
            task_score = score_predictions(run.tasks[index], rows, legacy=legacy)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        accuracy[stage - 1][index] = task_score.accuracy
        scores[stage - 1][index] = task_score.to_dict()
    return {
        "run_dir": str(run_dir),
        "tasks": run.tasks,
        "legacy": legacy,
        "accuracy": accuracy,
        "scores": scores,
        "metrics": continual_metrics(accuracy),
        "breakdown": _breakdown(run, legacy),
        "test_data": None if test_data is None else str(test_data),
    }


# ---------------------------------------------------------------- CLI


def _format_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_metric(value: float | None) -> str:
    """A metric in percent with two decimals, or "undefined" (BWT of a one-task run)."""
    return "undefined" if value is None else f"{value:.2f}"


def format_matrix(tasks: Sequence[str], accuracy: Sequence[Sequence[float | None]]) -> str:
    """The accuracy matrix as aligned text: one row per stage, one column per evaluated task."""
    width = max(8, *(len(t) for t in tasks)) + 1
    header = "after \\ on".ljust(width) + "".join(t.rjust(width) for t in tasks)
    lines = [header]
    for stage, row in enumerate(accuracy):
        lines.append(tasks[stage].ljust(width) + "".join(_format_cell(v).rjust(width) for v in row))
    return "\n".join(lines)


def format_summary(result: Mapping[str, Any]) -> str:
    """Human-readable summary of `rescore_run`'s result: matrix, metrics, breakdown."""
    metrics = result["metrics"]
    lines = [format_matrix(result["tasks"], result["accuracy"]), ""]
    done, total = metrics["tasks_completed"], metrics["tasks_total"]
    note = f" (partial run: {done} of {total} tasks)" if metrics["partial"] else ""
    lines.append(f"metrics over {done} tasks{note}, percent:")
    lines.append(
        "  ".join(f"{key} {format_metric(metrics[key])}" for key in ("MFT", "MFN", "MAA", "BWT"))
    )
    breakdown = result["breakdown"]
    lines += ["", f"forgetting breakdown at stage {breakdown['final_stage']} (records):"]
    lines.append(
        f"{'task':<10} {'n':>6} {'wrong':>6} {'w.sup':>6} {'w.ess':>6} "
        f"{'forgot':>6} {'f.sup':>6} {'f.ess':>6}"
    )
    rows = [*breakdown["per_task"].items(), ("overall", breakdown["overall"])]
    for name, counts in rows:
        lines.append(f"{name:<10} " + " ".join(f"{counts[key]:>6}" for key in BREAKDOWN_COUNTS))
    if result["legacy"]:
        lines.append(
            "(legacy scoring: the public scorers behind the paper's numbers, bugs included)"
        )
    if result.get("test_data") is None:
        lines.append(
            "(predictions NOT checked against the test records: the run's data was not found; "
            "give it with --data)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: rescore a run directory from its prediction files and print the results."""
    parser = argparse.ArgumentParser(
        prog="python -m sefe_fast.evaluation",
        description="Rescore a run from its prediction files: accuracy matrix, metrics, forgetting.",
    )
    parser.add_argument("run_dir", type=Path, help="run directory holding predictions/")
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="the public scorers behind the paper's numbers (SEFE's), bugs included",
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with <Task>/test.json the predictions are checked against (default: "
        "the run's, from results.json)",
    )
    args = parser.parse_args(argv)
    try:
        result = rescore_run(args.run_dir, legacy=args.legacy, data_dir=args.data)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
