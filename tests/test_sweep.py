"""The sweep table: labels name what varies, metrics come from each run's matrix."""

import pytest

from sefe_fast.io_utils import atomic_write_json
from sefe_fast.sweep import main, sweep_rows

TASKS = ["ScienceQA", "GQA"]


def make_run(root, name, mask_ratio, reg_lambda, accuracy, tasks=TASKS):
    run_dir = root / name
    atomic_write_json(
        run_dir / "results.json",
        {
            "tasks": tasks,
            "accuracy": accuracy,
            "metrics": {},
            "method": "sefe",
            "seed": 0,
            "config": {"method": "sefe", "seed": 0, "mask_ratio": mask_ratio,
                       "reg_lambda": reg_lambda, "asd_ratio": 0.2},
        },
    )  # fmt: skip
    return run_dir


def test_rows_label_the_varied_settings_and_compute_metrics(tmp_path):
    a = make_run(tmp_path, "a", 0.005, 2500.0, [[80.0, None], [40.0, 90.0]])
    b = make_run(tmp_path, "b", 0.05, 2500.0, [[70.0, None], [60.0, 80.0]])
    rows = sweep_rows([a, b])
    assert [row["label"] for row in rows] == ["mask_ratio=0.005", "mask_ratio=0.05"]
    # MFT = mean of the diagonal, MFN = mean of the last row (by hand).
    assert rows[0]["MFT"] == pytest.approx(85.0) and rows[0]["MFN"] == pytest.approx(65.0)
    assert rows[1]["MFT"] == pytest.approx(75.0) and rows[1]["MFN"] == pytest.approx(70.0)


def test_cli_writes_table_and_plot_and_refuses_mixed_task_lists(tmp_path, capsys):
    a = make_run(tmp_path, "a", 0.02, 250.0, [[80.0, None], [40.0, 90.0]])
    b = make_run(tmp_path, "b", 0.02, 25000.0, [[70.0, None], [60.0, 80.0]])
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    table = (out / "sweep.md").read_text()
    assert "reg_lambda=250" in table and "reg_lambda=25000" in table
    assert (out / "sweep.png").stat().st_size > 0
    c = make_run(tmp_path, "c", 0.02, 250.0, [[50.0]], tasks=["ScienceQA"])
    assert main([str(a), str(c), "--out", str(out)]) == 1
    assert "task list" in capsys.readouterr().err


def test_a_run_without_config_is_named_in_the_error(tmp_path):
    a = make_run(tmp_path, "a", 0.02, 250.0, [[80.0, None], [40.0, 90.0]])
    bare = tmp_path / "bare"
    atomic_write_json(
        bare / "results.json",
        {"tasks": TASKS, "accuracy": [[1.0, None], [1.0, 1.0]], "metrics": {}, "method": "sefe"},
    )
    with pytest.raises(ValueError, match=r"bare.*config"):
        sweep_rows([a, bare])
