"""Paired per-seed differences between two methods, with a 95 % t-interval of their mean.

Two runs with the same seed see the same generated data and the same test records, so the
difference of a metric between them cancels that part of the seed's luck (how well the
last task happens to be learnt moves MFN by several points on its own). Over n
seeds: the mean difference, its sample standard deviation s and the interval
mean ± t(0.975, n − 1) · s / √n.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from sefe_fast.run_results import format_number, markdown_table

# Two-sided 95 % quantiles t(0.975, df) of Student's t for df = 1 ... 30 (standard tables).
_T_975: tuple[float, ...] = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table for df ≤ 30, a Cornish–Fisher expansion (error < 1e-3) above."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class PairedDifference:
    """`metric(method) − metric(baseline)` on each shared seed, in percentage points."""

    method: str
    baseline: str
    metric: str
    per_seed: tuple[tuple[int, float], ...]
    mean: float
    std: float | None  # sample std; None with one seed
    interval: tuple[float, float] | None  # 95 % t-interval of the mean; None with one seed


def paired_difference(
    values: Mapping[int, float],
    baseline_values: Mapping[int, float],
    *,
    method: str,
    baseline: str,
    metric: str,
) -> PairedDifference | None:
    """The paired difference over the seeds both mappings hold (seed → value); None if none."""
    seeds = sorted(set(values) & set(baseline_values))
    if not seeds:
        return None
    diffs = [values[seed] - baseline_values[seed] for seed in seeds]
    mean = statistics.fmean(diffs)
    std = interval = None
    if len(diffs) > 1:
        std = statistics.stdev(diffs)
        half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        interval = (mean - half, mean + half)
    return PairedDifference(method, baseline, metric, tuple(zip(seeds, diffs)), mean, std, interval)


def _seed_values(runs: Mapping[int, Mapping[str, float | None]], metric: str) -> dict[int, float]:
    """seed → the metric's value, for the seeds whose value is present."""
    return {seed: value for seed, values in runs.items() if (value := values[metric]) is not None}


def paired_differences(
    by_method: Mapping[str, Mapping[int, Mapping[str, float | None]]],
    baseline: str,
    metrics: Sequence[str] = ("MFN", "BWT", "MFT", "MAA"),
) -> list[PairedDifference]:
    """Every other method against `baseline`, metric by metric, over their shared seeds.

    `by_method[method][seed][metric]` holds a run's value (percent); missing values (None)
    leave that seed out of that metric's pairing.
    """
    if baseline not in by_method:
        raise ValueError(f"baseline method {baseline!r} has no runs among {sorted(by_method)}")
    results = []
    for method, runs in by_method.items():
        if method == baseline:
            continue
        for metric in metrics:
            difference = paired_difference(
                _seed_values(runs, metric),
                _seed_values(by_method[baseline], metric),
                method=method,
                baseline=baseline,
                metric=metric,
            )
            if difference is not None:
                results.append(difference)
    return results


def _signed(value: float) -> str:
    """One decimal with an explicit sign (typographic minus), as RESULTS.md writes differences."""
    text = format_number(abs(value), 1)
    return f"−{text}" if value < 0 and text != "0.0" else f"+{text}"


def paired_markdown(differences: Sequence[PairedDifference]) -> str:
    """A Markdown table: difference, per-seed values, mean, std, 95 % interval (points)."""
    rows = []
    for d in differences:
        per_seed = " / ".join(f"{_signed(v)} (s{seed})" for seed, v in d.per_seed)
        interval = (
            "–" if d.interval is None else f"{_signed(d.interval[0])} … {_signed(d.interval[1])}"
        )
        std = "–" if d.std is None else format_number(d.std, 1)
        label = f"{d.metric}({d.method}) − {d.metric}({d.baseline})"
        rows.append([label, per_seed, _signed(d.mean), std, interval])
    header = ("difference", "per seed", "mean", "std", "95 % interval of the mean")
    return markdown_table(header, rows) + "\n"
