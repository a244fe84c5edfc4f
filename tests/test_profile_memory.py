"""Tests of the RegLoRA memory profiler (sefe_fast.bench.profile_memory) on small shapes."""

from __future__ import annotations

import json

import pytest
import torch

from sefe_fast.bench.lora_shapes import SPECS, parse_layout
from sefe_fast.bench.measuring import SavedTensorBytes
from sefe_fast.bench.profile_memory import (
    ROW_KEYS,
    PenaltyMemory,
    aggregate_peak,
    budget_resident,
    measure_penalty_memory,
    profile,
    vanilla_mask_bytes,
)
from sefe_fast.bench.profile_report import main
from sefe_fast.bench.workloads import TASK_SEED_BASE, random_lora, task_selection
from sefe_fast.reglora import merge_key_elements, select_key_elements

LAYOUT = "a=48x40:3,b=40x96:2"
RANK = 4
RATIO = 0.02


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory):
    spec = parse_layout(LAYOUT)
    cache = tmp_path_factory.mktemp("selections")
    rows, details = profile(spec, rank=RANK, ratio=RATIO, tasks=3, cache_dir=cache, progress=False)
    return spec, rows, details


def test_llava_7b_vanilla_masks_after_seven_tasks_are_14_5_gb():
    per_task = 128 * int(0.02 * 4096 * 4096) + 96 * int(0.02 * 11008 * 4096)
    assert per_task == 129_520_032
    assert vanilla_mask_bytes(SPECS["llava-7b"], 0.02, 7) == 16 * per_task * 7
    assert vanilla_mask_bytes(SPECS["llava-7b"], 0.02, 7) == pytest.approx(14.5e9, rel=0.01)
    assert SPECS["llava-7b"].num_matrices == 224
    assert SPECS["llava-13b"].shape_counts() == {
        (5120, 5120): 160,
        (13824, 5120): 80,
        (5120, 13824): 40,
    }


def test_rows_have_exact_vanilla_and_real_sefe_fast_mask_bytes(small_profile):
    _, rows, _ = small_profile
    assert [r["prior_tasks"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        p = row["prior_tasks"]
        # 16 bytes × Σ int(ratio·k·d) × tasks, from the layout, independently of the code
        entries = 3 * int(RATIO * 48 * 40) + 2 * int(RATIO * 40 * 96)
        assert row["vanilla_mask_bytes"] == 16 * entries * p
        assert row["positions"] == entries * p
        # the sum of real KeyElements.nbytes of fresh selections (no cache) per shape and task
        expected = 0
        for k, d, count in ((48, 40, 3), (40, 96, 2)):
            for t in range(p):
                ke = select_key_elements(*random_lora(k, d, RANK, TASK_SEED_BASE + t), RATIO)
                expected += count * ke.nbytes
        assert row["sefe_fast_mask_bytes"] == expected
    assert all(rows[0][key] == 0 for key in ROW_KEYS)  # the first task holds nothing
    assert rows[2]["vanilla_peak_bytes"] > 0 and rows[2]["sefe_fast_peak_bytes"] > 0


def test_rows_aggregate_the_per_shape_measurements(small_profile):
    _, rows, details = small_profile
    for row in rows[1:]:
        measured = [m for m in details if m.prior_tasks == row["prior_tasks"]]
        assert len(measured) == 2
        saved = sum(m.count * m.vanilla.saved_bytes for m in measured)
        transient = max(m.vanilla.peak_bytes - m.vanilla.saved_bytes for m in measured)
        assert row["vanilla_saved_bytes"] == saved
        assert row["vanilla_peak_bytes"] == saved + transient


def test_aggregate_peak_is_saved_sum_plus_largest_transient():
    per_shape = [
        (2, PenaltyMemory(peak_bytes=10, saved_bytes=3)),
        (1, PenaltyMemory(peak_bytes=20, saved_bytes=1)),
    ]
    assert aggregate_peak(per_shape) == 2 * 3 + 1 + max(10 - 3, 20 - 1)
    assert aggregate_peak([]) == 0


def _masks(k, d, tasks):
    return merge_key_elements(
        [
            select_key_elements(*random_lora(k, d, RANK, TASK_SEED_BASE + t), RATIO)
            for t in range(tasks)
        ]
    )


def test_measured_peak_grows_with_matrix_size_and_vanilla_holds_the_dense_product():
    peaks = {}
    for size in (64, 256):
        ke = _masks(size, size, 2)
        lora_B, lora_A = random_lora(size, size, RANK, seed=1)
        vanilla = measure_penalty_memory(lora_B, lora_A, ke, "vanilla")
        fast = measure_penalty_memory(lora_B, lora_A, ke, "sefe_fast")
        peaks[size] = (vanilla, fast)
        assert vanilla.peak_bytes >= 4 * size * size  # the fp32 k×d product
        # abs() saves the gathered fp32 values: 4 bytes per position
        assert vanilla.saved_bytes >= 4 * len(ke)
    assert peaks[256][0].peak_bytes > peaks[64][0].peak_bytes
    assert peaks[256][1].peak_bytes > peaks[64][1].peak_bytes


def test_sefe_fast_never_allocates_the_dense_product():
    size = 768
    ke = _masks(size, size, 1)
    lora_B, lora_A = random_lora(size, size, RANK, seed=1)
    fast = measure_penalty_memory(lora_B, lora_A, ke, "sefe_fast")
    assert 0 < fast.peak_bytes < 4 * size * size // 4
    assert fast.saved_bytes <= ke.plan().num_unique  # at most a byte per unique position


def test_saved_tensor_bytes_counts_new_storages_once_and_skips_existing():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorBytes([x]) as counter:
        y = x.exp()  # saves its result (new, 400 bytes)
        z = (y * y).sum()  # saves y twice: counted once
    assert counter.bytes == 400 and counter.count == 1
    with SavedTensorBytes([]) as counter_all:
        (x * x).sum()  # saves x (existing unless excluded): 400 bytes
    assert counter_all.bytes == 400
    z.backward()


def test_task_selection_cache_round_trip_and_bad_file(tmp_path, capsys):
    first = task_selection(40, 48, RANK, RATIO, 0, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    again = task_selection(40, 48, RANK, RATIO, 0, tmp_path)
    assert torch.equal(first.linear(), again.linear())
    files[0].write_bytes(b"not a safetensors file")
    recomputed = task_selection(40, 48, RANK, RATIO, 0, tmp_path)
    assert torch.equal(first.linear(), recomputed.linear())
    assert "recomputing a bad cache file" in capsys.readouterr().err


def test_parse_layout_and_its_errors():
    spec = parse_layout("q=64x32:4, 32x64:2")
    assert spec.shape_counts() == {(64, 32): 4, (32, 64): 2}
    assert spec.groups[0].names == "q" and spec.num_matrices == 6
    with pytest.raises(ValueError, match=r"entry 1 '64by32:2'"):
        parse_layout("64x32:1,64by32:2")
    with pytest.raises(ValueError, match="positive"):
        parse_layout("0x32:1")


def test_cli_json_rows_and_plot(tmp_path, capsys):
    threads = torch.get_num_threads()
    plot = tmp_path / "memory.png"
    code = main(
        [
            "--layout",
            LAYOUT,
            "--rank",
            str(RANK),
            "--tasks",
            "2",
            "--json",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prior_tasks"] for r in rows] == [0, 1]
    for key in (
        "prior_tasks",
        "vanilla_mask_bytes",
        "sefe_fast_mask_bytes",
        "vanilla_peak_bytes",
        "sefe_fast_peak_bytes",
        "vanilla_saved_bytes",
        "sefe_fast_saved_bytes",
    ):
        assert all(key in r for r in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.get_num_threads() == threads  # --threads (default 1) is undone on return


def test_cli_table_and_bad_layout(tmp_path, capsys):
    assert (
        main(
            ["--layout", LAYOUT, "--rank", str(RANK), "--tasks", "2", "--cache-dir", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "modelled" in out and "| 1 |" in out
    with pytest.raises(SystemExit):
        main(["--layout", "12x:3", "--no-cache"])
    assert "expected KxD:COUNT" in capsys.readouterr().err


def test_gpu_resident_bytes_are_the_real_device_tensors(small_profile):
    """gpu_resident_bytes: exactly the device_nbytes of the whole model's RegLoRA (every
    matrix of every shape, the planes chosen under the budget together) on the triton
    backend; never more than the official masks."""
    from sefe_fast.reglora import RegLoRA

    spec, rows, details = small_profile
    for p in (1, 2):
        merged = {
            (k, d): merge_key_elements([task_selection(k, d, RANK, RATIO, t) for t in range(p)])
            for k, d, _ in ((48, 40, 3), (40, 96, 2))
        }
        masks = {
            f"{k}x{d}.{i}": merged[(k, d)]
            for (k, d), count in spec.shape_counts().items()
            for i in range(count)
        }
        reg = RegLoRA(masks, backend="triton")
        reg.device_groups("cpu", RANK, torch.float32, "triton")
        assert rows[p]["gpu_resident_bytes"] == reg.device_nbytes() > 0
        assert rows[p]["gpu_resident_bytes"] <= rows[p]["vanilla_mask_bytes"]
        assert rows[p]["gpu_budget_bytes"] == 1_500_000_000
    kinds = {"gather", "1-bit", "2-bit", "trit", "4-bit"}
    assert all(set(m.gpu_representation.split("+")) <= kinds for m in details)


def test_a_tight_budget_gives_the_smallest_planes_and_is_measured():
    shapes = {(48, 40): 3, (40, 96): 2}
    masks = {
        (k, d): (merge_key_elements([task_selection(k, d, RANK, RATIO, t) for t in range(4)]), n)
        for (k, d), n in shapes.items()
    }
    tight = budget_resident(masks, RANK, torch.float32, None, 1e-9)
    loose = budget_resident(masks, RANK, torch.float32, None, 1.5)
    assert sum(b for b, _ in tight.values()) <= sum(b for b, _ in loose.values())
    for shape, (_, by_bits) in tight.items():
        assert sum(by_bits.values()) == shapes[shape]
