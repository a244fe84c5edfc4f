"""The paper's table in code matches docs/reference.md §5, and its rows obey BWT = MFN − MFT."""

from pathlib import Path

import pytest

from sefe_fast.paper_table import PAPER_METHOD_LABELS, PAPER_ROWS
from sefe_fast.run_results import PAPER_COLUMNS

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def reference_rows():
    text = REFERENCE.read_text(encoding="utf-8")
    section = text.split("## §5 The paper's table", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("method", "") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_code_table_is_the_documented_table():
    documented = reference_rows()
    assert set(documented) == set(PAPER_METHOD_LABELS.values())
    for method, label in PAPER_METHOD_LABELS.items():
        assert [PAPER_ROWS[method][c] for c in PAPER_COLUMNS] == documented[label], method


@pytest.mark.parametrize("method", sorted(PAPER_ROWS))
def test_rows_obey_the_bwt_identity(method):
    row = PAPER_ROWS[method]
    assert row["BWT"] == pytest.approx(row["MFN"] - row["MFT"], abs=0.011)
    finals = [row[c] for c in PAPER_COLUMNS[:8]]
    assert row["MFN"] == pytest.approx(sum(finals) / 8, abs=0.011)
