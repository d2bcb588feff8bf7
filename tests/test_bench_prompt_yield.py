"""bench/prompt_yield.py's per-run numbers on hand-written counters and records (expected values worked beside)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import prompt_yield as py  # noqa: E402

pytestmark = pytest.mark.unit

RECORDS = [
    {"role": "learner", "step": 0, "time": 100.0, "eval/pass@1": 0.1},
    {"role": "actor0", "step": 1, "time": 100.0, "rollout/samples_per_s": 9.0, "rollout/tokens_per_s": 50.0,
     "rollout/response_length/mean": 10.0},  # first record: its start is unknown, left out
    # dt 4 s at 5 samples/s = 20 samples x 10 tokens = 200 tokens at 100 tokens/s = 2 s of generation
    {"role": "actor0", "step": 2, "time": 104.0, "rollout/samples_per_s": 5.0, "rollout/tokens_per_s": 100.0,
     "rollout/response_length/mean": 10.0},
    # dt 2 s at 6 samples/s = 12 samples x 5 tokens = 60 tokens at 20 tokens/s = 3 s
    {"role": "actor0", "step": 3, "time": 106.0, "rollout/samples_per_s": 6.0, "rollout/tokens_per_s": 20.0,
     "rollout/response_length/mean": 5.0},
    # a second actor: dt 10 s at 1 sample/s = 10 samples x 8 tokens = 80 tokens at 80 tokens/s = 1 s
    {"role": "actor1", "step": 1, "time": 95.0, "rollout/samples_per_s": 1.0, "rollout/tokens_per_s": 80.0,
     "rollout/response_length/mean": 8.0},
    {"role": "actor1", "step": 2, "time": 105.0, "rollout/samples_per_s": 1.0, "rollout/tokens_per_s": 80.0,
     "rollout/response_length/mean": 8.0},
    {"role": "learner", "step": 1, "time": 103.0, "time/step_s": 2.0},
    {"role": "learner", "step": 2, "time": 107.0, "time/step_s": 2.0},
    {"role": "eval", "step": 2, "time": 110.0, "eval/pass@1": 0.4},
]


def test_generation_seconds_by_hand():
    actor0 = [r for r in RECORDS if r["role"] == "actor0"]
    assert py.generation_seconds(actor0) == pytest.approx(2.0 + 3.0)


def test_summarize_run_by_hand():
    counters = {"groups_received": 40, "groups_zero_variance": 30, "samples_received": 320, "prompts_skipped": 7}
    out = py.summarize_run(counters, RECORDS)
    assert out["steps"] == 2
    assert out["informative_groups"] == 10
    assert out["yield"] == pytest.approx(10 / 40)
    assert out["samples_per_informative_group"] == pytest.approx(320 / 10)
    assert out["generation_s_per_step"] == pytest.approx((2.0 + 3.0 + 1.0) / 2)  # both actors over 2 steps
    assert out["final_pass@1"] == 0.4  # the last evaluation by step, whichever role wrote it
    assert out["prompts_skipped"] == 7


def test_no_informative_group_gives_nan_not_an_error():
    out = py.summarize_run({"groups_received": 5, "groups_zero_variance": 5, "samples_received": 20}, [])
    assert math.isnan(out["samples_per_informative_group"]) and out["yield"] == 0.0


def test_report_compares_a_skipping_arm_with_its_plain_arm():
    plain = [{"yield": 0.25, "samples_per_informative_group": 32.0, "generation_s_per_step": 3.0,
              "prompts_skipped": 0, "final_pass@1": 0.4}]
    skip = [{"yield": 0.5, "samples_per_informative_group": 16.0, "generation_s_per_step": 2.0,
             "prompts_skipped": 9, "final_pass@1": 0.4}]
    text = py.report({"dynamo": plain, "dynamo-skip": skip}, baseline="dynamo")
    assert "| DynaMO + skipping | 1 | 0.500 | 16.0 |" in text
    assert "16.0 = 0.50x DynaMO's 32.0" in text  # 16 / 32


def test_simulation_skipping_raises_the_yield_of_a_fixed_difficulty_pool():
    """The buffer's leasing alone (deterministic under the seed): with prompt skipping on, the prompts that are never
    or always solved stop taking rollouts, so more of the generated groups have reward variance."""
    off = py.simulate("dynamo", pool=32, groups=400, seed=0)
    on = py.simulate("dynamo-skip", pool=32, groups=400, seed=0)
    assert off["prompts_skipped"] == 0 and on["prompts_skipped"] > 0
    assert on["yield"] > off["yield"] + 0.1, (on, off)
    assert on["samples_per_informative_group"] < off["samples_per_informative_group"]
    assert off["mixed_prompts"] == on["mixed_prompts"]  # the same pool


def test_wall_time_and_time_to_target_by_hand():
    # First record at t = 95 (actor1). Learner steps end at 103 (step 1) and 107 (step 2): wall 107 - 95 = 12 s.
    # Target 0.3: version 0 has 0.1, version 2 has 0.4 -> reached when the learner finished step 2: 12 s, 2 steps.
    out = py.summarize_run({"groups_received": 1, "samples_received": 1}, RECORDS, target=0.3)
    assert out["wall_s"] == pytest.approx(12.0)
    assert (out["wall_s_to_target"], out["steps_to_target"]) == (pytest.approx(12.0), 2.0)
    # Version 0 already at the target: 0 s, 0 steps; never reached: NaN.
    assert py.time_to_target(RECORDS, 0.1) == (0.0, 0.0)
    assert all(math.isnan(x) for x in py.time_to_target(RECORDS, 0.9))
    assert math.isnan(py.summarize_run({}, RECORDS)["wall_s_to_target"])  # no --target
