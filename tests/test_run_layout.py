"""The run directory's layout: every path under the run dir, stage names that parse back."""

from pathlib import Path

import pytest

from sefe_fast import run_layout


def test_every_path_lives_under_the_run_dir(tmp_path):
    per_stage = [
        run_layout.adapter_dir(tmp_path, 3, "GQA"),
        run_layout.train_state_path(tmp_path, 3, "GQA"),
        run_layout.key_elements_path(tmp_path, 3, "GQA"),
        run_layout.olora_path(tmp_path, 3, "GQA"),
        run_layout.predictions_path(tmp_path, 3, "GQA", "ScienceQA"),
    ]
    fixed = [
        run_layout.results_path(tmp_path),
        run_layout.run_state_path(tmp_path),
        run_layout.train_log_path(tmp_path),
        run_layout.report_path(tmp_path),
        run_layout.minicoin_dir(tmp_path),
        run_layout.asd_path(tmp_path, "GQA", "train_x20.json"),
    ]
    relative = [p.relative_to(tmp_path).as_posix() for p in per_stage + fixed]
    assert relative == [
        "adapters/stage03_GQA",
        "checkpoints/stage03_GQA.pt",
        "key_elements/stage03_GQA.safetensors",
        "olora/stage03_GQA.safetensors",
        "predictions/stage03_GQA/ScienceQA.jsonl",
        "results.json",
        "run_state.json",
        "train_log.jsonl",
        "report.md",
        "minicoin",
        "asd/GQA/train_x20.json",
    ]
    assert run_layout.results_path("runs/x") == Path("runs/x/results.json")  # str accepted


def test_stage_names_parse_back_and_bad_stages_are_refused():
    assert run_layout.stage_name(12, "OCRVQA") == "stage12_OCRVQA"
    assert run_layout.parse_stage_name("stage12_OCRVQA") == (12, "OCRVQA")
    assert run_layout.parse_stage_name("stage1_GQA") is None  # at least two digits
    assert run_layout.parse_stage_name("notes") is None
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="1-based int"):
            run_layout.stage_name(bad, "GQA")
