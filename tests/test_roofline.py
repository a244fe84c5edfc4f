"""The modelled roofline (sefe_fast.roofline): its counts follow the documented formulas."""

from __future__ import annotations

import math

import pytest
import torch

from sefe_fast import kernel_report, roofline

ENTRIES_4096 = 4096 * 4096 * 128  # the q/k/v/o group


def _by_kernel(costs, shape="4096×4096 ×128"):
    return {c.kernel: c for c in costs if c.shape == shape}


def test_mask_fractions_are_the_binomial_ones():
    f = roofline.mask_fractions(0.02, 7)
    assert f["n"] == pytest.approx(0.14)
    assert f["unique"] == pytest.approx(1 - 0.98**7)
    assert f["multi"] == pytest.approx(1 - 0.98**7 - 7 * 0.02 * 0.98**6)
    assert f["above15"] == 0.0 and roofline.mask_fractions(0.02, 1)["multi"] == 0.0
    at_most_3 = sum(math.comb(7, c) * 0.02**c * 0.98 ** (7 - c) for c in range(4))
    assert f["above3"] == pytest.approx(1 - at_most_3)
    assert roofline.mask_fractions(0.02, 3)["above3"] == 0.0


def test_gather_official_and_tile_counts():
    gather = _by_kernel(roofline.step_costs(7, "gather", torch.float32))
    unique = (1 - 0.98**7) * ENTRIES_4096
    assert gather["gather fwd"].flops == pytest.approx(2 * unique * 128)
    # fp32 factors: each position pulls a 512-byte factor row through L2
    fwd = gather["gather fwd"]
    assert fwd.l2_bytes == pytest.approx(fwd.hbm_bytes + unique * 512)
    official = _by_kernel(roofline.step_costs(7, "official fp32", torch.float32))
    assert official["official fp32"].flops == pytest.approx(8 * ENTRIES_4096 * 128)
    assert official["official fp32"].rate == "fp32"
    tf32 = _by_kernel(roofline.step_costs(7, "official tf32", torch.float32))
    assert tf32["official tf32"].rate == "tf32"
    tile = _by_kernel(roofline.step_costs(7, "tile", torch.float32, bits=4))
    assert set(tile) == {"tile fwd+grad_B", "tile grad_A"}  # no position above 15 after 7 tasks
    flops = sum(tile[f"tile {n}"].flops for n in ("fwd+grad_B", "grad_A"))
    assert flops == pytest.approx(8 * ENTRIES_4096 * 128)  # (2 + 2) + (2 + 2) k·d·r
    # The row owner reads its B block once and A once per row block; it writes dB in fp32.
    row = tile["tile fwd+grad_B"]
    row_m, _ = roofline.tile_blocks()["fwd+grad_B"]
    b_bytes = a_bytes = 4096 * 128 * 4 * 128
    assert row.l2_bytes == pytest.approx(
        b_bytes + a_bytes * math.ceil(4096 / row_m) + ENTRIES_4096 * 4 / 8 + b_bytes
    )
    assert row.alu_ops == roofline.DECODE_OPS * ENTRIES_4096
    # The column owner reads its A block once and B once per column block, writes dA and
    # scales the saved dB (fp32 read, fp32 write).
    col = tile["tile grad_A"]
    _, col_n = roofline.tile_blocks()["grad_A"]
    assert col.l2_bytes == pytest.approx(
        a_bytes + b_bytes * math.ceil(4096 / col_n) + ENTRIES_4096 / 2 + a_bytes + 2 * b_bytes
    )
    bits1 = _by_kernel(roofline.step_costs(7, "tile", torch.float32, bits=1))
    multi = roofline.mask_fractions(0.02, 7)["multi"] * ENTRIES_4096
    assert bits1["tile extra fwd"].flops == pytest.approx(2 * multi * 128)
    # tf32x3 triples the tensor work; bf16 factors run at the bf16 rate
    x3 = _by_kernel(roofline.step_costs(7, "tile", torch.float32, bits=4, input_precision="tf32x3"))
    assert x3["tile fwd+grad_B"].flops == pytest.approx(3 * row.flops)
    bf16 = _by_kernel(roofline.step_costs(7, "tile", torch.bfloat16, bits=4))
    assert bf16["tile fwd+grad_B"].rate == "bf16"
    # Ranks above 128: ΔW re-formed once per rank chunk in each owner.
    wide = _by_kernel(roofline.tile_costs(4096, 4096, 1, 256, 4, 4), "4096×4096 ×1")
    assert wide["tile grad_A"].flops == pytest.approx((2 * 2 + 2) * 4096 * 4096 * 256)


def test_tile_blocks_follow_the_kernels_configs(monkeypatch):
    from sefe_fast_kernels import reglora_tile

    monkeypatch.setattr(reglora_tile, "FWD_CONFIGS_CUDA", [({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 1)])
    monkeypatch.setattr(
        reglora_tile,
        "ROW_OWNER_CONFIGS_CUDA",
        [({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 1), ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 1)],
    )
    monkeypatch.setattr(
        reglora_tile,
        "COL_OWNER_CONFIGS_CUDA",
        [({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 1), ({"BLOCK_M": 32, "BLOCK_N": 128}, 4, 1)],
    )
    assert roofline.tile_blocks() == {
        "fwd": (64, 128),
        "fwd+grad_B": (64, 32),  # the largest BLOCK_M: A re-read once per row block
        "grad_A": (32, 128),  # the largest BLOCK_N: B re-read once per column block
    }
    tile = _by_kernel(roofline.step_costs(7, "tile", torch.float32, bits=4))
    factor = 4096 * 128 * 4 * 128
    row = tile["tile fwd+grad_B"]
    assert row.l2_bytes == pytest.approx(factor + factor * 4096 // 64 + ENTRIES_4096 / 2 + factor)


def test_reported_time_is_the_binding_bound():
    for kernel in ("official fp32", "gather", "tile"):
        for cost in roofline.step_costs(3, kernel, torch.float32):
            for gpu in roofline.GPUS:
                bound, seconds = cost.time(gpu)
                assert seconds == max(cost.bounds(gpu).values())
                assert cost.bounds(gpu)[bound] == seconds


def test_crossover_splits_the_choice():
    for gpu in roofline.GPUS:
        crossover = roofline.crossover_density(4096, 4096, 128, torch.float32, gpu.name)
        assert 0.001 < crossover < 0.1
        choose = roofline.preferred_kernel
        assert choose(4096, 4096, 128, crossover * 0.9, torch.float32, gpu.name) == "gather"
        assert choose(4096, 4096, 128, crossover * 1.1, torch.float32, gpu.name) == "tile"
        # a long extra list makes the tile representation slower
        assert choose(4096, 4096, 128, 0.05, torch.float32, gpu.name, 0.05) == "gather"
    with pytest.raises(ValueError, match="unknown GPU"):
        roofline.gpu_named("V100")


def test_summary_speedups_and_clis(capsys):
    rows = roofline.summary(torch.float32, tasks=(1, 7))
    assert {(r["prior_tasks"], r["gpu"]) for r in rows} == {
        (p, g.name) for p in (1, 7) for g in roofline.GPUS
    }
    for r in rows:
        assert r["speedup tile 4-bit"] == pytest.approx(r["official fp32 ms"] / r["tile 4-bit ms"])
        assert r["tile 1-bit no overlap ms"] <= r["tile 1-bit ms"]
        # the dispatch picks the faster of gather and tile (one shape group's choice each)
        assert r["auto ms"] == pytest.approx(min(r["gather ms"], r["tile 1-bit ms"]), rel=1e-9)
        assert r["official tf32 ms"] < r["official fp32 ms"]
    assert roofline.main([]) == 0
    assert "official fp32" in capsys.readouterr().out
    assert kernel_report.main(["--roofline"]) == 0
    out = capsys.readouterr().out
    assert "MODELLED" in out and "bf16 factors" in out and "fp32 factors" in out


def test_budget_policy_rows_respect_the_budget_and_are_monotone():
    h100 = roofline.gpu_named("H100-SXM5")
    previous = None
    for budget_gb in (0.5, 1.0, 1.5, 2.0, 3.5):
        chosen = roofline.budget_step(7, torch.float32, h100, budget_gb)
        picks = chosen["picks"]
        assert sum(n for by_bits in picks.values() for n in by_bits.values()) == 224
        if budget_gb >= 1.5:  # the smallest forms (1-bit + list) take ≈ 1.28 GB
            assert chosen["nbytes"] <= budget_gb * 1e9
        if previous is not None:
            assert chosen["seconds"] <= previous["seconds"]
        previous = chosen
    tight = roofline.budget_step(7, torch.float32, h100, 0.5)
    assert all(set(by_bits) == {1} for by_bits in tight["picks"].values())
    loose = roofline.budget_step(7, torch.float32, h100, 3.5)
    # every matrix at its modelled-fastest plane: the time of the best single plane or less
    best_single = min(
        roofline.step_time(roofline.step_costs(7, "tile", torch.float32, bits=b), h100)
        for b in (1, 2, 4)
    )
    assert loose["seconds"] <= best_single * (1 + 1e-9)
    assert tight["seconds"] > loose["seconds"]
    rows = roofline.summary(torch.float32, tasks=(7,))
    for r in rows:
        assert r["budget GB"] <= 1.5
        assert r["speedup budget"] == pytest.approx(r["official fp32 ms"] / r["budget ms"])


def test_budget_rows_meet_the_five_times_goal_at_every_task_count():
    # Issue 17's goal, on the model: fp32 factors, A100 and H100, p = 1…7, within 1.5 GB.
    for r in roofline.summary(torch.float32):
        assert r["budget GB"] <= 1.5
        assert r["speedup budget"] >= 5.0, (r["prior_tasks"], r["gpu"], r["budget picks"])


def test_trit_plane_terms():
    # 20 counts per int32 word (the last one padded), the base-3 decode's instructions, and
    # the list of counts above 2.
    k, d = 4096, 4096
    costs = roofline.tile_costs(k, d, 1, 128, 3, 4)
    binary = roofline.tile_costs(k, d, 1, 128, 2, 4)
    plane = 4 * k * -(-d // 20)
    for trit, two_bit in zip(costs, binary):
        assert trit.hbm_bytes - two_bit.hbm_bytes == plane - 4 * k * (d // 16)
        assert trit.alu_ops == roofline.DECODE_OPS_TRIT * k * d
    assert roofline.LISTED_FRACTION[3] == "above2"
    f = roofline.mask_fractions(0.02, 7)
    assert f["above3"] < f["above2"] < f["multi"]
    assert roofline.modelled_mask_nbytes(k, d, 3, 0.0) == plane
