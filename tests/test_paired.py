"""Paired per-seed differences and their 95 % t-intervals, worked by hand."""

import math

import pytest

from sefe_fast.paired import (
    paired_difference,
    paired_differences,
    paired_markdown,
    t_quantile_975,
)


def t_upper_half_mass(q: float, df: int, intervals: int = 4000) -> float:
    """P(0 < T < q) for Student's t with df degrees of freedom: Simpson's rule on its density."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = q / intervals
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return h / 3 * (density(0.0) + inner + density(q))


def reference_quantile_975(df: int) -> float:
    low, high = 0.0, 20.0
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if t_upper_half_mass(mid, df) < 0.475 else (low, mid)
    return (low + high) / 2


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12, 30, 31, 45, 120])
def test_t_quantiles_match_the_t_distribution(df):
    assert t_quantile_975(df) == pytest.approx(reference_quantile_975(df), abs=1e-3)


def test_t_quantile_needs_a_degree_of_freedom():
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile_975(0)


def test_difference_uses_shared_seeds_only():
    # Diffs on seeds 0, 1, 2: 2, 4, 0 -> mean 2, sample std 2, half-width t(2) * 2 / sqrt(3).
    d = paired_difference(
        {0: 10.0, 1: 14.0, 2: 12.0},
        {0: 8.0, 1: 10.0, 2: 12.0, 3: 99.0},
        method="sefe",
        baseline="lora",
        metric="MFN",
    )
    assert d.per_seed == ((0, 2.0), (1, 4.0), (2, 0.0))
    assert d.mean == pytest.approx(2.0)
    assert d.std == pytest.approx(2.0)
    half = 4.303 * 2.0 / math.sqrt(3)
    assert d.interval == pytest.approx((2.0 - half, 2.0 + half))
    one = paired_difference({5: 1.0}, {5: 3.0}, method="a", baseline="b", metric="MFN")
    assert (one.mean, one.std, one.interval) == (-2.0, None, None)
    assert paired_difference({1: 1.0}, {2: 1.0}, method="a", baseline="b", metric="MFN") is None


def test_reproduces_the_five_seed_interval_in_results_md():
    # RESULTS.md: MFN(sefe) - MFN(lora) per seed +1.0 / +7.5 / +6.9 / +4.0 / +8.8,
    # mean +5.6, std 3.1, 95 % interval +1.8 ... +9.5 (t4 = 2.776).
    lora = {s: {"MFN": 0.0} for s in range(5)}
    sefe = {s: {"MFN": v} for s, v in enumerate((1.0, 7.5, 6.9, 4.0, 8.8))}
    (d,) = paired_differences({"lora": lora, "sefe": sefe}, "lora", metrics=("MFN",))
    assert round(d.mean, 1) == 5.6 and round(d.std, 1) == 3.1
    assert [round(v, 1) for v in d.interval] == [1.8, 9.5]
    table = paired_markdown([d])
    assert "| MFN(sefe) − MFN(lora) | +1.0 (s0) / +7.5 (s1)" in table
    assert "| +5.6 | 3.1 | +1.8 … +9.5 |" in table


def test_missing_values_leave_the_seed_out_and_unknown_baseline_is_refused():
    lora = {0: {"MFN": 10.0}, 1: {"MFN": 20.0}}
    sefe = {0: {"MFN": None}, 1: {"MFN": 25.0}}
    (d,) = paired_differences({"lora": lora, "sefe": sefe}, "lora", metrics=("MFN",))
    assert d.per_seed == ((1, 5.0),)
    assert "−" in paired_markdown(
        paired_differences({"lora": lora, "x": {0: {"MFN": 4.0}}}, "lora", metrics=("MFN",))
    )
    with pytest.raises(ValueError, match="baseline method 'olora'"):
        paired_differences({"lora": lora}, "olora")
