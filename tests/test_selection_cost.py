"""bench/selection_cost.py: the GPU model of whole-model selection adds up as documented."""

from __future__ import annotations

import pytest

from bench import selection_cost
from sefe_fast.roofline import LLAVA_7B_SHAPES


def test_model_counts_flops_tiles_and_syncs_of_the_llava_7b_matrices():
    rows = selection_cost.model()
    assert {row["gpu"] for row in rows} == {"A100-SXM4", "H100-SXM5"}
    flop = 2 * 128 * sum(k * d * count for k, d, count in LLAVA_7B_SHAPES)
    assert flop == pytest.approx(1.658e12, rel=1e-3)
    for row in rows:
        assert row["flop_per_pass"] == flop
        # 2 MiB row tiles: 32 per 4096×4096, 86 per 11008×4096, 88 per 4096×11008
        assert row["torch_tiles"] == 128 * 32 + 64 * 86 + 32 * 88
        assert row["host_syncs_triton"] == 2 * 224
        assert row["host_syncs_torch"] == row["torch_tiles"] * selection_cost.TORCH_SYNCS_PER_TILE
        assert row["triton_total_s"] < 1.0 < row["torch_total_s"]
