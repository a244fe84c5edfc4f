"""The representation choice under a resident-memory budget (sefe_fast/memory_budget.py) and
its use by the regularizer's device groups."""

from __future__ import annotations

import pytest
import torch

from sefe_fast.memory_budget import Option, budget_bytes, choose_under_budget, guarded_options
from sefe_fast.reglora import KeyElements, RegLoRA, merge_key_elements

pytestmark = pytest.mark.usefixtures("one_thread")

# Three forms per item, as the planes: (bits, bytes, modelled seconds).
ITEMS = [
    [Option(1, 100, 9.0), Option(2, 150, 5.0), Option(4, 300, 4.0)],  # 2-bit: 0.08 s/B
    [Option(1, 100, 9.0), Option(2, 120, 8.0), Option(4, 200, 2.0)],  # 4-bit: 0.07 s/B
    [Option(1, 50, 1.0), Option(2, 60, 1.0), Option(4, 90, 1.0)],  # nothing to gain
]


def _labels(choice, items=ITEMS):
    return [items[i][c].label for i, c in enumerate(choice.chosen)]


def test_tight_budget_keeps_the_smallest_forms_and_says_when_it_is_exceeded():
    choice = choose_under_budget(ITEMS, 250)
    assert _labels(choice) == [1, 1, 1] and choice.nbytes == 250 and choice.within_budget
    over = choose_under_budget(ITEMS, 10)
    assert _labels(over) == [1, 1, 1] and not over.within_budget


def test_upgrades_go_by_seconds_saved_per_byte_added():
    # first item 0 to 2 bits (4 s for 50 B), then item 1 to 4 bits (7 s for 100 B)
    assert _labels(choose_under_budget(ITEMS, 300)) == [2, 1, 1]
    assert _labels(choose_under_budget(ITEMS, 400)) == [2, 4, 1]
    loose = choose_under_budget(ITEMS, 10**6)
    assert _labels(loose) == [4, 4, 1]  # item 2 stays smallest: the others are not faster
    assert loose.nbytes == 300 + 200 + 50 and loose.seconds == 4.0 + 2.0 + 1.0


def test_budget_is_respected_and_time_is_monotone_in_the_budget():
    previous = None
    for budget in range(250, 700, 7):
        choice = choose_under_budget(ITEMS, budget)
        assert choice.nbytes <= budget
        if previous is not None:
            assert choice.seconds <= previous.seconds
            assert choice.nbytes >= previous.nbytes
        previous = choice


def test_free_upgrades_are_taken_even_at_the_smallest_budget():
    items = [[Option(1, 100, 5.0), Option(2, 100, 3.0)]]
    assert _labels(choose_under_budget(items, 100), items) == [2]


def test_guard_and_budget_input_errors():
    options = ITEMS[0]
    assert guarded_options(options, 200) == options[:2]
    assert guarded_options(options, 10) == [options[0]]  # only the smallest is left
    assert budget_bytes(1.5) == 1_500_000_000
    with pytest.raises(ValueError, match="budget must be > 0 GB"):
        budget_bytes(0)
    with pytest.raises(ValueError, match="item 0 has no representation"):
        choose_under_budget([[]], 10)


def _masks(count=3, shape=(256, 512), tasks=7, ratio=0.02, shared=64):
    """Merged masks of `tasks` 2 % selections, independent but for `shared` positions every
    task picks (counts of 7: listed beside the 1- and 2-bit planes, not the 4-bit one); the
    1-bit plane + list is the smallest form, the 4-bit plane the modelled fastest."""
    gen = torch.Generator().manual_seed(0)
    k, d = shape
    chosen = int(ratio * k * d)
    common = torch.arange(shared) * 17

    def task() -> KeyElements:
        picks = torch.randperm(k * d, generator=gen)[:chosen]
        picks = torch.cat([common, picks[~torch.isin(picks, common)]])
        return KeyElements.from_linear(picks, shape)

    return {f"m{i}": merge_key_elements([task() for _ in range(tasks)]) for i in range(count)}


def _bits(reg, budget_gb):
    groups = reg.device_groups("cpu", 128, torch.float32, "triton_tile", gpu_budget_gb=budget_gb)
    bits = {name: group.bits for names, group in groups for name in names}
    return bits, reg.device_nbytes()


def test_regularizer_planes_follow_the_budget():
    masks = _masks()
    reg = RegLoRA(masks, backend="triton_tile")
    smallest, smallest_bytes = _bits(reg, 1e-9)  # far too small: every matrix at its smallest
    assert set(smallest.values()) == {1}
    loose, loose_bytes = _bits(reg, 1.5)
    assert set(loose.values()) == {4}  # the modelled fastest (no list left)
    assert smallest_bytes < loose_bytes
    vanilla = 16 * sum(len(ke) for ke in masks.values())
    assert loose_bytes <= vanilla
    # budgets in between: within the budget, never slower, the finer split used
    seen = set()
    previous_bits = 0
    for budget in range(smallest_bytes, loose_bytes + 1, (loose_bytes - smallest_bytes) // 9):
        bits, held = _bits(reg, budget / 1e9)
        assert held <= budget, (budget, held, bits)
        total_bits = sum(bits.values())
        assert total_bits >= previous_bits  # upgrades only add planes' bits here
        previous_bits = total_bits
        seen.add(tuple(sorted(bits.values())))
    assert len(seen) >= 3  # some matrices upgraded, others not: per-matrix choice
    # the regularizer's own setting is the default of device_groups
    assert RegLoRA(masks, backend="triton_tile", gpu_budget_gb=1e-9).gpu_budget_bytes == 1
