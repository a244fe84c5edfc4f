"""Rescoring a run from fabricated prediction files, against a hand-computed matrix."""

import json

import pytest

from sefe_fast.evaluation import (
    forgetting_breakdown,
    main,
    read_predictions,
    rescore_run,
    score_predictions,
    write_predictions,
)
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.run_layout import predictions_path

TASKS = ["ScienceQA", "GQA", "Grounding"]
GOLD = {
    "ScienceQA": ["A", "B", "C", "D"],
    "GQA": ["dog", "cat", "red", "left"],
    "Grounding": ["[0.10, 0.10, 0.20, 0.19]", "[0, 0, 0.5, 0.5]"],
}
# PREDICTIONS[stage][task] -> one prediction per gold record above.
PREDICTIONS = {
    1: {
        "ScienceQA": ["A", "B", "C", "A"],  # 3/4: q4 essential
        "GQA": ["x", "x", "x", "x"],  # above the diagonal: 0, ignored by the metrics
    },
    2: {
        "ScienceQA": ["A", "dog", "C", "D"],  # 3/4: q2 superficial
        "GQA": ["dog", "cat", "blue", "left"],  # 3/4: q3 essential
    },
    3: {
        "ScienceQA": ["[0, 0, 1, 1]", "B", "D", "D"],  # 2/4: q1 sup, q3 ess
        "GQA": ["[0.1, 0.1, 0.2, 0.2]", "cat", "blue", "left"],  # 2/4: q1 sup, q3 ess
        # 1/2; q1 is right only with the whole box (legacy reads y2 = 0.1)
        "Grounding": ["[0.10, 0.10, 0.20, 0.19]", "[0.6, 0.6, 0.9, 0.9]"],
    },
}
EXPECTED_MATRIX = [[75.0, 0.0, None], [75.0, 75.0, None], [50.0, 50.0, 50.0]]


def _rows(task, predictions):
    return [
        {"question_id": f"{task}-{n}", "prediction": pred, "answer": gold}
        for n, (pred, gold) in enumerate(zip(predictions, GOLD[task]))
    ]


def fabricate_run(run_dir, stages=(1, 2, 3), with_results=True):
    for stage in stages:
        for task, predictions in PREDICTIONS[stage].items():
            path = predictions_path(run_dir, stage, TASKS[stage - 1], task)
            write_predictions(path, _rows(task, predictions))
    if with_results:
        atomic_write_json(run_dir / "results.json", {"tasks": TASKS, "method": "LoRA", "seed": 0})
    return run_dir


def test_predictions_path_layout(tmp_path):
    path = predictions_path(tmp_path, 3, "ImageNet", "ScienceQA")
    assert path == tmp_path / "predictions" / "stage03_ImageNet" / "ScienceQA.jsonl"
    with pytest.raises(ValueError, match="1-based"):
        predictions_path(tmp_path, 0, "ImageNet", "ScienceQA")


def test_rescore_run_equals_hand_computed_matrix(tmp_path):
    result = rescore_run(fabricate_run(tmp_path))
    assert result["tasks"] == TASKS
    assert result["accuracy"] == EXPECTED_MATRIX
    metrics = result["metrics"]
    assert metrics["MFT"] == pytest.approx((75 + 75 + 50) / 3)
    assert metrics["MFN"] == pytest.approx(50)
    assert metrics["MAA"] == pytest.approx((75 + 75 + 50) / 3)
    # The two earlier tasks' differences over T = 3 tasks (= MFN - MFT).
    assert metrics["BWT"] == pytest.approx(((50 - 75) + (50 - 75)) / 3)
    final_sqa = result["scores"][2][0]
    assert (final_sqa["n"], final_sqa["n_correct"]) == (4, 2)
    assert (final_sqa["n_superficial"], final_sqa["n_essential"]) == (1, 1)


def test_task_order_from_folder_names_without_results_json(tmp_path):
    result = rescore_run(fabricate_run(tmp_path, with_results=False))
    assert result["tasks"] == TASKS
    assert result["accuracy"] == EXPECTED_MATRIX


def test_partial_run(tmp_path):
    result = rescore_run(fabricate_run(tmp_path, stages=(1, 2)))
    assert result["accuracy"][2] == [None, None, None]
    assert result["metrics"]["partial"] is True
    assert result["metrics"]["tasks_completed"] == 2
    assert result["metrics"]["BWT"] == pytest.approx(0.0)  # ScienceQA 75 -> 75
    assert result["breakdown"]["final_stage"] == 2


def test_legacy_switch_reaches_the_matrix(tmp_path):
    result = rescore_run(fabricate_run(tmp_path), legacy=True)
    assert result["accuracy"][2][2] == pytest.approx(0.0)  # both boxes wrong under legacy


def test_forgetting_breakdown_by_hand(tmp_path):
    breakdown = forgetting_breakdown(fabricate_run(tmp_path))
    per_task = breakdown["per_task"]
    # ScienceQA: final wrong q1 (box: superficial) and q3 (essential); both right at stage 1.
    assert per_task["ScienceQA"] == {
        "n": 4,
        "wrong_final": 2,
        "wrong_final_superficial": 1,
        "wrong_final_essential": 1,
        "forgotten": 2,
        "forgotten_superficial": 1,
        "forgotten_essential": 1,
    }
    # GQA: final wrong q1 (superficial, right at stage 2) and q3 (essential, wrong at stage 2).
    assert per_task["GQA"]["wrong_final"] == 2
    assert per_task["GQA"]["forgotten"] == 1
    assert per_task["GQA"]["forgotten_superficial"] == 1
    assert per_task["GQA"]["forgotten_essential"] == 0
    # Grounding is the last task: wrong, never forgotten.
    assert per_task["Grounding"]["wrong_final_essential"] == 1
    assert per_task["Grounding"]["forgotten"] == 0
    assert breakdown["overall"] == {
        "n": 10,
        "wrong_final": 5,
        "wrong_final_superficial": 2,
        "wrong_final_essential": 3,
        "forgotten": 3,
        "forgotten_superficial": 2,
        "forgotten_essential": 1,
    }


def test_score_predictions_fields():
    result = score_predictions("GQA", _rows("GQA", ["dog", "B", "blue", "left"]))
    assert result.accuracy == pytest.approx(50.0)
    assert (result.n, result.n_correct, result.n_superficial, result.n_essential) == (4, 2, 1, 1)
    with pytest.raises(ValueError, match="no prediction rows"):
        score_predictions("GQA", [])


def test_read_predictions_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": 1, "prediction": "a", "answer": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: invalid JSON"):
        read_predictions(path)
    path.write_text('\n{"question_id": 1, "prediction": "a"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*missing keys \['answer'\]"):
        read_predictions(path)
    path.write_text('{"question_id": 1, "prediction": "a", "answer": "a"}\n' * 2)
    with pytest.raises(ValueError, match="already appeared on line 1"):
        read_predictions(path)
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_predictions(tmp_path / "nothere.jsonl")


def test_missing_prediction_file_is_named(tmp_path):
    fabricate_run(tmp_path)
    predictions_path(tmp_path, 2, "GQA", "ScienceQA").unlink()
    with pytest.raises(FileNotFoundError, match=r"stage02_GQA.*\['ScienceQA'\]"):
        rescore_run(tmp_path)


def test_stage_folder_must_match_task_order(tmp_path):
    fabricate_run(tmp_path)
    (tmp_path / "predictions" / "stage02_GQA").rename(tmp_path / "predictions" / "stage02_VQAv2")
    with pytest.raises(ValueError, match="should have trained 'GQA'"):
        rescore_run(tmp_path)


def test_different_records_across_stages_is_an_error(tmp_path):
    fabricate_run(tmp_path)
    path = predictions_path(tmp_path, 3, "Grounding", "GQA")
    rows = read_predictions(path)[:-1]
    write_predictions(path, rows)
    with pytest.raises(ValueError, match="different test records"):
        forgetting_breakdown(tmp_path)


def test_cli_prints_matrix_and_metrics(tmp_path, capsys):
    fabricate_run(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MFN 50.00" in out and "BWT -16.67" in out
    assert main([str(tmp_path), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["accuracy"] == EXPECTED_MATRIX
    assert main([str(tmp_path / "missing")]) == 1
