"""The plan with the highest importance whose predicted cost fits a budget.

Exact over the whole space, which is small (a 12-block MoE-ViT has 4 units per block, 48 in all): for each choice of
first trainable block ``f``, every non-empty subset of block ``f``'s units is tried (their cost was measured as a
whole, see :mod:`.costs`), and the best set of later units is a 0/1 knapsack solved by dynamic programming over costs
discretised to ``RESOLUTION`` steps of the budget (each unit's cost rounded *up*, so a chosen plan never exceeds its
budget by rounding). Ties go to the cheaper plan, then to the earlier units: the same inputs always give the same plan.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .costs import CostModel, PlanCost, Unit

RESOLUTION = 2000


@dataclass(frozen=True)
class Choice:
    units: tuple[Unit, ...]
    cost: PlanCost
    score: float


class _Knapsack:
    """0/1 knapsack over ``items`` solved once for every capacity up to ``capacity`` (exact); :meth:`best` reads the
    best set for any of them, so every subset of a first block's units shares one table."""

    def __init__(self, items: Sequence[Unit], costs: Sequence[int], values: Sequence[float], capacity: int) -> None:
        self.items, self.costs = items, costs
        self.value = np.zeros(capacity + 1)
        self.taken = np.zeros((len(items), capacity + 1), dtype=bool)
        for index, (cost, value) in enumerate(zip(costs, values)):
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, -np.inf)
            candidate[cost:] = self.value[:capacity + 1 - cost] + value
            better = candidate > self.value + 1e-15
            self.taken[index] = better
            self.value = np.where(better, candidate, self.value)

    def best(self, room: int) -> tuple[Unit, ...]:
        picked, left = [], room
        for index in range(len(self.items) - 1, -1, -1):
            if self.taken[index, left]:
                picked.append(self.items[index])
                left -= self.costs[index]
        return tuple(sorted(picked))


def best_plan(model: CostModel, scores: Mapping[Unit, float], kind: str, budget: float) -> Optional[Choice]:
    """The highest-scoring plan whose predicted ``kind`` cost (``memory``, ``flops`` or ``step``) is at most ``budget``;
    ``None`` when not even heads alone fit."""
    heads = model.predict(())
    if heads.value(kind) > budget:
        return None
    best = Choice((), heads, 0.0)
    step = budget / RESOLUTION
    for first in range(model.depth):
        own = [unit for unit in model.units if unit[0] == first]
        later = [unit for unit in model.units if unit[0] > first]
        later_costs = [max(0, math.ceil(_marginal(model, unit, kind) / step)) for unit in later]
        knapsack = _Knapsack(later, later_costs, [scores[unit] for unit in later], RESOLUTION)
        for size in range(1, len(own) + 1):
            for subset in itertools.combinations(own, size):
                room = budget - model.predict(subset).value(kind)
                if room < 0:
                    continue
                units = tuple(sorted(subset + knapsack.best(min(RESOLUTION, int(room // step)))))
                choice = Choice(units, model.predict(units), sum(scores[unit] for unit in units))
                if _better(choice, best, kind):
                    best = choice
    return best


def _marginal(model: CostModel, unit: Unit, kind: str) -> float:
    """What adding ``unit`` to a plan that already starts at or before its block adds to the ``kind`` cost."""
    extra = model.extra[unit]
    params = model.unit_params[unit]
    if kind == "flops":
        return extra.flops
    if kind == "step":
        return model.step_seconds(extra.flops, params) - model.step_seconds(0.0, 0)
    return extra.parameter_bytes + extra.saved_bytes + params * model.state_bytes_per_param


def _better(candidate: Choice, incumbent: Choice, kind: str) -> bool:
    if not math.isclose(candidate.score, incumbent.score, rel_tol=1e-9, abs_tol=1e-12):
        return candidate.score > incumbent.score
    if candidate.cost.value(kind) != incumbent.cost.value(kind):
        return candidate.cost.value(kind) < incumbent.cost.value(kind)
    return candidate.units < incumbent.units


def frontier(model: CostModel, scores: Mapping[Unit, float], kind: str, points: int = 24) -> list[Choice]:
    """Best plans for budgets from heads alone to full fine-tuning (geometric steps), without repeats."""
    low, high = model.predict(()).value(kind), model.full.value(kind)
    plans: list[Choice] = []
    for index in range(points):
        budget = low * (high / low) ** (index / (points - 1))
        choice = best_plan(model, scores, kind, budget)
        if choice is not None and all(choice.units != plan.units for plan in plans):
            plans.append(choice)
    return plans
