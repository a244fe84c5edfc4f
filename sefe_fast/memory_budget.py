"""The time-optimal choice of representations under a resident-memory budget.

Each item (a matrix of the regularizer) has a few representations, each with a resident size
(bytes) and a modelled time per step (seconds). The policy:

1. every item starts at its smallest representation (ties: the faster one);
2. then, repeatedly, among all upgrades — moving one item to a representation that is
   modelled strictly faster — the one with the most seconds saved per byte added is taken
   (an upgrade that adds no bytes is taken first), as long as the total stays within the
   budget; the first upgrade that does not fit ends the choice.

Stopping at the first upgrade that does not fit (instead of skipping it for smaller ones)
makes the chosen upgrades a prefix of one sequence that does not depend on the budget, so
a larger budget never gives a slower modelled step (monotone in the budget) — at the price
of leaving at most one item's upgrade of the budget unused. When even the smallest
representations exceed the budget, every item keeps its smallest one (the budget is then
not met; `BudgetChoice.within_budget` says so).

Pure Python on plain numbers: the regularizer (sefe_fast/reglora/regularizer.py) feeds it
the measured statistics of the real masks, the roofline model (sefe_fast/roofline.py) the
modelled fractions of independent tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GB = 1e9  # budgets are stated in decimal gigabytes, as every size in the docs
# The default resident budget of RegLoRA's device masks (RunConfig.reg_gpu_budget_gb): the
# issue's goal for LLaVA-7B at task 8, ≤ 1.5 GB (docs/kernels.md).
DEFAULT_BUDGET_GB = 1.5


@dataclass(frozen=True)
class Option:
    """One representation of one item: a label (e.g. plane bits), bytes, modelled seconds."""

    label: int
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class BudgetChoice:
    """The chosen option index per item, the total bytes and modelled seconds."""

    chosen: tuple[int, ...]
    nbytes: int
    seconds: float
    budget_bytes: int

    @property
    def within_budget(self) -> bool:
        """Whether the chosen representations fit the budget."""
        return self.nbytes <= self.budget_bytes


def budget_bytes(budget_gb: float) -> int:
    """A budget in GB (10⁹ bytes) as bytes; it must be positive."""
    if not budget_gb > 0:
        raise ValueError(f"a resident-memory budget must be > 0 GB, got {budget_gb!r}")
    return int(budget_gb * GB)


def guarded_options(options: Sequence[Option], ceiling: int) -> list[Option]:
    """The options of one item no larger than `ceiling` bytes (the caller's guarantee, e.g.
    min(the 4-bit form, the official int64 pairs)); the smallest option alone if none is."""
    allowed = [o for o in options if o.nbytes <= ceiling]
    return allowed or [min(options, key=lambda o: (o.nbytes, o.seconds))]


def choose_under_budget(items: Sequence[Sequence[Option]], budget: int) -> BudgetChoice:
    """The policy of the module docstring for `items` (each a non-empty list of Options)
    and `budget` bytes; returns which option each item gets."""
    for index, options in enumerate(items):
        if not options:
            raise ValueError(f"item {index} has no representation to choose from")
    chosen = [
        min(range(len(opts)), key=lambda i, o=opts: (o[i].nbytes, o[i].seconds)) for opts in items
    ]
    total = sum(opts[c].nbytes for opts, c in zip(items, chosen))
    while True:
        best = None  # (priority, item, option)
        for item, opts in enumerate(items):
            current = opts[chosen[item]]
            for index, option in enumerate(opts):
                saved = current.seconds - option.seconds
                if saved <= 0:
                    continue
                added = option.nbytes - current.nbytes
                # free upgrades first (largest saving), then seconds saved per byte added
                priority = (1, saved) if added <= 0 else (0, saved / added)
                if best is None or priority > best[0]:
                    best = (priority, item, index)
        if best is None:
            break
        _, item, index = best
        added = items[item][index].nbytes - items[item][chosen[item]].nbytes
        if total + added > budget:
            break  # a prefix of the budget-independent sequence: monotone in the budget
        chosen[item], total = index, total + added
    seconds = sum(opts[c].seconds for opts, c in zip(items, chosen))
    return BudgetChoice(tuple(chosen), total, seconds, int(budget))
