"""Tests of bench.summarize on a synthetic pytest-benchmark JSON (no timing involved).

They are plain tests: `pytest bench/ --benchmark-only` skips them; `pytest
bench/test_summarize.py` runs them (a few seconds).
"""

from __future__ import annotations

import json

import pytest

from bench.summarize import BenchJsonError, load_cases, main, pair_cases, ratios, summarize


def _bench(group, side, min_s, peak, mask, **extra):
    info = {"kind": "penalty", "side": side, "device": "cpu", "k": 64, "d": 32, "rank": 4}
    info.update(prior_tasks=3, peak_extra_bytes=peak, mask_bytes=mask, **extra)
    return {
        "group": group,
        "name": f"test[{side}]",
        "fullname": f"bench/test.py::test[{group}-{side}]",
        "extra_info": info,
        "stats": {"min": min_s, "median": min_s * 1.5, "rounds": 3},
    }


def _write(tmp_path, benchmarks):
    path = tmp_path / "bench.json"
    machine = {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11"}
    path.write_text(json.dumps({"machine_info": machine, "benchmarks": benchmarks}))
    return path


def test_ratios_table_and_plot(tmp_path):
    path = _write(
        tmp_path,
        [
            _bench("g1", "vanilla", 2.0, 8_000_000, 1_600_000, torch_threads=1),
            _bench("g1", "sefe_fast", 0.5, 1_000_000, 100_000),
            _bench("g2", "vanilla", 1.0, 4_000_000, 1_600_000),  # its fast side was skipped
        ],
    )
    cases, machine = load_cases(path)
    assert machine["cpu"]["count"] == 2
    pairs = pair_cases(cases)
    assert [g for g, _ in pairs] == ["g1", "g2"]
    r = ratios(pairs[0][1])
    assert r == {"speedup": 4.0, "peak_ratio": 8.0, "mask_ratio": 16.0}
    assert ratios(pairs[1][1])["speedup"] is None

    written = summarize(path, tmp_path / "out")
    text = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "Test CPU, 2 logical CPUs" in text and "torch intra-op threads: 1." in text
    assert "| 64×32 r=4 t=3 | 2.0000 (3.0000) | 0.5000 (0.7500) | 4.00× | 8.0 | 1.0 | 8.00× |" in (
        text
    )
    assert "| 64×32 r=4 t=3 | 1.0000 (1.5000) | - | - |" in text
    png = tmp_path / "out" / "bench_penalty.png"
    assert png in written and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_are_named(tmp_path, capsys):
    bad = _bench("g", "vanilla", 1.0, 1, 1)
    del bad["extra_info"]["mask_bytes"]
    path = _write(tmp_path, [bad])
    with pytest.raises(
        BenchJsonError, match=r"test\[g-vanilla\] lacks extra_info \['mask_bytes'\]"
    ):
        load_cases(path)
    twice = _write(tmp_path, [_bench("g", "vanilla", 1, 1, 1), _bench("g", "vanilla", 1, 1, 1)])
    with pytest.raises(BenchJsonError, match="two vanilla cases"):
        pair_cases(load_cases(twice)[0])
    (tmp_path / "junk.json").write_text("{")
    assert main([str(tmp_path / "junk.json"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read benchmark JSON" in capsys.readouterr().err
