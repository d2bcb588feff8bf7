"""The learner when its buffer dies: checkpoint first, then wait for the buffer or stop cleanly on SIGTERM; a
buffer restarted from an older snapshot is told the learner's version at once, so training resumes immediately.

Real processes: `buffer.server`, `actor.worker` (the tiny model) and `learner.train` on loopback; the buffer is
killed with SIGKILL. Assertions read metrics.jsonl, the checkpoints, the buffer's snapshot and the learner's log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from buffer.state import decode_snapshot
from common.config import PRESETS, save_config, with_overrides
from common.metrics import read_metrics
from common.processes import free_port
from learner.checkpoint import latest_checkpoint

# Each test takes ~30 s on an idle 2-core machine; the waits below allow for a machine shared with other work.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
BUFFER_TIMEOUT_S = 1.0


def _config(total_steps: int, checkpoint_every: int):
    return with_overrides(
        PRESETS["tiny"](),
        run={"wandb_mode": "disabled", "eval_every": 0},
        task={"eval_size": 0},
        buffer={"address": f"tcp://127.0.0.1:{free_port()}", "snapshot_interval_s": 600.0},
        learner={"total_steps": total_steps, "checkpoint_every": checkpoint_every, "sync_timeout_s": 20.0,
                 "buffer_timeout_s": BUFFER_TIMEOUT_S, "sync_address": f"127.0.0.1:{free_port()}",
                 "sync_control_address": f"tcp://127.0.0.1:{free_port()}"})


class Roles:
    """The three roles of a run as separate processes, each logging to <run_dir>/logs/<role>.log."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str, module: str, *extra: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.run_dir / "logs" / f"{role}.log", "ab") as log:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", module, "--config-file", str(self.run_dir / "config.json"),
                 "--run-dir", str(self.run_dir), *extra], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[role]

    def log(self, role: str) -> str:
        return (self.run_dir / "logs" / f"{role}.log").read_text(errors="replace")

    def learner_steps(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [r["step"] for r in read_metrics(path, role="learner") if r.get("loss/policy") is not None]

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            learner = self.procs.get("learner")
            assert learner is None or learner.poll() is None or what.startswith("exit"), \
                f"learner exited ({learner.poll()}) while waiting for {what}:\n{self.log('learner')[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log('learner')[-3000:]}"
            time.sleep(0.1)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start_run(tmp_path: Path, total_steps: int, checkpoint_every: int) -> tuple[Roles, object]:
    cfg = _config(total_steps, checkpoint_every)
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.json")
    roles = Roles(run_dir)
    roles.start("buffer", "buffer.server")
    roles.start("actor0", "actor.worker", "--actor-index", "0")
    roles.start("learner", "learner.train")
    return roles, cfg


def test_learner_checkpoints_when_the_buffer_is_lost_and_stops_cleanly_on_sigterm(tmp_path):
    roles, _ = _start_run(tmp_path, total_steps=500, checkpoint_every=0)
    try:
        roles.wait_for(lambda: len(roles.learner_steps()) >= 3, 300, "three learner steps")
        roles.procs["buffer"].kill()
        roles.procs["buffer"].wait()
        logged = max(roles.learner_steps())
        # Lost after three silent attempts of BUFFER_TIMEOUT_S (+ the 1 s long poll): about 6 s.
        roles.wait_for(lambda: "buffer lost: checkpointed version" in roles.log("learner"), 30,
                       "the learner to checkpoint for the lost buffer")
        version = int(re.search(r"buffer lost: checkpointed version (\d+)", roles.log("learner")).group(1))
        # The learner's version: the last logged step, or the one after it if the buffer died before that step's
        # version report (its record is written once the report is given up).
        assert logged <= version <= logged + 1, (logged, version)
        assert latest_checkpoint(roles.run_dir).name == f"step_{version:08d}"  # written before any signal
        sent = time.monotonic()
        roles.procs["learner"].send_signal(signal.SIGTERM)
        assert roles.procs["learner"].wait(15) == 0, roles.log("learner")[-3000:]
        assert time.monotonic() - sent < 5.0  # it was waiting for the buffer, not stuck in a request
        assert max(roles.learner_steps()) == version  # trained steps: all logged, none after the loss
        assert latest_checkpoint(roles.run_dir).name == f"step_{version:08d}"
        assert "Traceback" not in roles.log("learner")
    finally:
        roles.stop_all()


def test_learner_reannounces_its_version_to_a_buffer_restarted_behind_it(tmp_path):
    # No checkpoints, so no snapshot after the buffer's first: the restarted buffer is back at version 0 with an
    # empty queue, the limit of a snapshot older than the learner. It refuses the actor's groups (their tokens carry the learner's newer
    # version) and the learner's next report needs a batch, so without a report on reconnect nothing moves until
    # learner.fetch_timeout_s (600 s).
    roles, cfg = _start_run(tmp_path, total_steps=12, checkpoint_every=0)
    try:
        roles.wait_for(lambda: len(roles.learner_steps()) >= 4, 300, "four learner steps")
        roles.procs["buffer"].kill()
        roles.procs["buffer"].wait()
        killed_at = max(roles.learner_steps())
        snapshot = roles.run_dir / "buffer_snapshot.msgpack"  # at most the one written when the buffer started
        assert not snapshot.exists() or decode_snapshot(snapshot.read_bytes()).policy_version == 0
        roles.wait_for(lambda: "buffer lost" in roles.log("learner"), 30, "the learner to notice the lost buffer")
        roles.start("buffer", "buffer.server")
        # Seconds on an idle machine; the bound leaves room for a loaded one, far below fetch_timeout_s (600 s).
        roles.wait_for(lambda: killed_at + 2 in roles.learner_steps(), 120, "steps after the buffer came back")
        assert roles.procs["learner"].wait(240) == 0, roles.log("learner")[-3000:]
        assert roles.learner_steps() == list(range(1, cfg.learner.total_steps + 1))  # none lost or repeated
        # The report on reconnect: the learner's version then (killed_at, or killed_at + 1 if the buffer died
        # between that step's batch and its report), to a buffer at 0.
        reports = re.findall(r"reported version (\d+) to the buffer again \(.*; the buffer was at (\d+)\)",
                             roles.log("learner"))
        assert reports and killed_at <= int(reports[0][0]) <= killed_at + 1 and reports[0][1] == "0", reports
    finally:
        roles.stop_all()
