"""Answers taken over by the task just trained: where forgotten answers go.

After stage s (task s just trained), a prediction on an earlier task i is **taken over**
when, normalised as VQA answers are (`normalize_vqa_answer`), it is one of task s's
training answers and none of task i's own: the model answered task i's question as task s
would — a book title from OCRVQA for an ImageNet photo. The format check of the forgetting
breakdown (`sefe_fast.evaluation`) cannot see this: between two free-form tasks such an
answer has the right format, so it counts as essential forgetting. This measure tells
forgetting by drift to the latest task apart from forgetting to anything else.

`takeover_by_stage(run_dir)` counts, for every stage s ≥ 2, the earlier tasks' predictions
and how many of them are taken over; training answers come from `<data>/<task>/train.json`
(every `gpt` turn), with `<data>` the run's data folder (its `--data`, or the generated
mini-CoIN in the run folder).

CLI: `python -m sefe_fast.answer_takeover RUN_DIR [RUN_DIR ...] [--data DIR]` prints, per
run, the share taken over after each stage and overall (percent of the earlier tasks'
predictions).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sefe_fast.data.coin import read_json_records, record_label
from sefe_fast.evaluation import RunPredictions, load_run_predictions
from sefe_fast.prediction_check import locate_test_data
from sefe_fast.run_results import markdown_table
from sefe_fast.vqa_normalize import normalize_vqa_answer


def training_answers(data_dir: str | Path, task: str) -> frozenset[str]:
    """The normalised `gpt` turns of `<data_dir>/<task>/train.json` (every turn of every record)."""
    path = Path(data_dir) / task / "train.json"
    answers = set()
    for index, record in enumerate(read_json_records(path)):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list):
            raise ValueError(
                f"{path}: {record_label(record, index, 'id')} has no conversations list"
            )
        for turn in turns:
            if isinstance(turn, dict) and turn.get("from") == "gpt":
                answers.add(normalize_vqa_answer(str(turn.get("value", ""))))
    return frozenset(answers)


@dataclass(frozen=True)
class StageTakeover:
    """After training `task` (stage `stage`, 1-based): per earlier task, (taken over, predictions)."""

    stage: int
    task: str
    per_task: dict[str, tuple[int, int]]

    @property
    def taken_over(self) -> int:
        return sum(k for k, _ in self.per_task.values())

    @property
    def predictions(self) -> int:
        return sum(n for _, n in self.per_task.values())


def takeover_by_stage(
    run_dir: str | Path, data_dir: str | Path | None = None, run: RunPredictions | None = None
) -> list[StageTakeover]:
    """Per stage s ≥ 2 of the run: how many earlier-task predictions are task s's answers
    (`run`: the run's predictions when already read)."""
    if run is None:
        run = load_run_predictions(run_dir)
    data = locate_test_data(run_dir, data_dir)
    if data is None:
        raise FileNotFoundError(
            f"{run_dir}: cannot tell the run's data folder (no --data in its results.json and no "
            "generated mini-CoIN in it): give it with --data"
        )
    vocab = {task: training_answers(data, task) for task in run.tasks[: run.n_stages]}
    stages = []
    for stage in range(2, run.n_stages + 1):
        latest = run.tasks[stage - 1]
        per_task = {}
        for index in range(stage - 1):
            earlier = run.tasks[index]
            _, rows = run.cells[(stage, index)]
            answers = [normalize_vqa_answer(str(row["prediction"])) for row in rows]
            taken = sum(a in vocab[latest] and a not in vocab[earlier] for a in answers)
            per_task[earlier] = (taken, len(rows))
        stages.append(StageTakeover(stage, latest, per_task))
    return stages


def _percent(part: int, whole: int) -> str:
    return "–" if whole == 0 else f"{100 * part / whole:.0f} %"


def takeover_markdown(stages: Sequence[StageTakeover]) -> str:
    """A row per stage (share taken over, then per earlier task k/n), and the overall share."""
    rows = []
    for s in stages:
        detail = ", ".join(f"{task} {k}/{n}" for task, (k, n) in s.per_task.items() if k)
        rows.append([str(s.stage), s.task, _percent(s.taken_over, s.predictions), detail or "none"])
    total = sum(s.taken_over for s in stages)
    whole = sum(s.predictions for s in stages)
    header = ("stage", "just trained", "earlier answers taken over", "taken over, by task")
    return (
        f"{markdown_table(header, rows)}\n\n"
        f"Overall: {total} of {whole} earlier-task predictions ({_percent(total, whole)}) are "
        "answers of the task just trained.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m sefe_fast.answer_takeover",
        description="Share of earlier tasks' predictions that are answers of the task just trained.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--data", type=Path, default=None, help="the runs' data folder")
    args = parser.parse_args(argv)
    try:
        for run_dir in args.run_dirs:
            print(f"### {run_dir}\n\n{takeover_markdown(takeover_by_stage(run_dir, args.data))}")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
