"""Continual metrics on small matrices worked by hand."""

import math

import pytest

from sefe_fast.metrics import bwt_over_earlier_tasks, completed_stages, continual_metrics


def test_two_by_two_by_hand():
    accuracy = [[80.0, None], [60.0, 90.0]]
    m = continual_metrics(accuracy)
    assert m["MFT"] == pytest.approx((80 + 90) / 2)  # 85
    assert m["MFN"] == pytest.approx((60 + 90) / 2)  # 75
    assert m["MAA"] == pytest.approx((80 + (60 + 90) / 2) / 2)  # (80 + 75) / 2 = 77.5
    # (1/T) * sum over the T-1 earlier tasks: (60 - 80) / 2 = -10 = MFN - MFT
    assert m["BWT"] == pytest.approx((60 - 80) / 2)
    assert m["tasks_completed"] == 2
    assert m["partial"] is False


def test_three_by_three_with_none_above_diagonal():
    accuracy = [
        [90, None, None],
        [70, 80, None],
        [50, 60, 100],
    ]
    m = continual_metrics(accuracy)
    assert m["MFT"] == pytest.approx((90 + 80 + 100) / 3)  # 90
    assert m["MFN"] == pytest.approx((50 + 60 + 100) / 3)  # 70
    # stage means: 90, 75, 70 -> 235 / 3
    assert m["MAA"] == pytest.approx(235 / 3)
    # (50 - 90 + 60 - 80) / 3 = -20 (divided by T = 3, not T - 1 = 2)
    assert m["BWT"] == pytest.approx(-20)
    assert m["BWT"] == pytest.approx(m["MFN"] - m["MFT"])
    assert bwt_over_earlier_tasks(accuracy) == pytest.approx(-30)


def test_values_above_the_diagonal_are_ignored():
    with_values = [[90, 11, 12], [70, 80, 13], [50, 60, 100]]
    without = [[90, None, None], [70, 80, None], [50, 60, 100]]
    assert continual_metrics(with_values) == continual_metrics(without)


def test_partial_run_uses_the_completed_stages():
    accuracy = [
        [90, None, None],
        [70, 80, None],
        [None, None, None],
    ]
    m = continual_metrics(accuracy)
    assert m["tasks_completed"] == 2
    assert m["tasks_total"] == 3
    assert m["partial"] is True
    assert m["MFT"] == pytest.approx(85)
    assert m["MFN"] == pytest.approx(75)
    assert m["MAA"] == pytest.approx((90 + 75) / 2)
    assert m["BWT"] == pytest.approx(-20 / 2)  # over the k = 2 completed stages


def test_one_stage_has_no_backward_transfer():
    m = continual_metrics([[42.0, None], [None, None]])
    assert m["MFT"] == m["MFN"] == m["MAA"] == 42.0
    assert m["BWT"] is None
    assert bwt_over_earlier_tasks([[42.0]]) is None
    assert m["tasks_completed"] == 1


@pytest.mark.parametrize(
    ("accuracy", "message"),
    [
        ([], "empty"),
        ([[1, 2], [3]], "square"),
        ([[1, 2, 3], [4, 5, 6]], "square"),
        ([[None, None], [None, None]], "no diagonal"),
        ([[90, None], [70, None]], r"diagonal entry \[1\]\[1\] is missing"),
        ([[90, None, None], [None, 80, None], [1, 2, 3]], r"entry \[1\]\[0\]"),
        ([[90, None], ["70", 80]], "must be a number"),
        ([[90, None], [math.nan, 80]], "not finite"),
        ("abc", "list of rows"),
    ],
)
def test_bad_matrices_have_clear_errors(accuracy, message):
    with pytest.raises(ValueError, match=message):
        continual_metrics(accuracy)


def test_completed_stages_counts_leading_rows():
    assert completed_stages([[1, None, None], [2, 3, None], [None, None, None]]) == 2


def test_numpy_matrix_is_accepted():
    import numpy as np

    m = continual_metrics(np.array([[80.0, 0.0], [60.0, 90.0]]))
    assert m["BWT"] == pytest.approx(-10)
    assert m["MAA"] == pytest.approx(77.5)


def test_bwt_is_mfn_minus_mft_as_in_the_papers_table():
    """Official rule (the SEFE paper's table, docs/reference.md §4-5): BWT sums the T-1
    differences a[T][i] - a[i][i] of the earlier tasks and divides by T, so BWT = MFN - MFT
    on every row (SEFE: 58.57 - 69.02 = -10.45; dividing by T-1 would give -11.94)."""
    import random

    rng = random.Random(0)
    for n_tasks in (2, 3, 8):
        accuracy = [
            [rng.uniform(0, 100) if i <= t else None for i in range(n_tasks)]
            for t in range(n_tasks)
        ]
        m = continual_metrics(accuracy)
        assert m["BWT"] == pytest.approx(m["MFN"] - m["MFT"])
        old = bwt_over_earlier_tasks(accuracy)
        assert old == pytest.approx(m["BWT"] * n_tasks / (n_tasks - 1))
    # The paper's SEFE row: MFT 69.02, MFN 58.57 over T = 8 tasks.
    paper_sum = (58.57 - 69.02) * 8  # the sum of the 7 differences
    assert paper_sum / 8 == pytest.approx(-10.45)
    assert paper_sum / 7 == pytest.approx(-11.94, abs=0.005)
