"""Math of the two stand-alone benchmarks: closed-form allocation variance and the cluster simulator.

Expected values are worked by hand in the comments beside the asserts.
"""

import dataclasses
import json
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import allocation_variance as av  # noqa: E402
import simulate_cluster as sc  # noqa: E402
from buffer.allocation import allocate_rollouts  # noqa: E402

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------ allocation variance


def test_two_prompts_uniform_vs_neyman_by_hand():
    p = np.array([0.5, 0.1])
    # σ² = p(1-p) = 0.25 and 0.09, so σ = 0.5 and 0.3. Budget 8.
    # Uniform (4, 4): 0.25/4 + 0.09/4 = 0.0625 + 0.0225 = 0.085.
    assert av.batch_gradient_variance(p, av.uniform_allocation(2, 8)) == pytest.approx(0.085)
    # Neyman n ∝ σ: 8·0.5/0.8 = 5 and 8·0.3/0.8 = 3 -> 0.25/5 + 0.09/3 = 0.05 + 0.03 = 0.08,
    # which is the Cauchy-Schwarz minimum (Σσ)²/B = 0.8²/8 = 0.08.
    n = av.neyman_bound(np.sqrt(p * (1 - p)), 8, 1, 8)
    assert n == pytest.approx([5.0, 3.0], abs=1e-9)
    assert av.batch_gradient_variance(p, n) == pytest.approx(0.08)
    # The library's integer neyman allocation finds the same (5, 3) from the exact priorities.
    counts = allocate_rollouts([1e6, 1e6], [0.25, 0.09], 8, 1, 8, 1, mode="neyman")
    assert counts == [5, 3]


def test_uniform_allocation_equals_formula():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=10)
    budget = 10 * 16
    library = allocate_rollouts([16] * 10, [0.1] * 10, budget, 8, 24, 8, mode="uniform")
    assert list(av.uniform_allocation(10, budget)) == library == [16] * 10
    # Every n_i = B/N = 16, so V = Σ p(1-p) / 16.
    assert av.batch_gradient_variance(p, np.array(library)) == pytest.approx(np.sum(p * (1 - p)) / 16)


def test_neyman_bound_respects_bounds_by_hand():
    # σ = (0.5, 0.3, 0), budget 12 in [2, 6]. The σ=0 prompt sits at n_min = 2, leaving 10.
    # c·0.5 and c·0.3 with c = 12.5 give 6.25 and 3.75; the first is capped at 6, so the second takes 4 (c = 13.3).
    n = av.neyman_bound(np.array([0.5, 0.3, 0.0]), 12, 2, 6)
    assert n == pytest.approx([6.0, 4.0, 2.0], abs=1e-6)


def test_oracle_ratio_is_one_when_all_prompts_equal():
    # Equal σ everywhere: uniform is already Neyman-optimal, so every method's ratio is 1.
    ratios = av.variance_ratios(np.full(16, 0.3), 16, np.random.default_rng(0), 16, 8, 24)
    assert ratios["oracle_neyman"] == pytest.approx(1.0)
    assert ratios["bound"] == pytest.approx(1.0)


def test_snapshot_loaders(tmp_path):
    # Buffer-style msgpack: the undecayed totals win over the decayed samples/correct; G = 0 is skipped.
    snap = {"format": 1, "stats": {"a": {"samples": 2.0, "correct": 2.0, "total_samples": 4, "total_correct": 1},
                                   "b": {"samples": 0.0, "correct": 0.0, "total_samples": 0, "total_correct": 0},
                                   "c": {"samples": 8.0, "correct": 6.0, "total_samples": 8, "total_correct": 6}}}
    (tmp_path / "s.msgpack").write_bytes(msgspec.msgpack.encode(snap))
    assert av.load_snapshot_success(tmp_path / "s.msgpack") == pytest.approx([0.25, 0.75])
    (tmp_path / "s.json").write_text(json.dumps({"prompts": [{"G": 10, "k": 3}, {"G": 5, "k": 5}]}))
    assert av.load_snapshot_success(tmp_path / "s.json") == pytest.approx([0.3, 1.0])


# ------------------------------------------------------------------------------------------- simulator


def _one_engine(**overrides) -> sc.SimConfig:
    # 4 groups x 16 samples = 64 sequences fill the 64 slots at once. Fixed 100-token responses, no prompt tokens.
    # A decode step with 64 running takes 64/640 = 0.1 s, so generation = 100 x 0.1 = 10 s.
    # Training: 64 x 100 = 6400 tokens at 1280 tokens/s = 5 s.
    base = dict(engines=1, slots_per_engine=64, engine_tokens_per_s=640.0, learner_tokens_per_s=1280.0,
                sync_time_s=0.0, groups_per_step=4, samples_per_group=16, prompt_tokens=0, length_dist="fixed",
                median_tokens=100, max_new_tokens=100, max_staleness=0, steps=10)
    base.update(overrides)
    return sc.SimConfig(**base)


def test_sync_steps_per_hour_by_hand():
    r = sc.simulate(_one_engine())
    # Generation and training alternate: 3600 / (10 + 5) = 240 steps per hour.
    assert r.steps_per_hour == pytest.approx(240.0, rel=1e-9)
    # The learner works 5 of every 15 s; the engine 10 of every 15 s.
    assert r.learner_idle_fraction == pytest.approx(2 / 3)
    assert r.engine_idle_fraction == pytest.approx(1 / 3)
    assert r.staleness_hist == {0: 40}


def test_sync_time_adds_to_the_cycle():
    r = sc.simulate(_one_engine(sync_time_s=3.0))
    # 3600 / (10 + 5 + 3) = 200.
    assert r.steps_per_hour == pytest.approx(200.0, rel=1e-9)


@pytest.mark.parametrize("max_staleness", [1, 2, 4])
def test_async_throughput_approaches_slower_stage(max_staleness):
    steps = 50
    # gen = train = 10 s (learner at 640 tokens/s). Only the first batch cannot overlap with training, so the run
    # takes (steps + 1) x 10 s: steps/hour = 3600·50/510 = 352.9, i.e. 1/(N+1) = 2% below the ideal 360. The
    # tolerance is exactly that pipeline-fill term, so any further stall fails the test.
    r = sc.simulate(_one_engine(learner_tokens_per_s=640.0, max_staleness=max_staleness, steps=steps))
    assert r.steps_per_hour == pytest.approx(3600 * steps / ((steps + 1) * 10.0), rel=1e-9)
    assert r.steps_per_hour >= 0.98 * 3600 / 10.0 * (1 - 1e-9)


@pytest.mark.parametrize("max_staleness", [0, 1, 2, 4])
def test_admission_never_exceeds_max_staleness(max_staleness):
    cfg = sc.SimConfig(engines=3, slots_per_engine=32, engine_tokens_per_s=3200.0, learner_tokens_per_s=20_000.0,
                       sync_time_s=0.5, groups_per_step=8, samples_per_group=4, median_tokens=200,
                       length_sigma=1.0, max_new_tokens=2000, max_staleness=max_staleness, steps=25, seed=1)
    r = sc.simulate(cfg)
    assert max(r.staleness_hist) <= max_staleness
    assert r.max_admission_excess <= 0  # served + queued + in_flight never passed (V + s + 1) x groups_per_step
    if max_staleness >= 1:
        assert max_staleness in r.staleness_hist  # the window is actually used, so the bound is not vacuous


def test_fixed_lengths_need_no_drops():
    # Groups finish in lease order, so admission control alone keeps staleness within the bound.
    r = sc.simulate(_one_engine(max_staleness=2, learner_tokens_per_s=640.0, steps=20))
    assert r.groups_dropped_stale == 0
    assert max(r.staleness_hist) <= 2


def test_simulation_is_deterministic_under_seed():
    cfg = sc.SimConfig(engines=2, slots_per_engine=16, groups_per_step=4, samples_per_group=4, steps=6, seed=7)
    assert sc.simulate(cfg) == sc.simulate(cfg)
    assert sc.simulate(cfg).wall_s != sc.simulate(dataclasses.replace(cfg, seed=8)).wall_s


def test_cpu_ideal_ratio_by_hand():
    args = sc.ValidateArgs(gen_time_s=8.0, train_time_s=22.0, sync_time_s=0.0, cores=2, gen_cores=1)
    # Sync: 8 + 22 = 30 s per step. Async on one core each (linear scaling): gen 16 s, train 44 s -> 44 s per step.
    assert sc.ideal_cpu_ratio(args) == pytest.approx(30 / 44)
    report = sc.validate(dataclasses.replace(args, steps=30))
    # The simulator loses only the pipeline fill (one 16 s generation, 30 steps): 30/(30·44 + 16) x 30 vs 30/44.
    assert report["sim_ratio"] == pytest.approx(30 / 44 * 30 * 44 / (30 * 44 + 16), rel=1e-6)
