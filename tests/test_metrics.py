"""metrics.jsonl writer: one record per line, several writers, namespace checks, non-finite values."""

import math
import multiprocessing as mp

import pytest

from common.metrics import MetricsLogger, read_metrics

pytestmark = pytest.mark.unit


def _write(run_dir, role, n):
    logger = MetricsLogger(run_dir, role)
    for i in range(n):
        logger.log(i, {"loss/policy": float(i), "perf/tokens_per_s": 10 * i})
    logger.close()


def test_records_from_several_processes_do_not_interleave(tmp_path):
    procs = [mp.get_context("spawn").Process(target=_write, args=(tmp_path, f"w{j}", 200)) for j in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 600
    for j in range(3):
        mine = read_metrics(tmp_path / "metrics.jsonl", role=f"w{j}")
        assert [r["step"] for r in mine] == list(range(200))  # each writer's order kept, nothing lost


def test_unknown_namespace_is_refused_and_nan_becomes_null(tmp_path):
    logger = MetricsLogger(tmp_path, "learner")
    with pytest.raises(ValueError, match="namespace"):
        logger.log(0, {"misc/thing": 1.0})
    logger.log(3, {"loss/policy": math.nan, "optim/lr": 1e-3})
    logger.close()
    (rec,) = read_metrics(tmp_path / "metrics.jsonl")
    assert rec["loss/policy"] is None and rec["optim/lr"] == 1e-3 and rec["step"] == 3 and rec["role"] == "learner"
