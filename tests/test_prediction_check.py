"""Rescoring checks every prediction file against the run's test records (issue 22, item 6)."""

import json

import pytest
from test_evaluation import GOLD, TASKS, fabricate_run

from sefe_fast.evaluation import main, read_predictions, rescore_run, write_predictions
from sefe_fast.io_utils import atomic_write_json
from sefe_fast.prediction_check import PredictionsMismatchError
from sefe_fast.run_layout import predictions_path


def _test_data(root):
    """<root>/<task>/test.json for the fabricated run's gold records (images: empty files)."""
    for task, answers in GOLD.items():
        (root / task).mkdir(parents=True)
        (root / task / "img.png").write_bytes(b"")
        records = [
            {
                "question_id": f"{task}-{n}",
                "image": f"{task}/img.png",
                "text": "q?",
                "answer": answer,
            }
            for n, answer in enumerate(answers)
        ]
        (root / task / "test.json").write_text(json.dumps(records))
    return root


def test_complete_files_pass_and_the_data_comes_from_results_json(tmp_path):
    run, data = fabricate_run(tmp_path / "run"), _test_data(tmp_path / "data")
    checked = rescore_run(run, data_dir=data)
    assert checked["test_data"] == str(data)
    # Without --data the run's own config says where its data is.
    atomic_write_json(run / "results.json", {"tasks": TASKS, "config": {"data": str(data)}})
    assert rescore_run(run)["accuracy"] == checked["accuracy"]


def test_missing_rows_are_named(tmp_path):
    run, data = fabricate_run(tmp_path / "run"), _test_data(tmp_path / "data")
    path = predictions_path(run, 3, "Grounding", "ScienceQA")
    write_predictions(path, read_predictions(path)[:1])  # cut to 1 of 4 rows
    with pytest.raises(PredictionsMismatchError, match=r"3 of the 4 test records have no pred"):
        rescore_run(run, data_dir=data)
    with pytest.raises(PredictionsMismatchError, match=r"ScienceQA-1', 'ScienceQA-2'"):
        rescore_run(run, data_dir=data)


def test_invented_rows_are_named(tmp_path, capsys):
    run, data = fabricate_run(tmp_path / "run"), _test_data(tmp_path / "data")
    path = predictions_path(run, 2, "GQA", "GQA")
    invented = {"question_id": "made-up", "prediction": "dog", "answer": "dog"}
    write_predictions(path, [*read_predictions(path), invented])
    assert main([str(run), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "1 rows answer no test record of the run (question_id ['made-up'])" in err
    assert str(path) in err


def test_unchecked_rescoring_says_so(tmp_path, capsys):
    assert main([str(fabricate_run(tmp_path))]) == 0
    assert "NOT checked against the test records" in capsys.readouterr().out
