"""The run report renders from a fabricated run, and its numbers parse back to the inputs."""

import pytest

from sefe_fast.evaluation import write_predictions
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.metrics import continual_metrics
from sefe_fast.report import main, write_report
from sefe_fast.run_layout import predictions_path

TASKS = ["ScienceQA", "GQA", "Grounding"]
ACCURACY = [[75.35, None, None], [60.1, 80.25, None], [50.5, 70.75, 16.75]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_results(run_dir, tasks=TASKS, accuracy=ACCURACY, metrics=None, seed=3, config=None):
    atomic_write_json(
        run_dir / "results.json",
        {
            "tasks": tasks,
            "accuracy": accuracy,
            "metrics": metrics if metrics is not None else continual_metrics(accuracy),
            "method": "SEFE",
            "seed": seed,
            "config": config or {},
            "versions": {},
        },
    )


def parse_tables(text):
    """Every Markdown table in `text` as a list of rows (lists of cells), header first."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            if set(line) <= set("|-"):
                continue
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def as_number(cell):
    return None if cell == "–" else float(cell)


def test_report_numbers_equal_the_inputs(tmp_path):
    write_results(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    paper, matrix = parse_tables(text)[:2]

    # Paper layout: method, 8 tasks in CoIN order, then the 4 metrics.
    assert paper[0] == [
        "method", "SQA", "TextVQA", "ImgNet", "GQA", "VizWiz", "Grd", "VQAv2", "OCR",
        "MFT", "MFN", "MAA", "BWT",
    ]  # fmt: skip
    row = dict(zip(paper[0], paper[1]))
    assert row["method"] == "SEFE"
    assert as_number(row["SQA"]) == 50.5
    assert as_number(row["GQA"]) == 70.75
    assert as_number(row["Grd"]) == 16.75
    assert row["TextVQA"] == row["OCR"] == "–"
    metrics = continual_metrics(ACCURACY)
    for key in ("MFT", "MFN", "MAA", "BWT"):
        assert as_number(row[key]) == pytest.approx(metrics[key], abs=0.005)
    assert as_number(row["MFT"]) == pytest.approx((75.35 + 80.25 + 16.75) / 3, abs=0.005)

    # The full matrix, cell by cell.
    assert matrix[0][1:] == TASKS
    for stage, cells in enumerate(matrix[1:]):
        assert cells[0] == f"{stage + 1}. {TASKS[stage]}"
        assert [as_number(c) for c in cells[1:]] == ACCURACY[stage]

    # Plots exist, are PNGs, and are linked.
    for name in ("accuracy_matrix.png", "accuracy_by_stage.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in text
    # No predictions: the breakdown is skipped with a note, and no breakdown plot.
    assert "Skipped: no prediction files" in text
    assert not (tmp_path / "forgetting_breakdown.png").exists()


def test_report_breakdown_from_predictions(tmp_path):
    tasks = ["ScienceQA", "GQA"]
    write_results(tmp_path, tasks=tasks, accuracy=[[100.0, None], [0.0, 50.0]])
    rows = {
        (1, "ScienceQA"): [("A", "A"), ("B", "B")],
        # q1: a word where a letter was asked (superficial), q2: wrong letter (essential);
        # both were right at stage 1, so both are forgotten.
        (2, "ScienceQA"): [("dog", "A"), ("A", "B")],
        # GQA is the last task: wrong (essential) but not forgotten.
        (2, "GQA"): [("cat", "cat"), ("cow", "dog")],
    }
    for (stage, task), pairs in rows.items():
        write_predictions(
            predictions_path(tmp_path, stage, tasks[stage - 1], task),
            [{"question_id": n, "prediction": p, "answer": g} for n, (p, g) in enumerate(pairs)],
        )
    text = write_report(tmp_path).read_text()
    breakdown = parse_tables(text)[2]
    assert breakdown[0][0] == "task"
    by_task = {cells[0]: [int(c) for c in cells[1:]] for cells in breakdown[1:]}
    # records, wrong, wrong sup, wrong ess, forgotten, forgotten sup, forgotten ess
    assert by_task["ScienceQA"] == [2, 2, 1, 1, 2, 1, 1]
    assert by_task["GQA"] == [2, 1, 0, 1, 0, 0, 0]
    assert by_task["overall"] == [4, 3, 1, 2, 2, 1, 1]
    assert "of the forgotten ones, 50.0% are superficial" in text
    assert (tmp_path / "forgetting_breakdown.png").read_bytes().startswith(PNG_MAGIC)
    assert "](forgetting_breakdown.png)" in text
    # Without a known data folder the taken-over section is skipped, saying why.
    assert "## Answers taken over by the task just trained" in text
    assert "give it with --data" in text


def test_report_counts_answers_taken_over_by_the_task_just_trained(tmp_path):
    tasks = ["ScienceQA", "GQA"]
    data, run = tmp_path / "data", tmp_path / "run"
    for task, answers in {"ScienceQA": ["A", "B"], "GQA": ["dog", "cat"]}.items():
        records = [{"conversations": [{"from": "gpt", "value": a}]} for a in answers]
        atomic_write_json(data / task / "train.json", records)
    write_results(
        run, tasks=tasks, accuracy=[[100.0, None], [0.0, 50.0]], config={"data": str(data)}
    )
    rows = {(1, "ScienceQA"): ["A", "B"], (2, "ScienceQA"): ["dog", "A"], (2, "GQA"): ["cat", "x"]}
    for (stage, task), predictions in rows.items():
        write_predictions(
            predictions_path(run, stage, tasks[stage - 1], task),
            [{"question_id": n, "prediction": p, "answer": "A"} for n, p in enumerate(predictions)],
        )
    text = write_report(run).read_text()
    # After GQA, ScienceQA's "dog" is a GQA answer: 1 of the 2 earlier-task predictions.
    assert "| 2 | GQA | 50 % | ScienceQA 1/2 |" in text
    assert "Overall: 1 of 2 earlier-task predictions (50 %)" in text
    # A malformed training file skips the section, naming the record; the report is still written.
    atomic_write_json(data / "GQA" / "train.json", [{"id": "bad_3", "text": "no turns"}])
    text = write_report(run).read_text()
    assert "_Skipped: " in text and "record 'bad_3' (index 0) has no conversations list" in text


def test_partial_run_and_stored_metric_mismatch_are_noted(tmp_path):
    accuracy = [[75.0, None, None], [None, None, None], [None, None, None]]
    write_results(tmp_path, accuracy=accuracy, metrics={"MFT": 12.0, "BWT": None})
    text = write_report(tmp_path).read_text()
    assert "**Partial run**: 1 of 3 tasks" in text
    assert "BWT is undefined" in text
    assert "MFT stored 12.00 vs 75.00" in text
    paper = parse_tables(text)[0]
    row = dict(zip(paper[0], paper[1]))
    assert as_number(row["SQA"]) == 75.0
    assert row["GQA"] == "–"


def test_missing_results_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"has no results\.json"):
        write_report(tmp_path)
    assert main([str(tmp_path)]) == 1
    assert "has no results.json" in capsys.readouterr().err


def test_bad_matrix_in_results_names_the_file(tmp_path):
    write_results(
        tmp_path, accuracy=[[75.0, None, None], [1.0, None, None], [None] * 3], metrics={}
    )
    with pytest.raises(ValueError, match=r"results\.json.*\[1\]\[1\] is missing"):
        write_report(tmp_path)
