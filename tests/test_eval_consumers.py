"""Readers of held-out evaluation records (role `eval`, step = evaluated version): the metrics helper, the final
summary, the run report and the learning-curve benchmark, on a hand-written run directory."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _runs  # noqa: E402
from bench import learning_curves as lc  # noqa: E402
from common.config import PRESETS  # noqa: E402
from common.metrics import eval_records  # noqa: E402
from common.progress import final_report  # noqa: E402
from common.report import load_run  # noqa: E402

pytestmark = pytest.mark.unit

RECORDS = [
    {"role": "learner", "step": 1, "time": 1004.0, "time/fetch_wait_s": 1.0, "time/step_s": 3.0},
    {"role": "learner", "step": 2, "time": 1008.0, "time/fetch_wait_s": 0.0, "time/step_s": 4.0,
     "time/checkpoint_s": 1.0},
    # Written when the actors finished each evaluation: version 0's after step 1, version 2's later still.
    {"role": "eval", "step": 0, "time": 1005.0, "eval/pass@1": 0.125, "eval/pass@2": 0.25,
     "eval/mean_reward@2": 0.1},
    {"role": "eval", "step": 2, "time": 1011.0, "eval/pass@1": 0.5, "eval/pass@2": 0.75, "eval/mean_reward@2": 0.4},
    {"role": "actor0", "step": 1, "time": 1000.0, "rollout/samples_per_s": 10.0},
    {"role": "actor0", "step": 2, "time": 1004.0, "rollout/samples_per_s": 10.0},
    {"role": "actor0", "step": 3, "time": 1010.0, "rollout/samples_per_s": 5.0},
]


def _write(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_eval_records_prefer_the_eval_role_and_keep_older_runs_readable():
    old = {"role": "learner", "step": 2, "time": 1.0, "eval/pass@1": 0.9}
    older_only = {"role": "learner", "step": 4, "time": 2.0, "eval/pass@1": 0.7}
    picked = eval_records([old, older_only, *RECORDS])
    assert [(r["step"], r["eval/pass@1"]) for r in picked] == [(0, 0.125), (2, 0.5), (4, 0.7)]


def test_final_summary_reads_the_eval_records(tmp_path):
    run_dir = _write(tmp_path / "run", RECORDS)
    out = io.StringIO()
    assert final_report(run_dir, PRESETS["tiny"](), "completed", Console(file=out, width=200)) == 0
    # pass@k with k = run.eval_samples of the tiny preset (8) is not in these records: nan.
    assert "held-out pass@1: 0.125 (step 0) -> 0.500 (step 2)" in out.getvalue()


def test_report_collects_the_eval_records(tmp_path):
    data = load_run(_write(tmp_path / "run", RECORDS))
    assert [r["step"] for r in data.evals] == [0, 2] and len(data.learner) == 2


def test_learning_curve_places_each_evaluation_at_its_version(tmp_path):
    run = _runs.load_run(_write(tmp_path / "run", RECORDS))
    curve = lc.eval_curve(run)
    assert curve["step"] == [0, 2] and curve["pass@1"] == [0.125, 0.5]
    assert curve["mean_reward@k"] == [0.1, 0.4]
    # Version 0: the training window's start, step 1's start = 1004 - 3 - 1 = 1000. Version 2: its step ended at
    # 1008 - 1 (checkpoint) = 1007, not when the evaluation record was written (1011).
    assert curve["wall_s"] == pytest.approx([0.0, 7.0])
    # Samples (actor records): the later leases made 10/s x 4 s = 40 and 5/s x 6 s = 30; the first one is given
    # their median, 35, ending at 1000. At 1000 -> 35; at 1007 -> 35 + 40 + 30 x 3/6 = 90.
    assert curve["samples"] == pytest.approx([35.0, 90.0])
