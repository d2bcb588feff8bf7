"""Summaries of the run-based benchmarks (bench/async_vs_sync.py, bench/learning_curves.py) on a synthetic run.

The run directory is written by hand: a metrics.jsonl with learner, actor0 and buffer records, a buffer snapshot
and the driver's bench_run.json. Expected values are worked in the comments beside the asserts.
"""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _runs  # noqa: E402
from bench import async_vs_sync as avs  # noqa: E402
from bench import learning_curves as lc  # noqa: E402
from buffer.state import BufferState, Counters, PromptRecord, encode_snapshot  # noqa: E402
from common.config import PRESETS  # noqa: E402

pytestmark = pytest.mark.unit

LEARNER = [
    # Initial evaluation, written at t = 1000 after 2 s of evaluation: the training window starts at 1000.
    {"step": 0, "time": 1000.0, "eval/pass@1": 0.0, "eval/pass@2": 0.0, "eval/mean_reward@2": 0.05,
     "time/eval_s": 2.0},
    {"step": 1, "time": 1004.0, "time/fetch_wait_s": 1.0, "time/step_s": 3.0, "reward/mean": 0.1},
    {"step": 2, "time": 1008.0, "time/fetch_wait_s": 0.0, "time/step_s": 4.0, "reward/mean": 0.2},
    # Last step: written at 1015 after a 3 s evaluation, so its training ended at 1012 (the window's end).
    {"step": 3, "time": 1015.0, "time/fetch_wait_s": 1.0, "time/step_s": 3.0, "time/eval_s": 3.0,
     "eval/pass@1": 0.25, "eval/pass@2": 0.5, "eval/mean_reward@2": 0.2},
]
ACTOR = [  # (time, rollout/samples_per_s, rollout/idle_fraction)
    (1000.0, 20.0, 0.0),  # first record: start unknown; given the median of the others (32) -> began at 998.4
    (1004.0, 8.0, 0.5),   # dt 4: 32 samples, 2 s busy, 2 s idle
    (1008.0, 10.0, 0.0),  # dt 4: 40 samples, 4 s busy
    (1012.0, 6.0, 0.25),  # dt 4: 24 samples, 3 s busy, 1 s idle
    (1016.0, 8.0, 0.0),   # dt 4: 32 samples, after the window's end (1012)
]
# Cumulative samples: (998.4, 0), (1000, 32), (1004, 64), (1008, 104), (1012, 128), (1016, 160).
BUFFER = [(995.0, 0), (1010.0, 140)]  # buffer records: not used for sample counts (logged only every 5 s)


def _write_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    lines = [{"role": "learner", **r} for r in LEARNER]
    lines += [{"role": "actor0", "step": i + 1, "time": t, "rollout/samples_per_s": sps,
               "rollout/idle_fraction": idle} for i, (t, sps, idle) in enumerate(ACTOR)]
    lines += [{"role": "buffer", "step": 0, "time": t, "buffer/samples_received": n} for t, n in BUFFER]
    lines.sort(key=lambda r: r["time"])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    state = BufferState(PRESETS["tiny"](), [PromptRecord("p0", "Which is larger, 3 or 8?", "8")])
    state.counters = Counters(samples_received=150, groups_served=12, staleness_hist={0: 4, 1: 6, 2: 2})
    (run_dir / "buffer_snapshot.msgpack").write_bytes(encode_snapshot(state.to_snapshot(1020.0)))
    (run_dir / _runs.RUN_RECORD).write_text(json.dumps({"started_at": 990.0, "wall_s": 60.0, "returncode": 0}))
    return run_dir


@pytest.fixture
def run(tmp_path):
    return _runs.load_run(_write_run(tmp_path / "run"))


def test_window_and_cumulative_samples(run):
    assert _runs.training_window(run.learner) == (1000.0, 1012.0)
    times, totals = zip(*run.sample_points)
    assert times == pytest.approx((998.4, 1000.0, 1004.0, 1008.0, 1012.0, 1016.0))
    assert totals == pytest.approx((0.0, 32.0, 64.0, 104.0, 128.0, 160.0))
    assert _runs.samples_at(run.sample_points, 1002.0) == pytest.approx(48.0)  # halfway through the 32-sample lease
    assert _runs.samples_at(run.sample_points, 2000.0) == 160.0  # clamped after the last lease
    assert _runs.samples_at(run.sample_points, 900.0) == 0.0
    # Without the step-0 record, the window starts when step 1 began: 1004 - 3 (step) - 1 (fetch wait) = 1000.
    assert _runs.training_window(run.learner[1:])[0] == pytest.approx(1000.0)


def test_two_actors_add_up():
    a = [{"time": 10.0, "rollout/samples_per_s": 4.0}, {"time": 12.0, "rollout/samples_per_s": 4.0}]  # 8, 8
    b = [{"time": 11.0, "rollout/samples_per_s": 2.0}, {"time": 13.0, "rollout/samples_per_s": 5.0}]  # 10, 10
    # a's first lease: median 8 at 4/s -> began at 8; b's first: 10 at 2/s -> began at 6.
    times, totals = zip(*_runs.sample_points({"actor0": a, "actor1": b}))
    assert times == pytest.approx((6.0, 10.0, 11.0, 12.0, 13.0))
    assert totals == pytest.approx((0.0, 8.0, 18.0, 26.0, 36.0))


def test_actor_stage_weights_each_record_by_its_interval(run):
    stage = avs.actor_stage(run.actors["actor0"], 1000.0, 1012.0)
    # Three records of 4 s each: idle 2 + 0 + 1 = 3 of 12 s; samples 32 + 40 + 24 = 96 over 2 + 4 + 3 = 9 busy s.
    assert stage["idle_fraction"] == pytest.approx(0.25)
    assert stage["busy_samples_per_s"] == pytest.approx(96 / 9)


def test_summarize_run_by_hand(run):
    s = avs.summarize_run(run)
    assert s["wall_s"] == 60.0 and s["window_s"] == 12.0 and s["steps"] == 3
    assert s["run_samples_per_s"] == pytest.approx(2.5)  # buffer total 150 / 60 s wall
    # Generated in the window: 128 - 32 = 96 samples, 96 / 3 = 32 per step, 96 / 12 = 8 samples/s.
    assert s["samples"] == pytest.approx(96.0)
    assert s["samples_per_s"] == pytest.approx(8.0)
    assert s["learner_idle"] == pytest.approx(2.0 / 12)  # fetch waits 1 + 0 + 1 over the 12 s window
    assert s["actor_idle"] == pytest.approx(0.25)
    # Train stage: mean step_s (3 + 4 + 3) / 3 = 3.33 s for 32 samples -> 9.6 samples/s; gen stage 96/9 = 10.67.
    assert s["train_samples_per_s"] == pytest.approx(9.6)
    assert s["gen_samples_per_s"] == pytest.approx(96 / 9)
    assert s["ideal_samples_per_s"] == pytest.approx(9.6)  # the slower stage
    assert s["efficiency"] == pytest.approx(8.0 / 9.6)  # 0.833
    assert s["gen_step_s"] == pytest.approx(3.0)  # 32 samples at 10.67 samples/s
    assert s["train_step_s"] == pytest.approx(10 / 3)
    assert s["pass@1"] == 0.25 and s["mean_reward@k"] == 0.2  # the final evaluation
    assert s["staleness_mean"] == pytest.approx(10 / 12)  # (0*4 + 1*6 + 2*2) / 12


def test_ratios_by_hand():
    sync = {"gen_step_s": 2.0, "train_step_s": 3.0, "window_s": 20.0}
    async_ = {"gen_step_s": 3.0, "train_step_s": 10 / 3, "window_s": 16.0}
    r = avs.ratios(sync, async_)
    # Ideal: (2 + 3) / max(3, 3.33) = 1.5; measured 20 / 16 = 1.25; 1.25 / 1.5 = 0.833.
    assert r["ideal_ratio"] == pytest.approx(1.5)
    assert r["measured_ratio"] == pytest.approx(1.25)
    assert r["measured_over_ideal"] == pytest.approx(1.25 / 1.5)


def test_summary_and_markdown_pair_seeds(run):
    one = avs.summarize_run(run)
    runs = {"sync": {0: {**one, "window_s": 20.0}, 1: {**one, "window_s": 24.0}},
            "async-s2": {0: one, 1: one}}
    out = avs.summarize(runs)
    # Both pairs: ideal (3 + 3.33) / 3.33 = 1.9; measured 20/12 = 1.667 and 24/12 = 2.0 -> mean 1.833,
    # sample std |2.0 - 1.667| / sqrt(2) = 0.2357.
    mean, std = out["ratios"]["async-s2"]["measured_ratio"]
    assert mean == pytest.approx(11 / 6) and std == pytest.approx((1 / 3) / math.sqrt(2))
    assert out["ratios"]["async-s2"]["ideal_ratio"][0] == pytest.approx(1.9)
    assert "sync" not in out["ratios"]
    table = avs.markdown(runs)
    assert "| async-s2 | 2 |" in table and "1.83 ± 0.24" in table


def test_specs_give_sync_all_cores_and_async_a_share_each():
    specs = avs.build_specs("tiny", [0], [0, 2], cores=2, steps=4)
    sync, async_ = (dict(zip(s.args[::2], s.args[1::2])) for s in specs)
    assert (sync["--actor.threads"], sync["--learner.threads"], sync["--algo.max-staleness"]) == ("2", "2", "0")
    assert (async_["--actor.threads"], async_["--learner.threads"]) == ("1", "1")
    one = avs.build_specs("tiny", [0], [0], cores=2, steps=4, sync_threads=1)[0]
    assert "-t1x1-" in one.name and one.name != specs[0].name  # never reuses a run with other threads
    assert _runs.split_threads(3) == (1, 2)  # the learner takes the odd core
    cmd = _runs.run_command(specs[0], "tiny", Path("/r"), 4, ["--run.seed", "9"])
    assert cmd[-2:] == ["--run.seed", "9"]  # --extra comes last, so it overrides
    assert cmd[cmd.index("--learner.total-steps") + 1] == "4"


def test_eval_curve_maps_steps_to_samples_and_wall(run):
    curve = lc.eval_curve(run)
    assert curve["step"] == [0, 3]
    # Step 0 ended before its 2 s evaluation: t = 998, before the first lease began (998.4) -> 0 samples; wall
    # time counts from there. Step 3 ended at 1015 - 3 = 1012 -> 128 samples, 1012 - 998 = 14 s.
    assert curve["samples"] == pytest.approx([0.0, 128.0])
    assert curve["wall_s"] == pytest.approx([0.0, 14.0])
    assert lc.eval_curve(_runs.RunData(**{**vars(run), "learner": run.learner[1:]}))["wall_s"] == pytest.approx(
        [22.0])  # no initial evaluation: from the launch (990)
    assert curve["pass@1"] == [0.0, 0.25] and curve["mean_reward@k"] == [0.05, 0.2]
    assert lc.value_at(curve, "samples", 64.0, "pass@1") == pytest.approx(0.125)  # halfway from 0 to 128
    assert math.isnan(lc.value_at(curve, "samples", 129.0, "pass@1"))  # beyond the last evaluation
    assert lc.samples_to_target(curve, "mean_reward@k", 0.1) == pytest.approx(128.0)
    assert lc.samples_to_target(curve, "mean_reward@k", 0.05) == pytest.approx(0.0)
    assert math.isnan(lc.samples_to_target(curve, "mean_reward@k", 0.5))


def test_learning_summary_uses_the_smallest_final_budget():
    a = {"samples": [0.0, 100.0, 200.0], "wall_s": [0.0, 10.0, 20.0], "pass@1": [0.0, 0.2, 0.4],
         "mean_reward@k": [0.0, 0.1, 0.3]}
    b = {"samples": [0.0, 150.0], "wall_s": [0.0, 30.0], "pass@1": [0.0, 0.3], "mean_reward@k": [0.0, 0.15]}
    out = lc.summarize({"grpo": {0: a}, "dynamo": {0: b}}, "mean_reward@k", 0.1)
    assert out["budget_samples"] == 150.0  # min(200, 150)
    assert out["configs"]["grpo"]["budget_pass@1"] == pytest.approx([0.3])  # 0.2 + 0.5 * (0.4 - 0.2)
    assert out["configs"]["grpo"]["final_pass@1"] == [0.4]
    assert out["configs"]["grpo"]["samples_to_target"] == [100.0]  # first evaluation with reward >= 0.1
    assert out["configs"]["dynamo"]["samples_to_target"] == [150.0]
    assert "GRPO" in lc.report(out) and "no verdict" in lc.report(out)  # one seed each: no noise estimate


def test_verdict_needs_two_standard_errors():
    # Means 0.6 vs 0.2, std 0.1 each: 2·SE = 2·sqrt(0.01/3 + 0.01/3) = 0.163 < 0.4 -> helps.
    assert lc.verdict("dynamo", "grpo", [0.5, 0.6, 0.7], [0.1, 0.2, 0.3], "x").endswith("it helps.")
    assert "HURTS" in lc.verdict("dynamo", "grpo", [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], "x")
    # Difference 0.05 < 2·SE 0.163: not measurable.
    assert "does NOT help" in lc.verdict("alloc", "grpo", [0.25, 0.35, 0.45], [0.2, 0.3, 0.4], "x")


def test_band_covers_the_common_range():
    curves = [{"samples": [0.0, 10.0], "y": [0.0, 1.0]}, {"samples": [0.0, 20.0], "y": [0.0, 4.0]}]
    grid, mean, std = lc.band(curves, "samples", "y")
    # Common range [0, 10]; at x = 10: y = 1 and 2 -> mean 1.5, sample std sqrt(0.25 + 0.25) = 0.707.
    assert grid[-1] == 10.0
    assert mean[-1] == pytest.approx(1.5) and std[-1] == pytest.approx(math.sqrt(0.5))


def test_failed_run_names_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(_runs.RunFailed, match=r"exited with status 3; see .*run_async\.log") as info:
        _runs.launch(cmd, tmp_path / "bad", timeout_s=30)
    assert "boom" in str(info.value)  # the log's tail is in the message
    assert not _runs.completed(tmp_path / "bad")


def test_rescore_heldout_scores_saved_answers_with_the_scorer_as_it_is(tmp_path):
    from bench import rescore_heldout
    from common.config import config_to_dict

    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(PRESETS["cpu-demo"]())))
    rows = [("Calculate -7 * 0.", "0", "-7 * 0 =", True),        # an echo, scored correct when it was saved
            ("Calculate 2 * 3.", "6", "2 * 3 equals 6.", True),
            ("Calculate 4 - 1.", "3", "4 - 1 equals 3.", False),  # saved as wrong, right now: gained
            ("Calculate 5 + 5.", "10", "5 + 5 equals 11.", False)]
    saved = tmp_path / "heldout512.json"
    saved.write_text(json.dumps({"checkpoint": str(tmp_path / "checkpoints" / "step_00000001"), "per_prompt": [
        {"prompt_id": f"basic_arithmetic-eval-{i}", "question": q, "answer": a, "greedy_response": text,
         "greedy_correct": ok, "sampled_correct": 0} for i, (q, a, text, ok) in enumerate(rows)]}))
    # saved 2 of 4 correct; now the echo is wrong and "4 - 1 equals 3." right: still 2 of 4, 1 lost, 1 gained
    assert rescore_heldout.rescore(saved) == {"prompts": 4, "saved": 0.5, "now": 0.5, "lost": 1, "gained": 1}
