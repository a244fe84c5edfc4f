"""DeviceMask: packing, the streamed build against the plan, the representation choice,
the memory it holds and costs to build, and the regularizer's single device copy."""

from __future__ import annotations

import pytest
import torch

from sefe_fast.position_plan import MaskStats
from sefe_fast.reglora import KeyElements, PositionPlan, merge_key_elements
from sefe_fast.reglora import key_elements as key_elements_module
from sefe_fast.reglora.device_mask import (
    PLANE_BITS,
    PLANE_CAPS,
    TRIT_PLANE,
    DeviceMask,
    build_device_mask,
    build_plane,
    choose_bits,
    entries_per_word,
    mask_statistics,
    pack_counts,
    plan_nbytes_for,
    plane_nbytes,
    reference_mask_penalty,
    representation_nbytes,
    unpack_counts,
)
from sefe_fast.reglora.penalty import reference_penalty_from_indices

pytestmark = pytest.mark.usefixtures("one_thread")


def _contract_decode(plane: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """The decoding the kernels implement, written out from the contract (module docstring
    of sefe_fast/reglora/device_mask.py) one column at a time, in int64."""
    j = torch.arange(d)
    if bits == TRIT_PLANE:
        slot = j % 20
        byte = (plane[:, j // 20].long() >> (8 * (slot // 5))) & 255
        return torch.div(byte, 3 ** (slot % 5), rounding_mode="floor") % 3
    per_word = 32 // bits
    return (plane[:, j // per_word] >> (bits * (j % per_word))) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", PLANE_BITS)
@pytest.mark.parametrize("d", [1, 7, 8, 19, 20, 21, 31, 32, 33, 100])
def test_pack_unpack_round_trip_any_width(bits, d):
    gen = torch.Generator().manual_seed(d)
    per_word = entries_per_word(bits)
    counts = torch.randint(0, PLANE_CAPS[bits] + 1, (300, d), generator=gen, dtype=torch.uint8)
    counts[0] = PLANE_CAPS[bits]  # every field at its largest value, bit 31 included
    plane = pack_counts(counts, bits)
    assert plane.dtype == torch.int32 and plane.shape == (300, -(-d // per_word))
    assert torch.equal(unpack_counts(plane, bits, d), counts)
    assert torch.equal(_contract_decode(plane, bits, d).to(torch.uint8), counts)
    # columns past d in the last word are 0
    padded = _contract_decode(plane, bits, plane.shape[1] * per_word)
    assert int(padded[:, d:].abs().sum()) == 0


def test_trit_plane_takes_a_fifth_of_a_byte_per_entry():
    assert entries_per_word(TRIT_PLANE) == 20 and PLANE_CAPS[TRIT_PLANE] == 2
    # 4096 columns: 205 words per row, 1.6 bits per entry up to the last word's padding
    assert plane_nbytes((4096, 4096), TRIT_PLANE) == 4 * 4096 * 205
    assert plane_nbytes((100, 40), TRIT_PLANE) == 100 * 2 * 4


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit a 1-bit plane"):
        pack_counts(torch.full((2, 3), 2, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="uint8"):
        pack_counts(torch.zeros(2, 3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="plane bits must be one of"):
        pack_counts(torch.zeros(2, 3, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="does not fit a trit plane"):
        pack_counts(torch.full((2, 3), 3, dtype=torch.uint8), TRIT_PLANE)
    with pytest.raises(ValueError, match=r"int32 \[k, 1\]"):
        unpack_counts(torch.zeros(2, 2, dtype=torch.int32), 4, 5)


def _masks(shape, tasks, fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    k, d = shape
    return merge_key_elements(
        [
            KeyElements.from_linear(
                torch.randperm(k * d, generator=gen)[: int(fraction * k * d)], shape
            )
            for _ in range(tasks)
        ]
    )


def _cases():
    shape = (37, 45)
    every = KeyElements.from_linear(torch.arange(37 * 45), shape)
    heavy = merge_key_elements([KeyElements.from_linear(torch.tensor([0, 5, 1664]), shape)] * 17)
    return {
        "overlapping tasks": _masks(shape, 5, 0.3, 0),
        "duplicates within and across": merge_key_elements(
            [KeyElements.from_linear(torch.tensor([3, 3, 3, 40, 1664]), shape)] * 3
        ),
        "all positions, three times": merge_key_elements([every] * 3),
        "counts above 15": merge_key_elements([heavy, _masks(shape, 1, 0.1, 1)]),
        "empty": KeyElements.empty(shape),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("bits", [0, *PLANE_BITS])
def test_device_mask_gives_the_official_penalty_and_the_plans_counts(case, bits):
    ke = _cases()[case]
    mask = build_device_mask(ke, bits=bits)
    assert mask.bits == bits and mask.n_total == len(ke) and mask.shape == ke.shape
    dense = torch.zeros(ke.shape[0] * ke.shape[1], dtype=torch.int32)
    dense.index_add_(0, ke.linear(), torch.ones(len(ke), dtype=torch.int32))
    assert torch.equal(mask.dense_counts(), dense.reshape(ke.shape))
    if mask.extra is not None:  # the list holds exactly the excess over the plane
        assert int(mask.extra.counts.min()) >= 1
        assert mask.extra.n_total == len(ke)
    gen = torch.Generator().manual_seed(7)
    lora_B, lora_A = torch.randn(37, 6, generator=gen), torch.randn(6, 45, generator=gen)
    value = reference_mask_penalty(lora_B, lora_A, mask)
    if len(ke):
        expected = reference_penalty_from_indices(lora_B, lora_A, ke.indices())
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    else:
        assert value.item() == 0.0


@pytest.mark.parametrize("bits", PLANE_BITS)
def test_streamed_plane_equals_the_dense_reference_encoder(bits, monkeypatch):
    monkeypatch.setattr(key_elements_module, "DECODE_CHUNK", 5)  # many decode chunks
    ke = _cases()["counts above 15"]
    stats = mask_statistics(ke)
    for block in (1, 45 * 3, 1 << 20):  # one row, a few rows, the whole matrix per block
        plane = build_plane(ke.shape, lambda b=block: ke.unique_row_blocks(b), bits)
        dense = torch.zeros(37 * 45, dtype=torch.int64)
        dense.index_add_(0, ke.linear(), torch.ones(len(ke), dtype=torch.int64))
        capped = dense.clamp(max=PLANE_CAPS[bits]).reshape(37, 45).to(torch.uint8)
        assert torch.equal(plane, pack_counts(capped, bits))
    assert stats.max_count == int(dense.max()) >= 17
    assert stats.above[15] == int((dense > 15).sum()) == 3
    assert stats.above[1] == int((dense > 1).sum()) and stats.n_total == len(ke)


def test_streamed_plan_equals_the_plan_from_indices(monkeypatch):
    monkeypatch.setattr(key_elements_module, "DECODE_CHUNK", 7)
    monkeypatch.setattr(key_elements_module, "BLOCK_ENTRIES", 45 * 2)
    ke = _cases()["overlapping tasks"]
    plan = ke.plan()
    expected = PositionPlan.from_indices(ke.indices(), ke.shape)
    for field in ("rows", "cols", "counts", "row_ptr", "col_order", "col_ptr"):
        assert torch.equal(getattr(plan, field), getattr(expected, field)), field


def _stats(shape, multi, above15=0, above3: int | None = None, above2: int | None = None):
    """Synthetic statistics: `multi` positions chosen more than once (by default all of
    them more than three times)."""
    d = shape[1]
    above3 = multi if above3 is None else above3
    above2 = max(multi, above3) if above2 is None else above2
    return MaskStats(
        shape=shape,
        n_total=10 * multi + 1,
        num_unique=5 * multi + 1,
        max_count=16 if above15 else 4,
        above={0: 5 * multi + 1, 1: multi, 2: above2, 3: above3, 15: above15},
        col_counts={t: torch.zeros(d, dtype=torch.int64) for t in (0, 1, 2, 3, 15)},
    )


def test_representation_choice_at_the_threshold():
    shape = (4096, 4096)
    # the 1-bit plane's list may cost up to the 4-bit plane's extra bytes, not one more
    budget = plane_nbytes(shape, 4) - plane_nbytes(shape, 1)
    per_position = 2 + 2 + 1 + 4
    offsets = 4 * (4096 + 1) * 2
    at = (budget - offsets) // per_position
    assert plan_nbytes_for(shape, at, 1) <= budget < plan_nbytes_for(shape, at + 1, 1)
    assert choose_bits(_stats(shape, at), "tile") == 1
    assert choose_bits(_stats(shape, at + 1), "tile") == 4
    assert choose_bits(_stats(shape, at + 1), "gather") == 0
    stats = _stats(shape, at + 1)
    assert representation_nbytes(stats, 1) > representation_nbytes(stats, 4)
    with pytest.raises(ValueError, match="kernel 'tile' or 'gather'"):
        choose_bits(stats, "auto")
    # the same list made of positions chosen three times: the 2-bit plane holds them all
    # (no list) and is the smallest; chosen exactly twice: the trit plane holds them in a
    # fifth of a byte per entry, smaller still
    assert choose_bits(_stats(shape, at + 1, above3=0), "tile") == 2
    assert choose_bits(_stats(shape, at + 1, above3=0, above2=0), "tile") == TRIT_PLANE
    # between the union bit plane and the trit plane: the 1-bit list may cost up to the
    # trit plane's extra bytes when no position was chosen three times
    trit_budget = plane_nbytes(shape, TRIT_PLANE) - plane_nbytes(shape, 1)
    at_trit = (trit_budget - offsets) // per_position
    assert choose_bits(_stats(shape, at_trit, above3=0, above2=0), "tile") == 1
    assert choose_bits(_stats(shape, at_trit + 1, above3=0, above2=0), "tile") == TRIT_PLANE


def test_auto_follows_the_roofline_crossover():
    from sefe_fast.roofline import crossover_density

    shape = (4096, 4096)
    crossover = crossover_density(*shape, 128, torch.float32, "A100-SXM4")
    assert 0.005 < crossover < 0.05  # about 2 % for fp32 factors on the A100 model
    gen = torch.Generator().manual_seed(0)

    def mask(density):
        return KeyElements.from_linear(
            torch.randint(0, 4096 * 4096, (int(density * 4096 * 4096),), generator=gen), shape
        )

    sparse, dense = mask(crossover / 2), mask(2 * crossover)
    assert build_device_mask(sparse, kernel="auto", gpu="A100-SXM4").bits == 0
    assert build_device_mask(dense, kernel="auto", gpu="A100-SXM4").bits in PLANE_BITS
    assert build_device_mask(KeyElements.empty(shape), kernel="tile").nbytes == 0
    with pytest.raises(ValueError, match="unknown DeviceMask kernel"):
        build_device_mask(dense, kernel="dense")


def _held_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("bits", [0, *PLANE_BITS])
def test_nbytes_is_the_sum_of_the_real_tensors(bits):
    ke = _cases()["counts above 15"]
    mask = build_device_mask(ke, bits=bits)
    assert mask.nbytes == _held_bytes(mask.tensors()) > 0
    assert mask.nbytes == representation_nbytes(mask_statistics(ke), bits)


def test_device_mask_checks_its_plane():
    with pytest.raises(ValueError, match=r"int32 \[4, 1\] plane"):
        DeviceMask((4, 5), 3, 4, torch.zeros(4, 2, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="bits = 0 has no plane"):
        DeviceMask((4, 5), 3, 0, torch.zeros(4, 1, dtype=torch.int32), None)


def test_building_streams_instead_of_materialising_int64_arrays():
    """Peak extra RSS of building, against the int64 arrays the old build held at once."""
    from sefe_fast.bench.measuring import peak_extra_rss_bytes, rss_available

    if not rss_available():
        pytest.skip("needs /proc/self/clear_refs")
    shape = (4096, 4096)
    gen = torch.Generator().manual_seed(3)
    tasks = [
        KeyElements.from_linear(torch.randint(0, 4096 * 4096, (335_544,), generator=gen), shape)
        for _ in range(7)
    ]
    ke = merge_key_elements(tasks)
    n = len(ke)
    # the old build sorted an int64 copy of all n positions (values + int64 indices) and
    # then built int64 rows/cols/keys per unique position: ≥ 5·8·n bytes at once
    old_floor = 5 * 8 * n
    merge_key_elements(tasks[:2])._build_plan()  # page in the code paths first
    build_device_mask(merge_key_elements(tasks[:2]), bits=1)
    kept = []
    peak_plan = peak_extra_rss_bytes(lambda: kept.append(ke._build_plan()))
    peak_mask = peak_extra_rss_bytes(lambda: kept.append(build_device_mask(ke, bits=1)))
    assert peak_plan < kept[0].nbytes + old_floor / 2, (peak_plan, old_floor)
    assert peak_mask < kept[1].nbytes + old_floor / 2, (peak_mask, old_floor)


def test_overlap_report_counts_multiply_chosen_entries(tmp_path):
    from sefe_fast.bench.mask_overlap import format_rows, overlap_rows
    from sefe_fast.reglora import save_key_elements

    shape = (10, 20)
    first = {"a": KeyElements.from_linear(torch.tensor([0, 1, 2, 3]), shape)}
    second = {"a": KeyElements.from_linear(torch.tensor([2, 3, 4, 5]), shape)}
    save_key_elements(first, tmp_path / "stage01_x.safetensors")
    save_key_elements(second, tmp_path / "stage02_y.safetensors")
    rows = overlap_rows(tmp_path)
    assert [r["unique"] for r in rows] == [4, 6] and [r["multi"] for r in rows] == [0, 2]
    assert rows[1]["multi_fraction"] == pytest.approx(2 / 200)
    independent = 1 - 0.98**2 - 2 * 0.02 * 0.98
    assert rows[1]["overlap"] == pytest.approx((2 / 200) / independent)
    merged = merge_key_elements([first["a"], second["a"]])
    assert rows[1]["bytes_gather"] == build_device_mask(merged, bits=0).nbytes
    assert rows[1]["vanilla_bytes"] == 16 * 8
    assert "| 2 |" in format_rows(rows)


def test_overlap_scenarios_pick_the_documented_task_orders():
    from sefe_fast.bench.mask_overlap import SCENARIOS, format_scenarios

    assert SCENARIOS["independent"](4) == [0, 1, 2, 3]
    assert SCENARIOS["identical"](3) == [0, 0, 0]
    assert SCENARIOS["pairs"](7) == [0, 0, 1, 1, 2, 2, 3]
    row = {"scenario": "pairs", "prior_tasks": 7, "multi": 5, "vanilla_bytes": 2e9}
    row.update({"bytes_gather": 1e9, "bytes_tile1": 3e9, "bytes_tile3": 1.5e9})
    row.update({"bytes_tile4": 2e9, "bytes_tile": 1.5e9})
    table = format_scenarios([row])
    assert "| 7 pairs | 5 | 2.000 | 1.000 | 3.000 | 1.500 | 2.000 | 1.500 |" in table
