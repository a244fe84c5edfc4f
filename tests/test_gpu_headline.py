"""The GPU headline tables: modelled times from the roofline, bytes from profile_memory rows."""

from __future__ import annotations

import json

import torch

from sefe_fast import roofline
from sefe_fast.bench import gpu_headline


def fake_rows(scale: float) -> list[dict]:
    """profile_memory --json rows for p = 0…7 with recognisable byte counts."""
    return [
        {
            "prior_tasks": p,
            "vanilla_mask_bytes": int(2.07e9 * p),
            "gpu_resident_gather_bytes": int(1.1e9 * p * scale),
            "gpu_resident_bytes": int(0.2e9 * p * scale),
            "gpu_representation": f"4096x4096:{p}×trit",
        }
        for p in range(8)
    ]


def test_tables_carry_the_model_and_the_measured_bytes(tmp_path, capsys):
    measured = {"fp32": fake_rows(1.0), "bf16": fake_rows(0.5)}
    table = gpu_headline.headline_table(measured, (3,))
    h100 = {r["gpu"]: r for r in roofline.summary(torch.float32, tasks=(3,))}["H100-SXM5"]
    budget_line = next(line for line in table.splitlines() if "budget picks" in line)
    assert f"| {h100['budget ms']:,.1f} |" in budget_line
    assert "**0.600** measured, fp32 H100 picks; bf16 0.300" in budget_line
    gather_line = next(line for line in table.splitlines() if "gather kernels" in line)
    assert gather_line.endswith("| 3.300 |")
    official = next(line for line in table.splitlines() if "TF32 off" in line)
    assert "1.0× / 1.0×" in official and "6.21 (int64 pairs, computed)" in official
    picks = gpu_headline.picks_table(measured, (7,))
    assert "| 1.400 / 0.700 | 4096x4096:7×trit |" in picks
    fp32, bf16 = tmp_path / "fp32.json", tmp_path / "bf16.json"
    fp32.write_text(json.dumps(measured["fp32"]))
    bf16.write_text(json.dumps(measured["bf16"]))
    assert gpu_headline.main([str(fp32), str(bf16), "--tasks", "1"]) == 0
    assert "trit plane + list of counts > 2" in capsys.readouterr().out
