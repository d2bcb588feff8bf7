"""The SGLang path end to end on the CPU: run_async.py attached to sglang test doubles (tests/sglang_double.py).

Each double is its own process serving sglang 0.5.23's HTTP API with the tiny model, receiving weights over a real
gloo group; the learner, buffer and actor are the real ones. Assertions read the run's metrics.jsonl and the
doubles' /debug_state, never console text. Faults: a double killed with SIGKILL inside an update, a learner killed
and resumed (versions re-sent to servers that already hold newer ones), a bucket that fails, and a server that
comes up after the run started. Every one must end with every engine at the learner's last version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from common.metrics import read_metrics
from tests.test_run_async import (PORTS, _assert_accounted, _final_counters, _processes_mentioning,
                                  _wait_for_role_pid, _wait_until, rollout_reward_first_and_last_fifth)

# Minutes each on a busy 2-core machine (every run starts five Python processes that import torch).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]


class Double:
    """One tests/sglang_double.py process on a fixed port (so a replacement can take the same URL)."""

    def __init__(self, log_dir: Path, port: int | None = None, *args: str):
        from common.processes import free_port

        self.port = port or free_port()
        self.log_dir, self.args, self.proc = log_dir, args, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> "Double":
        log = open(self.log_dir / f"double-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.sglang_double", "--port", str(self.port),
                                      "--group-timeout-s", "15", *self.args, *extra], cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_up(self, timeout: float = 300) -> "Double":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"double exited with {self.proc.returncode}"
            try:
                self.state()
                return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"double on {self.port} not up in {timeout} s")

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "/debug_state", timeout=5) as reply:
            return json.loads(reply.read())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def doubles(tmp_path):
    started: list[Double] = []

    def make(*args: str, port: int | None = None) -> Double:
        double = Double(tmp_path, port, *args)
        started.append(double)
        return double

    yield make
    for double in started:
        double.kill()


def _command(runs_dir: Path, name: str, urls: list[str], *extra: str) -> list[str]:
    return [sys.executable, "run_async.py", "--preset", "tiny", "--run.runs-dir", str(runs_dir), "--run.name", name,
            *PORTS, "--actor.engine", "sglang", "--actor.sglang-urls", *urls, "--learner.sync-timeout-s", "15",
            *extra]


def _learner_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", role="learner") if r.get("loss/policy")
            is not None]


def _reached_step(run_dir: Path, step: int):
    return lambda: (run_dir / "metrics.jsonl").exists() and any(s >= step for s in _learner_steps(run_dir))


def _assert_engines_at(doubles: list[Double], version: int) -> None:
    # A run that stops may interrupt the actor between an update's end and its continue; the next attach undoes
    # that, so only the installed version is checked here.
    for double in doubles:
        state = double.state()
        assert state["weight_version"] == str(version), state


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    return out


def test_tiny_run_learns_through_two_attached_sglang_servers(tmp_path, doubles):
    servers = [doubles("--seed", str(i)).start() for i in range(2)]
    for server in servers:
        server.wait_up()
    run_dir = tmp_path / "learn"
    proc = subprocess.run(_command(tmp_path, "learn", [s.url for s in servers]), cwd=ROOT, capture_output=True,
                          text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, last, rewards = rollout_reward_first_and_last_fifth(run_dir)
    # Same margin as the HF path's learning test: the tiny preset lifts the rollout reward from ~0.02 to ~0.28.
    assert last > first + 0.1, (first, last, rewards)
    assert max(_learner_steps(run_dir)) == 30
    _assert_engines_at(servers, 30)  # both servers of the one engine got every version
    assert all(s.state()["updates"] >= 30 for s in servers)
    _assert_accounted(_final_counters(run_dir))
    assert _processes_mentioning(str(run_dir)) == []


def test_server_killed_inside_an_update_is_replaced_and_catches_up(tmp_path, doubles):
    server = doubles().start("--update-delay-s", "1").wait_up()
    run_dir = tmp_path / "kill-server"
    proc = subprocess.Popen(_command(tmp_path, "kill-server", [server.url], "--learner.total-steps", "10"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_until(_reached_step(run_dir, 3), 480, "learner step 3", proc)
        _wait_until(lambda: server.state()["session_open"], 60, "an update in progress", proc)
        server.kill()  # SIGKILL while the server holds an open weight-update session
        replacement = doubles(port=server.port).start().wait_up()
        _finish(proc, 600)
    finally:
        proc.kill()
    assert max(_learner_steps(run_dir)) == 10
    _assert_engines_at([replacement], 10)
    assert _processes_mentioning(str(run_dir)) == []


def test_failed_bucket_ends_the_session_and_later_versions_arrive(tmp_path, doubles):
    server = doubles("--fail-updates", "2").start().wait_up()
    run_dir = tmp_path / "fail-bucket"
    proc = subprocess.Popen(_command(tmp_path, "fail-bucket", [server.url], "--learner.total-steps", "8"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _finish(proc, 600)
    assert max(_learner_steps(run_dir)) == 8
    _assert_engines_at([server], 8)
    # The failed updates ended their sessions: no later begin found one open.
    assert server.state()["begins_refused"] == 0
    assert _processes_mentioning(str(run_dir)) == []


def test_learner_killed_and_resumed_resends_versions_the_server_already_holds(tmp_path, doubles):
    server = doubles().start().wait_up()
    run_dir = tmp_path / "kill-learner"
    # Checkpoints at 6 and 12 (the end): a kill that lands a few steps after step 7 leaves the server a version
    # newer than the newest checkpoint, however far the learner got while the test read metrics.jsonl.
    cmd = _command(tmp_path, "kill-learner", [server.url], "--learner.total-steps", "12",
                   "--learner.checkpoint-every", "6")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = _wait_for_role_pid(run_dir, "learner.train", proc, timeout=480)
        _wait_until(_reached_step(run_dir, 7), 480, "learner step 7", proc)
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    held = int(server.state()["weight_version"])
    checkpoint = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert held > checkpoint  # the resumed learner re-sends versions older than the server's
    resumed = subprocess.run([sys.executable, "run_async.py", "--resume", str(run_dir), *PORTS], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _assert_engines_at([server], 12)
    assert _processes_mentioning(str(run_dir)) == []


def test_server_that_comes_up_late_joins_and_the_run_completes(tmp_path, doubles):
    late = doubles()
    run_dir = tmp_path / "late"
    proc = subprocess.Popen(_command(tmp_path, "late", [late.url], "--learner.total-steps", "6"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(15)  # the actor is waiting in attach; the learner has no group yet
        assert proc.poll() is None
        late.start().wait_up()
        _finish(proc, 600)
    finally:
        proc.kill()
    assert max(_learner_steps(run_dir)) == 6
    _assert_engines_at([late], 6)
    assert _processes_mentioning(str(run_dir)) == []
