"""The run's progress display: phase derived from what the roles write, the one-line form for log files, the live
panel's text, and which form a run gets (terminal, log file, --quiet)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from common.config import PRESETS, with_overrides
from common.progress import ProgressDisplay, RunStatus, RunWatch, render_status, sparkline, status_line

pytestmark = pytest.mark.unit

WARNING = "only 3% of recent groups have reward variance: use harder prompts or a larger task"


def _cfg(**learner):
    cfg = PRESETS["tiny"]()
    return with_overrides(cfg, run={"eval_every": 5}, learner={"total_steps": 40, **learner})


def _append(run_dir: Path, *records: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _status(**fields) -> RunStatus:
    base = dict(run_name="x", phase="training", detail="", step=12, total_steps=40, elapsed_s=151.0, version=12,
                eta_s=100.0, rewards=(0.1, 0.2, 0.41), evals=((0, 0.05), (10, 0.23)), samples=5300,
                samples_per_s=35.14, learner_idle=0.12, actor_idle=0.3, queue=3, staleness=0.84, actors_alive=1,
                actors_total=2, actors_registered=1)
    base.update(fields)
    return RunStatus(**base)


def test_status_line_names_phase_and_every_number():
    line = status_line(_status())
    assert line == ("training | step 12/40 v12 | reward 0.41 | eval@1 0.23 | samples/s 35.1 | idle 12% | queue 3 | "
                    "stale 0.8 | actors 1/2 | 02:31 | eta 01:40")


def test_status_line_before_any_data_says_loading_not_zero_throughput():
    line = status_line(_status(phase="loading", detail="actors registered 0/2", step=0, version=None, eta_s=None,
                               rewards=(), evals=(), samples=None, samples_per_s=None, learner_idle=None,
                               queue=None, staleness=None, actors_alive=None))
    assert line == ("loading (actors registered 0/2) | step 0/40 v? | reward - | eval@1 - | samples/s - | idle - | "
                    "queue ? | stale - | actors ?/2 | 02:31 | eta -")


def _text(renderable, width: int = 110) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_status_shows_phase_progress_trends_and_warning():
    text = _text(render_status(_status(phase="evaluating", detail="held-out evaluation due at step 13",
                                       warning=WARNING)))
    assert "evaluating" in text and "held-out evaluation due at step 13" in text
    assert "12/40" in text and "30%" in text and "ETA 01:40" in text and "elapsed 02:31" in text
    assert sparkline((0.1, 0.2, 0.41)) in text and "0.410" in text
    assert "0.05 → 0.23" in text and "(step 10)" in text
    assert "learner 12%" in text and "actors 30%" in text
    assert "queue 3 groups" in text and "staleness 0.8 versions" in text
    assert "1/2 alive, 1 registered at the buffer" in text
    assert WARNING in text


def test_render_status_without_warning_has_no_warning_line():
    assert "⚠" not in _text(render_status(_status(warning="")))


def test_a_suite_run_shows_the_suite_average_beside_pass_at_1(tmp_path):
    cfg = with_overrides(_cfg(), run={"eval_suite": "math6", "eval_samples": 4})
    watch = RunWatch(tmp_path, cfg, actors_alive=lambda: 1, clock=Clock(1000.0))
    _append(tmp_path, {"role": "eval", "step": 0, "time": 1001.0, "eval/pass@1": 0.05, "eval/suite/avg@4": 0.125},
            {"role": "eval", "step": 10, "time": 1002.0, "eval/pass@1": 0.25, "eval/suite/avg@4": 0.375})
    status = watch.update({"clients": {"learner": 1, "actor": 1}})
    assert status.suite == ((0, 0.125), (10, 0.375)) and status.suite_label == "math6 avg@4"
    assert "| eval@1 0.25 | math6 avg@4 0.38 |" in status_line(status)
    text = _text(render_status(status))
    assert "math6 avg@4" in text and "0.12 → 0.38" in text
    # Without a suite neither form names one.
    plain = RunWatch(tmp_path, _cfg(), actors_alive=lambda: 1, clock=Clock(1000.0)).update({})
    assert plain.suite_label == "" and "avg@" not in status_line(plain) and "avg@" not in _text(render_status(plain))


def test_sparkline_scales_between_min_and_max():
    # 0 -> lowest block, 1 -> highest, 0.5 -> 0.5 * 7 = 3.5 rounds to index 4 ("▅")
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([0.3, 0.3]) == "▄▄"


def test_phase_follows_the_roles_from_loading_to_shutdown(tmp_path):
    clock = Clock(1000.0)
    watch = RunWatch(tmp_path, _cfg(), actors_alive=lambda: 1, clock=clock)
    # Nothing written yet, buffer not answering: the models are loading.
    assert watch.update({}).phase == "loading"
    # Buffer up, only the actor registered.
    status = watch.update({"clients": {"actor": 1}, "samples_received": 0, "policy_version": 0})
    assert (status.phase, status.actors_registered) == ("loading", 1)
    # The learner registered and waits for groups; the actors evaluate version 0 alongside (the buffer's job).
    status = watch.update({"clients": {"learner": 1, "actor": 1}, "eval_pending": [0]})
    assert status.phase == "training" and "first batch" in status.detail and "evaluating v0 alongside" in status.detail
    _append(tmp_path, {"role": "eval", "step": 0, "time": 1001.0, "eval/pass@1": 0.05})
    status = watch.update({"clients": {"learner": 1, "actor": 1}, "eval_pending": []})
    assert status.phase == "training" and "alongside" not in status.detail and status.evals == ((0, 0.05),)
    # Steps 1..4 one second apart; 36 steps left at 1 step/s.
    _append(tmp_path, *({"role": "learner", "step": s, "time": 1010.0 + s, "time/step_s": 0.5,
                         "time/idle_fraction": 0.25, "reward/mean": 0.1 * s} for s in range(1, 5)))
    clock.now = 1015.0
    status = watch.update({"clients": {"learner": 1, "actor": 1}})
    assert (status.phase, status.step, status.eta_s) == ("training", 4, 36.0)
    assert status.rewards == pytest.approx((0.1, 0.2, 0.3, 0.4)) and status.learner_idle == 0.25
    # The learner finished; the supervisor waits for the last evaluation.
    watch.final_evaluation = True
    status = watch.update({"eval_pending": [40]})
    assert status.phase == "evaluating" and "v40" in status.detail
    watch.shutting_down = True
    assert watch.update({}).phase == "shutting down"


def test_a_resumed_run_loads_and_its_eta_ignores_the_old_run(tmp_path):
    # The stopped run reached step 10 (evaluated there) an hour before this display started.
    _append(tmp_path, *({"role": "learner", "step": s, "time": 400.0 + s, "time/step_s": 0.5, "reward/mean": 0.2}
                        for s in range(1, 11)), {"role": "learner", "step": 10, "time": 410.5, "eval/pass@1": 0.3})
    clock = Clock(4000.0)
    watch = RunWatch(tmp_path, _cfg(), clock=clock)
    status = watch.update({"clients": {}})
    assert (status.phase, status.step, status.rewards[-1]) == ("loading", 10, 0.2)  # history shown, learner loading
    # The resumed learner re-sends its weights (a record without a training step); evaluation 10 is not repeated.
    _append(tmp_path, {"role": "learner", "step": 10, "time": 4010.0, "time/sync_s": 0.1})
    assert watch.update({"clients": {"learner": 1}}).phase == "training"
    _append(tmp_path, *({"role": "learner", "step": s, "time": 4020.0 + 2 * (s - 10), "time/step_s": 1.0}
                        for s in (11, 12)))
    clock.now = 4025.0
    # Pace from this run only: 1 step per 2 s, 28 steps left -> 56 s (the old run's records would give ~1 h).
    status = watch.update({"clients": {"learner": 1}})
    assert status.eta_s == pytest.approx(56.0) and status.evals == ((10, 0.3),)  # the old run's evaluation


def test_silence_before_an_ordinary_step_stays_training(tmp_path):
    clock = Clock(1900.0)
    watch = RunWatch(tmp_path, _cfg(), clock=clock)
    _append(tmp_path, *({"role": "learner", "step": s, "time": 1990.0 + s, "time/step_s": 0.5} for s in (1, 2)))
    clock.now = 2060.0  # a minute of silence, but step 3 has no evaluation
    assert (watch.update({"clients": {"learner": 1}}).phase, watch.update({}).detail) == ("training", "")


def test_after_the_last_step_no_evaluation_is_expected(tmp_path):
    clock = Clock(2900.0)
    watch = RunWatch(tmp_path, _cfg(total_steps=10), clock=clock)
    _append(tmp_path, *({"role": "learner", "step": s, "time": 2980.0 + s, "time/step_s": 0.5} for s in (9, 10)))
    clock.now = 3030.0  # the learner checkpoints and exits after step 10; there is no step 11 to evaluate
    status = watch.update({"clients": {"learner": 1}})
    assert (status.phase, status.detail, status.eta_s) == ("training", "all steps done: final checkpoint", 0.0)


def test_samples_per_s_over_the_recent_window_and_buffer_restart(tmp_path):
    clock = Clock(0.0)
    watch = RunWatch(tmp_path, _cfg(), clock=clock)
    assert watch.update({"samples_received": 0}).samples_per_s is None  # one point: no rate yet
    clock.now = 10.0
    assert watch.update({"samples_received": 300}).samples_per_s == pytest.approx(30.0)  # 300 / 10 s
    clock.now = 50.0  # the t=0 point leaves the 30 s window: (900 - 300) / (50 - 10) = 15
    assert watch.update({"samples_received": 900}).samples_per_s == pytest.approx(15.0)
    clock.now = 55.0  # counter went back (buffer restored from an older snapshot): start over
    assert watch.update({"samples_received": 850}).samples_per_s is None


def test_actor_idle_is_the_mean_of_each_actors_newest_record(tmp_path):
    watch = RunWatch(tmp_path, _cfg(), clock=Clock(0.0))
    _append(tmp_path, {"role": "actor0", "step": 1, "time": 1.0, "rollout/idle_fraction": 0.9},
            {"role": "actor0", "step": 2, "time": 2.0, "rollout/idle_fraction": 0.2},
            {"role": "actor1", "step": 1, "time": 2.0, "rollout/idle_fraction": 0.4})
    assert watch.update({}).actor_idle == pytest.approx(0.3)  # (0.2 + 0.4) / 2


def test_log_file_mode_prints_one_line_per_tick_plus_the_warning(tmp_path):
    out = io.StringIO()
    display = ProgressDisplay(tmp_path, _cfg(), console=Console(file=out, width=200, highlight=False))
    assert display.mode == "lines" and display.refresh_s == 5.0
    display.tick({"clients": {}, "queue_depth": 0, "policy_version": 0, "low_yield_warning": ""})
    display.tick({"clients": {}, "queue_depth": 0, "policy_version": 0, "low_yield_warning": WARNING})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("loading (starting the roles and loading the model · actors registered 0/1) | "
                               "step 0/40")
    assert lines[2] == f"warning: {WARNING}"


def test_quiet_prints_nothing_and_a_terminal_gets_the_live_panel(tmp_path):
    out = io.StringIO()
    quiet = ProgressDisplay(tmp_path, _cfg(), quiet=True, console=Console(file=out, width=200))
    quiet.note("run directory: x")
    quiet.tick({"low_yield_warning": WARNING})
    quiet.shutting_down()
    assert out.getvalue() == ""
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    live = ProgressDisplay(tmp_path, _cfg(), console=terminal)
    assert live.mode == "live" and live.refresh_s == 1.0
