"""metrics.jsonl after a disk-full event: readers skip and count torn lines; writers never crash their role and
start the record after a torn line on a line of its own.

The torn lines are made the way a full disk makes them: a real short write under RLIMIT_FSIZE (the kernel writes
what fits and refuses the rest) and a real ENOSPC from /dev/full.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from common.config import PRESETS
from common.metrics import MetricsLogger, read_metrics, read_metrics_counted
from common.progress import MetricsTail, final_report

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def _line(role: str, step: int, **fields) -> str:
    return json.dumps({"role": role, "step": step, "time": 0.0, **fields}) + "\n"


def _torn_run_dir(tmp_path: Path) -> Path:
    """Two learner evals, a record torn mid-line with the next record appended right after it, a torn tail."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torn = _line("learner", 2, **{"loss/policy": 0.5})[:17]  # '{"role": "learner' - the write stopped here
    (run_dir / "metrics.jsonl").write_text(
        _line("learner", 0, **{"eval/pass@1": 0.25})
        + torn + _line("actor0", 3, **{"rollout/reward/mean": 0.1})  # the merged line: neither record readable
        + _line("learner", 5, **{"eval/pass@1": 0.5})
        + '{"role": "learner", "step": 6, "eval/pa')  # torn tail, no newline
    return run_dir


def test_reader_skips_and_counts_torn_lines(tmp_path):
    run_dir = _torn_run_dir(tmp_path)
    records, skipped = read_metrics_counted(run_dir / "metrics.jsonl")
    # 5 lines: eval@0 ok, merged torn+actor line bad, eval@5 ok, torn tail bad -> 2 records, 2 skipped.
    assert [(r["role"], r["step"]) for r in records] == [("learner", 0), ("learner", 5)]
    assert skipped == 2
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", role="learner")] == [0, 5]


def test_reader_skips_lines_that_are_json_but_not_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("123\n" + '["a"]\n' + '{"step": 1}\n' + _line("learner", 1))
    records, skipped = read_metrics_counted(path)
    assert [r["step"] for r in records] == [1] and skipped == 3  # no role / not an object: not a record


def test_final_report_survives_a_torn_line_and_says_so(tmp_path):
    run_dir = _torn_run_dir(tmp_path)
    console = Console(record=True, width=200)
    assert final_report(run_dir, PRESETS["tiny"](), "completed", console) == 0
    text = console.export_text()
    assert "held-out pass@1: 0.250 (step 0) -> 0.500 (step 5)" in text
    assert "2 torn lines" in text


def test_progress_tail_skips_a_torn_line(tmp_path):
    run_dir = _torn_run_dir(tmp_path)
    tail = MetricsTail(run_dir / "metrics.jsonl")  # what the progress display reads on every refresh
    assert [(r["role"], r["step"]) for r in tail.new_records()] == [("learner", 0), ("learner", 5)]
    assert tail.skipped == 1  # the merged line; the torn tail may still be completed by its writer
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write("\n" + _line("learner", 7, **{"eval/pass@1": 0.75}))
    assert [r["step"] for r in tail.new_records()] == [7]
    assert tail.skipped == 2


def test_writer_survives_enospc_and_counts_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    logger = MetricsLogger(run_dir, "learner")
    logger.log(1, {"loss/policy": 1.0})
    logger.log(2, {"loss/policy": 2.0})
    assert logger.write_errors == 2
    logger.close()


_SHORT_WRITE = r"""
import resource, signal, sys
from common.metrics import MetricsLogger
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead of killing us
logger = MetricsLogger(sys.argv[1], "learner")
logger.log(1, {"loss/policy": 1.0})
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))   # the disk is full from here on
logger.log(2, {"loss/policy": 2.0, "perf/tokens_per_s": 123456.0})   # short write: a torn line
logger.log(3, {"loss/policy": 3.0})                                   # nothing fits: EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))               # space again
logger.log(4, {"loss/policy": 4.0})
print(logger.write_errors)
"""


def test_writer_after_a_short_write_starts_the_next_record_on_its_own_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = MetricsLogger(run_dir, "probe")
    first.log(0, {"loss/policy": 0.0})
    first.close()
    limit = 2 * (run_dir / "metrics.jsonl").stat().st_size + 20  # room for one more record and part of the next
    (run_dir / "metrics.jsonl").unlink()
    out = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(run_dir), str(limit)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 2  # the short write and the refused one
    records, skipped = read_metrics_counted(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 4]  # step 2 torn, step 3 never written, step 4 intact
    assert skipped == 1


def test_writer_after_a_torn_line_of_another_writer_starts_on_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_line("learner", 1) + '{"role": "learner", "st')  # a previous life died mid-write
    logger = MetricsLogger(tmp_path, "learner")
    logger.log(2, {"loss/policy": 2.0})
    with open(path, "a") as other:  # another role's write cut short while this logger is open
        other.write('{"role": "actor0", "step": 9, "rollout/rew')
    logger.log(3, {"loss/policy": 3.0})
    logger.close()
    records, skipped = read_metrics_counted(path)
    assert [r["step"] for r in records] == [1, 2, 3] and skipped == 2


def test_a_role_without_wandb_installed_still_logs_to_metrics_jsonl(tmp_path, monkeypatch, capsys):
    """wandb_mode "offline" on a host without wandb (a GPU node with only the core packages): warn, keep logging."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    logger = MetricsLogger(tmp_path, "buffer", wandb_mode="offline")
    logger.log(3, {"buffer/groups": 7})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["role"], r["step"], r["buffer/groups"]) for r in records] == [("buffer", 3, 7)]
    assert "wandb could not be imported" in capsys.readouterr().err
