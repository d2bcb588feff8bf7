"""A short run_async.py run of the tiny preset: held-out evaluation runs on the actor, coordinated by the buffer."""

from __future__ import annotations

import pytest

from common.metrics import read_metrics
from test_run_async import _command, _processes_mentioning, _run

pytestmark = pytest.mark.integration


def test_a_run_evaluates_its_first_and_last_version_on_the_actors(tmp_path):
    proc = _run(_command(tmp_path, "evals", "--learner.total-steps", "6", "--run.eval-every", "0", "--quiet"))
    run_dir = tmp_path / "evals"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["role"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6]  # eval_every 0: the start and the end only
    first, last = evals
    # Version 0's job starts on the initial weights; training goes on meanwhile, so an actor that moved on to newer
    # weights for a training lease evaluates its later items with them (and says so). Version 6 is the last.
    assert first["eval/weights_version_min"] == 0 and first["eval/weights_version_max"] <= 6
    assert last["eval/weights_version_min"] == last["eval/weights_version_max"] == 6
    assert last["eval/learner_step"] == 6
    learner = [r for r in records if r["role"] == "learner"]
    assert learner and not any("time/eval_s" in r or "eval/pass@1" in r for r in learner)
    assert (f"held-out pass@1: {first['eval/pass@1']:.3f} (step 0) -> {last['eval/pass@1']:.3f} (step 6)"
            in proc.stdout), proc.stdout
    assert _processes_mentioning(str(run_dir)) == []
