"""Answers taken over by the task just trained, counted by hand on a small run folder."""

import pytest

from sefe_fast.answer_takeover import main, takeover_by_stage, training_answers
from sefe_fast.io_utils import atomic_write_json, atomic_write_jsonl

TASKS = ["TextVQA", "ImageNet", "OCRVQA"]
TRAIN_ANSWERS = {
    "TextVQA": ["bar", "sale", "Big Sea"],  # a title that is TextVQA's own answer too
    "ImageNet": ["cup", "boat"],
    "OCRVQA": ["Big Sea", "Cold Road", "boat"],
}
PREDICTIONS = {
    # stage -> eval task -> predictions
    1: {"TextVQA": ["bar", "sale", "bar"]},
    2: {"TextVQA": ["cup", "bar", "Boat."], "ImageNet": ["cup", "boat", "cup"]},
    3: {
        "TextVQA": ["Big Sea", "cold road", "x"],
        "ImageNet": ["boat", "Cold Road!", "cup"],
        "OCRVQA": ["Big Sea", "Big Sea", "Big Sea"],
    },
}


def make_run(root):
    data = root / "data"
    for task, answers in TRAIN_ANSWERS.items():
        records = [
            {
                "id": f"{task}_{i}",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}],
            }
            for i, a in enumerate(answers)
        ]
        atomic_write_json(data / task / "train.json", records)
    run = root / "run"
    atomic_write_json(run / "results.json", {"tasks": TASKS, "config": {"data": str(data)}})
    for stage, by_task in PREDICTIONS.items():
        folder = run / "predictions" / f"stage{stage:02d}_{TASKS[stage - 1]}"
        for task, predictions in by_task.items():
            rows = [
                {"question_id": f"{task}_{i}", "prediction": p, "answer": "?"}
                for i, p in enumerate(predictions)
            ]
            atomic_write_jsonl(folder / f"{task}.jsonl", rows)
    return run, data


def test_counts_by_hand(tmp_path):
    run, data = make_run(tmp_path)
    assert training_answers(data, "OCRVQA") == {"big sea", "cold road", "boat"}
    stage2, stage3 = takeover_by_stage(run)
    # After ImageNet: TextVQA's "cup" and "Boat." are ImageNet answers TextVQA never gives.
    assert (stage2.stage, stage2.task, stage2.per_task) == (2, "ImageNet", {"TextVQA": (2, 3)})
    # After OCRVQA: "Big Sea" is TextVQA's own answer and "boat" ImageNet's: not taken over.
    assert stage3.per_task == {"TextVQA": (1, 3), "ImageNet": (1, 3)}
    assert (stage3.taken_over, stage3.predictions) == (2, 6)


def test_cli_prints_the_shares_and_names_bad_training_records(tmp_path, capsys):
    run, data = make_run(tmp_path)
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "| 2 | ImageNet | 67 % | TextVQA 2/3 |" in out
    assert "| 3 | OCRVQA | 33 % | TextVQA 1/3, ImageNet 1/3 |" in out
    assert "Overall: 4 of 9 earlier-task predictions (44 %)" in out
    atomic_write_json(data / "OCRVQA" / "train.json", [{"id": "bad_7", "text": "no turns"}])
    assert main([str(run)]) == 1
    assert "record 'bad_7' (index 0) has no conversations list" in capsys.readouterr().err


def test_a_run_without_a_known_data_folder_is_refused(tmp_path):
    run, _ = make_run(tmp_path)
    atomic_write_json(run / "results.json", {"tasks": TASKS})
    with pytest.raises(FileNotFoundError, match="give it with --data"):
        takeover_by_stage(run)
