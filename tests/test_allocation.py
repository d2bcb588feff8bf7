"""Rollout allocation (docs/ALGORITHM.md §1): priorities worked by hand, a worked example, invariants by hypothesis."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.allocation import ALLOCATION_MODES, allocate_rollouts, prompt_priority

pytestmark = pytest.mark.unit


# ---- priority ------------------------------------------------------------------------------------------------

def test_priority_unknown_below_min_history():
    assert prompt_priority(0, 0) == -1.0
    assert prompt_priority(3, 1) == -1.0  # 3 < min_history 4
    assert prompt_priority(5, 2, min_history=6) == -1.0


def test_priority_mastered_gets_floor():
    assert prompt_priority(16, 14) == 0.01  # 14/16 = 0.875 >= 0.85
    assert prompt_priority(20, 17) == 0.01  # 17/20 = 0.85 exactly: mastery is inclusive
    assert prompt_priority(16, 16) == 0.01
    assert prompt_priority(16, 14, mastery=0.9, floor=0.02) == pytest.approx(14 * 2 / (16 * 15) + 1e-6 * 0.125)


def test_priority_variance_and_floor_by_hand():
    # G=16, k=8: 8*8/(16*15) = 0.2666667, plus tie-break 1e-6*(1 - 0.5) = 5e-7
    assert prompt_priority(16, 8) == pytest.approx(64 / 240 + 5e-7, abs=1e-12)
    # G=20, k=1: 1*19/(20*19) = 0.05, plus 1e-6*0.95
    assert prompt_priority(20, 1) == pytest.approx(0.05 + 9.5e-7, abs=1e-12)
    # always failed: 0 + 1e-6 -> floor 0.01
    assert prompt_priority(16, 0) == 0.01
    # G=200, k=1: 199/(200*199) = 0.005 < floor -> 0.01
    assert prompt_priority(200, 1) == 0.01
    # fractional counts (exponential forgetting): G=4.5, k=1.5: 1.5*3/(4.5*3.5) = 0.2857143 + 1e-6*(2/3)
    assert prompt_priority(4.5, 1.5) == pytest.approx(0.28571429 + 6.6667e-7, abs=1e-8)


def test_priority_tie_break_prefers_harder_prompt():
    # G=4: k=1 and k=3 have the same variance 3/12 = 0.25; tie-break 1e-6*0.75 vs 1e-6*0.25
    assert prompt_priority(4, 1) == pytest.approx(0.25000075, abs=1e-12)
    assert prompt_priority(4, 3) == pytest.approx(0.25000025, abs=1e-12)
    assert prompt_priority(4, 1) > prompt_priority(4, 3)


def test_priority_rejects_impossible_history():
    with pytest.raises(ValueError):
        prompt_priority(4, 5)
    with pytest.raises(ValueError):
        prompt_priority(4, 1, min_history=1)


# ---- a worked example --------------------------------------------------------------------------------------

def test_worked_example_from_issue():
    # Priorities (G=16): k=0,0,14,15,16,16 -> floor 0.01; k=1..12 -> k(16-k)/240 (+ tie-break).
    # Floor: everybody 8 (128), R = 128 to water-fill over sum(rho) = 2.06417:
    #   shares 0.62 (floor prompts), 3.88, 7.23, 10.08, 12.40, 14.21, 15.50, 16.54, 16.54, 15.50, 12.40
    #   floors 0,3,7,10,12,14,15,16,16,15,12 (sum 120); 8 largest remainders: k=1 (.876), the six floor
    #   prompts (.62), the first k=8 (.54) -> capped back at 16, so one unit is left.
    # Round 2: 1 unit to the largest remainder = the largest priority below n_max: k=6 (0.250000625) beats
    #   k=10 (0.250000375) by the tie-break term -> 23 + 1 = 24.
    ks = [0, 0, 1, 2, 3, 4, 5, 6, 8, 8, 10, 12, 14, 15, 16, 16]
    priorities = [prompt_priority(16, k) for k in ks]
    counts = allocate_rollouts([16] * 16, priorities, budget=256, n_min=8, n_max=24, initial_budget=4)
    assert counts == [9, 9, 12, 15, 18, 20, 22, 24, 24, 24, 23, 20, 9, 9, 9, 9]


# ---- exploration, floor, round robin, repair ------------------------------------------------------------------

def test_exploration_fits_budget():
    # b0 = max(8, 12) = 12: e = [12, 10, 0, 0] (sum 22 <= 40); floor lifts the last two to 8 -> 38;
    # R = 2 over rho 0.2, 0.1: shares 1.33, 0.67 -> floors 1, 0, remainder .67 wins -> [12, 10, 9, 9]
    counts = allocate_rollouts([0, 2, 16, 16], [-1, -1, 0.2, 0.1], budget=40, n_min=8, n_max=24, initial_budget=12)
    assert counts == [12, 10, 9, 9]


def test_exploration_scaled_down_when_over_budget():
    # b0 = 16: e = [16, 16, 16, 6] (sum 54 > 24); scale 24/54 = 0.444: floor -> [7, 7, 7, 2];
    # raise to n_min 4 -> [7, 7, 7, 4] = 25; remove one from the first largest -> [6, 7, 7, 4]
    counts = allocate_rollouts([0, 0, 0, 10], [-1, -1, -1, 0.2], budget=24, n_min=4, n_max=20, initial_budget=16)
    assert counts == [6, 7, 7, 4]


def test_unknown_prompts_explored_then_water_fill_caps():
    # b0 = 4: e = [3, 1, 0, 0]; floor 2 -> [3, 2, 2, 2] (9); R = 7 over rho .25, .05:
    # shares 5.83, 1.17 -> 5 + 1 (remainder .83) = 6, 1; prompt 2 capped at 6 - 2 = 4 -> [3, 2, 6, 3], 2 left;
    # round 2: only prompt 3 is eligible -> [3, 2, 6, 5]
    counts = allocate_rollouts([1, 3, 8, 8], [-1, -1, 0.25, 0.05], budget=16, n_min=2, n_max=6, initial_budget=4)
    assert counts == [3, 2, 6, 5]


def test_no_eligible_prompt_goes_round_robin():
    # nobody eligible (all unknown, no exploration since G >= b0): [2, 2, 2] + 4 round-robin -> [4, 3, 3]
    counts = allocate_rollouts([16, 16, 16], [-1, -1, -1], budget=10, n_min=2, n_max=6, initial_budget=0)
    assert counts == [4, 3, 3]


def test_exploration_over_floor_is_repaired_into_bounds():
    # b0 = 16: e = [16, 0] fits the budget of 16 exactly, leaving nothing for prompt 1's floor of 8;
    # the bound repair moves 8 from the largest -> [8, 8]
    counts = allocate_rollouts([0, 16], [-1, 0.2], budget=16, n_min=8, n_max=24, initial_budget=16)
    assert counts == [8, 8]


def test_budget_is_clipped_into_bounds():
    assert allocate_rollouts([16, 16], [0.2, 0.1], budget=1000, n_min=2, n_max=6, initial_budget=0) == [6, 6]
    assert allocate_rollouts([16, 16], [0.2, 0.1], budget=0, n_min=2, n_max=6, initial_budget=0) == [2, 2]


def test_neyman_uses_square_root():
    # rho 0.16, 0.04 -> sqrt 0.4, 0.2; floor 0 each, R = 6 -> shares 4, 2 (reference: 4.8, 1.2 -> 5, 1)
    assert allocate_rollouts([16, 16], [0.16, 0.04], 6, 0, 10, 0, mode="neyman") == [4, 2]
    assert allocate_rollouts([16, 16], [0.16, 0.04], 6, 0, 10, 0, mode="reference") == [5, 1]


def test_float_ties_favour_higher_priority():
    # 0.17 and the next float below: both shares of R = 3 round to exactly 1.5 -> floors 1, 1 and one unit left
    # with equal remainders; it goes to the (barely) higher priority even though that prompt comes second
    lower = math.nextafter(0.17, 0.0)
    assert allocate_rollouts([16, 16], [lower, 0.17], budget=3, n_min=0, n_max=10, initial_budget=0) == [1, 2]
    # neyman: sqrt maps 0.01 and the next float above to the same weight; the tie still goes to the higher one
    higher = math.nextafter(0.01, 1.0)
    assert allocate_rollouts([16, 16], [0.01, higher], 1, 0, 1, 0, mode="neyman") == [0, 1]


def test_uniform_mode():
    # 26 / 4 = 6 rest 2 -> [7, 7, 6, 6], whatever the priorities and history
    assert allocate_rollouts([0, 16, 16, 3], [-1, 0.25, 0.01, -1], 26, 2, 8, 4, mode="uniform") == [7, 7, 6, 6]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        allocate_rollouts([1, 2], [0.1], 8, 2, 6, 0)
    with pytest.raises(ValueError):
        allocate_rollouts([1], [0.1], 8, 7, 6, 0)
    with pytest.raises(ValueError):
        allocate_rollouts([1], [0.1], 8, 2, 6, 0, mode="proportional")


# ---- invariants ------------------------------------------------------------------------------------------------

priority_values = st.one_of(st.just(-1.0), st.just(0.01), st.floats(0.01, 0.25))


@st.composite
def waves(draw, equal_history=False):
    n = draw(st.integers(1, 12))
    n_min = draw(st.integers(0, 8))
    n_max = draw(st.integers(max(n_min, 1), 24))
    budget = draw(st.integers(0, n * n_max + 10))
    initial = draw(st.integers(0, 30))
    if equal_history:
        history = [draw(st.integers(0, 40))] * n
    else:
        history = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    priorities = draw(st.lists(priority_values, min_size=n, max_size=n))
    return history, priorities, budget, n_min, n_max, initial


@settings(max_examples=150, deadline=None)
@given(waves(), st.sampled_from(sorted(ALLOCATION_MODES)))
def test_sum_equals_clipped_budget_and_bounds_hold(wave, mode):
    history, priorities, budget, n_min, n_max, initial = wave
    counts = allocate_rollouts(history, priorities, budget, n_min, n_max, initial, mode=mode)
    n = len(history)
    assert sum(counts) == min(max(budget, n * n_min), n * n_max)
    assert all(n_min <= c <= n_max for c in counts)


@settings(max_examples=150, deadline=None)
@given(waves(equal_history=True), st.sampled_from(["reference", "neyman"]))
def test_monotone_in_priority_for_equal_history(wave, mode):
    history, priorities, budget, n_min, n_max, initial = wave
    counts = allocate_rollouts(history, priorities, budget, n_min, n_max, initial, mode=mode)
    for i in range(len(counts)):
        for j in range(len(counts)):
            if priorities[i] > priorities[j]:
                assert counts[i] >= counts[j], (i, j)


@settings(max_examples=100, deadline=None)
@given(waves(equal_history=True), priority_values, st.sampled_from(["reference", "neyman"]))
def test_equal_priorities_give_uniform(wave, priority, mode):
    history, _, budget, n_min, n_max, initial = wave
    priorities = [priority] * len(history)
    counts = allocate_rollouts(history, priorities, budget, n_min, n_max, initial, mode=mode)
    assert counts == allocate_rollouts(history, priorities, budget, n_min, n_max, initial, mode="uniform")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=16))
def test_real_priorities_respect_invariants(stats):
    history = [g for g, _ in stats]
    priorities = [prompt_priority(g, min(k, g)) for g, k in stats]
    counts = allocate_rollouts(history, priorities, 16 * len(stats), 8, 24, 4)
    assert sum(counts) == 16 * len(stats)
    assert all(8 <= c <= 24 for c in counts)
