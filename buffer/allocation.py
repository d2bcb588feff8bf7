"""Variance-minimising rollout allocation (DynaMO, docs/ALGORITHM.md §1): responses per prompt of a wave.

The buffer keeps, per prompt id, G = responses scored and k = correct ones. `prompt_priority` turns (G, k) into the
Bernoulli variance of correctness (the proxy for how informative more samples of that prompt are), and
`allocate_rollouts` splits a wave's budget so that n_i grows with the priority between the bounds
[n_min, n_max]. Plain Python on short lists: a wave has tens of prompts, so clarity wins over vectorisation.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

UNKNOWN_PRIORITY = -1.0
"""Priority of a prompt with too little history; such prompts are explored, never water-filled."""
_ELIGIBLE_WEIGHT = 1e-8
"""Water-filling ignores weights at or below this (unknown prompts, and the degenerate zero weight)."""
_TIE_BREAK = 1e-6
"""Scale of the term that breaks equal variances toward harder prompts."""


def prompt_priority(sample_count: float, correct_count: float, *, min_history: int = 4, mastery: float = 0.85,
                    floor: float = 0.01) -> float:
    """Priority of one prompt from its scored history (docs/ALGORITHM.md §1).

    Counts may be fractional when the buffer applies exponential forgetting to (G, k).
    Returns -1 ("unknown") below `min_history` responses; `floor` for a mastered prompt
    (success rate >= `mastery`); otherwise the unbiased Bernoulli variance of correctness plus a tiny term that
    prefers harder prompts among equal variances, never below `floor` (so an always-failed prompt keeps a trickle
    of samples instead of none).
    """
    if min_history < 2:
        raise ValueError(f"min_history must be >= 2 (variance needs two samples), got {min_history}")
    if not 0 <= correct_count <= sample_count:
        raise ValueError(f"need 0 <= correct_count <= sample_count, got {correct_count}, {sample_count}")
    if sample_count < min_history:
        return UNKNOWN_PRIORITY
    success = correct_count / sample_count
    if success >= mastery:
        return floor
    variance = correct_count * (sample_count - correct_count) / (sample_count * (sample_count - 1))
    return max(variance + _TIE_BREAK * (1.0 - success), floor)


def allocate_rollouts(sample_counts: Sequence[float], priorities: Sequence[float], budget: int, n_min: int,
                      n_max: int, initial_budget: int, mode: str = "reference") -> list[int]:
    """Responses to sample for each prompt of a wave; the result sums to `budget` clipped into [N*n_min, N*n_max].

    `mode`: "reference" water-fills proportionally to the priority (the paper's code), "neyman" to its square
    root (what the variance derivation asks for), "uniform" gives budget/N each (plain GRPO).
    """
    n = len(sample_counts)
    if len(priorities) != n:
        raise ValueError(f"sample_counts and priorities differ in length: {n} != {len(priorities)}")
    if not 0 <= n_min <= n_max:
        raise ValueError(f"need 0 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    if mode not in ALLOCATION_MODES:
        raise ValueError(f"unknown allocation mode {mode!r}; choose from {sorted(ALLOCATION_MODES)}")
    if n == 0:
        return []
    budget = min(max(int(budget), n * n_min), n * n_max)
    return ALLOCATION_MODES[mode](list(sample_counts), list(priorities), budget, n_min, n_max, initial_budget)


def _uniform(sample_counts: list[float], priorities: list[float], budget: int, n_min: int, n_max: int,
             initial_budget: int) -> list[int]:
    """budget // N each, the remainder one by one in input order; the clipped budget keeps this within bounds."""
    base, extra = divmod(budget, len(sample_counts))
    return [base + (1 if i < extra else 0) for i in range(len(sample_counts))]


def _water_filling_mode(weight: Callable[[float], float]):
    """The docs/ALGORITHM.md §1 procedure (steps 2-5) on weight(priority); the weight decides reference vs neyman."""

    def allocate(sample_counts: list[float], priorities: list[float], budget: int, n_min: int, n_max: int,
                 initial_budget: int) -> list[int]:
        counts = _explore(sample_counts, budget, n_min, n_max, max(n_min, initial_budget))
        counts = _raise_to_floor(counts, budget, n_min)
        counts = _water_fill(counts, [weight(p) for p in priorities], priorities, budget - sum(counts), n_max)
        return _repair(counts, budget, n_min, n_max)

    return allocate


def _explore(sample_counts: list[float], budget: int, n_min: int, n_max: int, explore_to: int) -> list[int]:
    """Step 2: top every prompt up to `explore_to` scored responses; scale down if that alone exceeds the budget."""
    wanted = [min(max(0, math.ceil(explore_to - g)), n_max) for g in sample_counts]
    total = sum(wanted)
    if total <= budget:
        return wanted
    scale = budget / total
    counts = [max(math.floor(e * scale), n_min) for e in wanted]
    while sum(counts) > budget:
        largest = counts.index(max(counts))
        counts[largest] -= 1
    return counts


def _raise_to_floor(counts: list[int], budget: int, n_min: int) -> list[int]:
    """Step 3: lift every prompt to n_min, or, if the budget left cannot pay for all top-ups, a floored share."""
    top_ups = [max(0, n_min - c) for c in counts]
    needed, left = sum(top_ups), budget - sum(counts)
    if needed <= left:
        return [c + t for c, t in zip(counts, top_ups)]
    scale = left / needed
    return [c + math.floor(t * scale) for c, t in zip(counts, top_ups)]


def _water_fill(counts: list[int], weights: list[float], priorities: list[float], remaining: int,
                n_max: int) -> list[int]:
    """Step 4: hand out `remaining` proportionally to the weights of the prompts below n_max, capping at n_max.

    Each round gives out exactly what is left (floor plus largest remainder) and caps; what the caps refuse goes
    into the next round, in which the capped prompts no longer take part.
    """
    counts = list(counts)
    while remaining > 0:
        eligible = [i for i, c in enumerate(counts) if c < n_max and weights[i] > _ELIGIBLE_WEIGHT]
        if not eligible:
            return _round_robin_add(counts, remaining, n_max)
        shares = _largest_remainder({i: weights[i] for i in eligible}, remaining, priorities)
        for i, share in shares.items():
            granted = min(share, n_max - counts[i])
            counts[i] += granted
            remaining -= granted
    return counts


def _largest_remainder(weights: dict[int, float], total: int, priorities: list[float]) -> dict[int, int]:
    """Integer shares of `total` proportional to `weights` that sum to exactly `total`.

    Equal remainders go to the higher priority, then to the earlier prompt, so that a higher priority never ends
    up with fewer rollouts because float rounding (or a square root) made two shares equal.
    """
    weight_sum = sum(weights.values())
    exact = {i: total * w / weight_sum for i, w in weights.items()}
    shares = {i: math.floor(x) for i, x in exact.items()}
    order = sorted(weights, key=lambda i: (-(exact[i] - shares[i]), -priorities[i], i))
    for k in range(total - sum(shares.values())):
        shares[order[k % len(order)]] += 1
    return shares


def _round_robin_add(counts: list[int], amount: int, n_max: int) -> list[int]:
    """Give `amount` one at a time, in input order and cycling, to prompts below n_max."""
    counts = list(counts)
    while amount > 0:
        for i in range(len(counts)):
            if amount > 0 and counts[i] < n_max:
                counts[i] += 1
                amount -= 1
    return counts


def _repair(counts: list[int], budget: int, n_min: int, n_max: int) -> list[int]:
    """Step 5: make the sum exactly `budget` (round-robin) and every count lie in [n_min, n_max].

    The bound repair only acts when the exploration budget exceeds n_min and its top-ups leave too little for the
    floor of step 3: units then move from the largest count (first in input order) to the prompts below n_min.
    """
    counts = list(counts)
    while (diff := budget - sum(counts)) != 0:
        for i in range(len(counts)):
            if diff > 0 and counts[i] < n_max:
                counts[i] += 1
                diff -= 1
            elif diff < 0 and counts[i] > n_min:
                counts[i] -= 1
                diff += 1
    for i in range(len(counts)):
        while counts[i] < n_min:
            largest = counts.index(max(counts))
            counts[largest] -= 1
            counts[i] += 1
    return counts


def _neyman_weight(priority: float) -> float:
    """sqrt of a known priority; an unknown (-1) priority stays negative, hence not eligible."""
    return math.sqrt(priority) if priority > 0 else priority


ALLOCATION_MODES = {
    "reference": _water_filling_mode(lambda priority: priority),
    "neyman": _water_filling_mode(_neyman_weight),
    "uniform": _uniform,
}
"""Allocation procedures by `AlgorithmConfig.allocation_mode`."""
