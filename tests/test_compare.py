"""Comparing runs: mean ± sample std per method over seeds, worked by hand."""

import math

import pytest

from sefe_fast.compare import main, write_comparison
from sefe_fast.io_utils import atomic_write_json

TASKS = ["ScienceQA", "GQA"]
RUNS = {
    # (method, seed): accuracy matrix. Final SQA, GQA; MFT, MFN, MAA, BWT by hand
    # (BWT = the earlier task's difference / T = 2, = MFN - MFT):
    ("LoRA", 0): [[80.0, None], [40.0, 90.0]],  # 40, 90; 85, 65, 72.5, -20
    ("LoRA", 1): [[70.0, None], [50.0, 80.0]],  # 50, 80; 75, 65, 67.5, -10
    ("SEFE", 0): [[90.0, None], [85.0, 88.0]],  # 85, 88; 89, 86.5, 88.25, -2.5
}
SQRT2 = math.sqrt(2)


def make_runs(root, runs=RUNS, tasks=TASKS):
    dirs = []
    for (method, seed), accuracy in runs.items():
        run_dir = root / f"{method}_s{seed}"
        atomic_write_json(
            run_dir / "results.json",
            {"tasks": tasks, "accuracy": accuracy, "metrics": {}, "method": method, "seed": seed},
        )
        dirs.append(run_dir)
    return dirs


def parse_cell(cell):
    if " ± " in cell:
        mean, std = cell.split(" ± ")
        return float(mean), float(std)
    return float(cell), None


def parse_comparison(text):
    """The first table of comparison.md (the run table), as header and rows by method."""
    first_table = text.split("\n## ", 1)[0]
    lines = [
        line for line in first_table.splitlines() if line.startswith("|") and "---" not in line
    ]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return header, rows


def test_means_and_sample_stds_by_hand(tmp_path):
    md_path, png_path = write_comparison(make_runs(tmp_path), tmp_path / "out")
    assert png_path.read_bytes().startswith(b"\x89PNG")
    header, rows = parse_comparison(md_path.read_text())
    assert header[1:9] == ["SQA", "TextVQA", "ImgNet", "GQA", "VizWiz", "Grd", "VQAv2", "OCR"]
    assert header[9:] == ["MFT", "MFN", "MAA", "BWT"]
    lora = rows["LoRA"]
    # Sample std of two values a, b is |a - b| / sqrt(2).
    expected = {
        "SQA": (45.0, 10 / SQRT2),
        "GQA": (85.0, 10 / SQRT2),
        "MFT": (80.0, 10 / SQRT2),
        "MFN": (65.0, 0.0),
        "MAA": (70.0, 5 / SQRT2),
        "BWT": (-15.0, 10 / SQRT2),
    }
    for column, (mean, std) in expected.items():
        got_mean, got_std = parse_cell(lora[column])
        assert got_mean == pytest.approx(mean, abs=0.005)
        assert got_std == pytest.approx(std, abs=0.005)
    assert lora["TextVQA"] == "–"
    # A single run shows no ±.
    sefe = rows["SEFE"]
    assert parse_cell(sefe["SQA"]) == (85.0, None)
    assert parse_cell(sefe["MFN"]) == (86.5, None)
    assert parse_cell(sefe["MAA"]) == (88.25, None)
    assert parse_cell(sefe["BWT"]) == (-2.5, None)
    assert "LoRA: 2 run(s), seeds 0, 1" in md_path.read_text()


def test_cli_prints_table_and_writes_to_out(tmp_path, capsys, monkeypatch):
    dirs = make_runs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([str(d) for d in dirs]) == 0
    out = capsys.readouterr().out
    assert "| SEFE |" in out
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "comparison.png").is_file()


def test_different_task_lists_are_refused(tmp_path):
    dirs = make_runs(tmp_path / "a", runs={("LoRA", 0): RUNS[("LoRA", 0)]})
    dirs += make_runs(tmp_path / "b", runs={("SEFE", 0): RUNS[("SEFE", 0)]}, tasks=["GQA", "VQAv2"])
    with pytest.raises(ValueError, match="different task lists"):
        write_comparison(dirs, tmp_path)


def test_missing_results_and_duplicate_seed_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path)]) == 1
    assert "has no results.json" in capsys.readouterr().err
    dirs = make_runs(tmp_path / "x", runs={("LoRA", 0): RUNS[("LoRA", 0)]})
    dirs += make_runs(tmp_path / "y", runs={("LoRA", 0): RUNS[("LoRA", 1)]})
    with pytest.raises(ValueError, match="counted twice"):
        write_comparison(dirs, tmp_path)


def test_paired_differences_and_the_papers_numbers(tmp_path):
    # lowercase method names: lora is the default baseline and both are in the paper's table.
    runs = {
        ("lora", 0): RUNS[("LoRA", 0)],  # MFN 65, BWT -20, MFT 85
        ("lora", 1): RUNS[("LoRA", 1)],  # MFN 65, BWT -10, MFT 75
        ("sefe", 0): RUNS[("SEFE", 0)],  # MFN 86.5, BWT -2.5, MFT 89
        ("sefe", 1): [[70.0, None], [60.0, 90.0]],  # MFN 75, BWT -5, MFT 80
        ("sefe", 2): [[70.0, None], [60.0, 90.0]],  # seed 2 has no lora pair: left out
    }
    md_path, _ = write_comparison(make_runs(tmp_path, runs), tmp_path / "out")
    text = md_path.read_text()
    # MFN diffs +21.5 (s0), +10.0 (s1): mean 15.75, std 11.5 / sqrt 2, half t(1) * std / sqrt 2.
    half = 12.706 * (11.5 / SQRT2) / SQRT2
    row = next(line for line in text.splitlines() if line.startswith("| MFN(sefe) − MFN(lora)"))
    assert "+21.5 (s0) / +10.0 (s1) |" in row and "(s2)" not in row
    assert f"−{half - 15.75:.1f} … +{15.75 + half:.1f}" in row
    assert "| BWT(sefe) − BWT(lora) | +17.5 (s0) / +5.0 (s1) |" in text
    # The paper's section: sefe's means here over three seeds (MFT 83, MFN 78.83, BWT -4.17)
    # beside the paper's; the MFN gaps to LoRA, here (78.83 - 65) and in the paper (58.57 - 41.59).
    sefe_row = next(line for line in text.splitlines() if line.startswith("| sefe / SEFE"))
    cells = [c.strip() for c in sefe_row.strip("|").split("|")]
    assert cells[1:] == ["83.00", "69.02", "78.83", "58.57", "-4.17", "-10.45", "13.83", "16.98"]
    assert (tmp_path / "out" / "paper_comparison.png").read_bytes().startswith(b"\x89PNG")


def test_explicit_baseline_must_be_among_the_runs(tmp_path, capsys):
    dirs = make_runs(tmp_path)
    assert main([*map(str, dirs), "--baseline", "olora", "--out", str(tmp_path)]) == 1
    assert "--baseline 'olora' is not among" in capsys.readouterr().err
    assert main([*map(str, dirs), "--baseline", "LoRA", "--no-paper", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "comparison.md").read_text()
    assert "| MFN(SEFE) − MFN(LoRA) | +21.5 (s0) |" in text
    assert "paper" not in text.split("## Paired", 1)[1]
