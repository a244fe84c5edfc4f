"""Continual-learning metrics from the accuracy matrix (docs/reference.md §4).

`accuracy[t][i]` is the accuracy (percent) on task i after training task t, both
0-based here; T tasks. Entries above the diagonal (tasks not yet trained) may be None
and are ignored.

- MFT = mean_i a[i][i]                       (mean fine-tuned accuracy)
- MFN = mean_i a[T-1][i]                     (mean final accuracy)
- MAA = mean_t ( mean_{i<=t} a[t][i] )       (mean average accuracy over stages)
- BWT = (1/T) * sum_{i<T-1} ( a[T-1][i] - a[i][i] )
                                             (backward transfer; None when T = 1,
                                              where no earlier task exists)

BWT sums the T-1 differences of the earlier tasks but divides by T, as the paper's table
is computed: then BWT = MFN - MFT exactly (the last task's own difference is zero), which
every row of the paper's table satisfies (SEFE: 58.57 - 69.02 = -10.45; dividing by T-1
would give -11.94). Versions of sefe_fast before this change divided by T-1
(`bwt_over_earlier_tasks` keeps that figure for comparison with old reports).

A run stopped after stage k < T leaves rows k..T-1 empty (all None): the metrics are
then computed over the first k tasks as if T = k, and the result says so
(`tasks_completed` = k, `tasks_total` = T, `partial` = True).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

MatrixInput = Sequence[Sequence[float | int | None]]


def _check_entry(value: Any, row: int, col: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"accuracy matrix entry [{row}][{col}] must be a number (percent), got {value!r}"
        )
    if not math.isfinite(value):
        raise ValueError(f"accuracy matrix entry [{row}][{col}] is not finite: {value!r}")
    return float(value)


def _as_rows(accuracy: Any) -> Any:
    # A numpy array (or tensor) becomes nested lists; everything else is checked as given.
    return accuracy.tolist() if hasattr(accuracy, "tolist") else accuracy


def _validate_square(accuracy: MatrixInput) -> int:
    if isinstance(accuracy, str | bytes) or not isinstance(accuracy, Sequence):
        raise ValueError(f"accuracy matrix must be a list of rows, got {type(accuracy).__name__}")
    n_rows = len(accuracy)
    if n_rows == 0:
        raise ValueError("accuracy matrix is empty: no task was evaluated")
    for t, row in enumerate(accuracy):
        if isinstance(row, str | bytes) or not isinstance(row, Sequence):
            raise ValueError(f"accuracy matrix row {t} is not a list: {row!r}")
        if len(row) != n_rows:
            raise ValueError(
                f"accuracy matrix must be square (T x T, T = {n_rows} rows), "
                f"but row {t} has {len(row)} entries"
            )
    return n_rows


def completed_stages(accuracy: MatrixInput) -> int:
    """How many leading stages are complete (diagonal and everything left of it filled).

    Rows after the last complete one must be empty on and below the diagonal; a row with
    values but no diagonal entry, or a complete row with a gap, is a ValueError.
    """
    accuracy = _as_rows(accuracy)
    n_tasks = _validate_square(accuracy)
    n_done = 0
    while n_done < n_tasks and accuracy[n_done][n_done] is not None:
        n_done += 1
    for t in range(n_done, n_tasks):
        filled = [i for i in range(t + 1) if accuracy[t][i] is not None]
        if filled:
            raise ValueError(
                f"accuracy matrix row {t} has entries at columns {filled} but its diagonal "
                f"entry [{t}][{t}] is missing (None)"
            )
    if n_done == 0:
        raise ValueError("accuracy matrix has no diagonal entry: no stage was completed")
    for t in range(n_done):
        for i in range(t + 1):
            if accuracy[t][i] is None:
                raise ValueError(
                    f"accuracy matrix entry [{t}][{i}] (task {i} after stage {t}) is missing"
                )
            _check_entry(accuracy[t][i], t, i)
    return n_done


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def continual_metrics(accuracy: MatrixInput) -> dict[str, Any]:
    """MFT, MFN, MAA, BWT (percent, like the inputs) of a T x T accuracy matrix.

    Also returns `tasks_completed` (k stages used), `tasks_total` (T) and `partial`
    (k < T). BWT (= MFN - MFT, divided by k as in the paper) is None when k = 1. Raises ValueError for ragged or non-square input,
    missing diagonal or lower-triangle entries, or non-numeric values.
    """
    accuracy = _as_rows(accuracy)
    n_tasks = _validate_square(accuracy)
    k = completed_stages(accuracy)
    a = [[float(accuracy[t][i]) for i in range(t + 1)] for t in range(k)]  # type: ignore[arg-type]
    final = a[k - 1]
    mft = _mean([a[i][i] for i in range(k)])
    mfn = _mean(final)
    maa = _mean([_mean(a[t]) for t in range(k)])
    # Sum over the k-1 earlier tasks divided by k (the paper's convention, see above).
    bwt = sum(final[i] - a[i][i] for i in range(k - 1)) / k if k > 1 else None
    return {
        "MFT": mft,
        "MFN": mfn,
        "MAA": maa,
        "BWT": bwt,
        "tasks_completed": k,
        "tasks_total": n_tasks,
        "partial": k < n_tasks,
    }


def bwt_over_earlier_tasks(accuracy: MatrixInput) -> float | None:
    """The BWT figure of sefe_fast before the paper's convention was adopted: the mean of
    the k-1 differences a[k-1][i] - a[i][i] (divided by k-1, not k), in percent.

    Equals `continual_metrics(accuracy)["BWT"] * k / (k - 1)`; None when k = 1. Kept only to
    relate older reports (RESULTS.md history) to the current figure.
    """
    accuracy = _as_rows(accuracy)
    k = completed_stages(accuracy)
    if k == 1:
        return None
    return _mean([float(accuracy[k - 1][i]) - float(accuracy[i][i]) for i in range(k - 1)])
