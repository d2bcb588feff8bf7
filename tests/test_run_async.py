"""End to end: run_async.py with the `tiny` preset — learning, accounting, faults, resume, synchronous mode.

Every run uses free ports, its own run directory and wandb disabled; assertions read the run's metrics.jsonl and
the buffer's final snapshot, never console text (except the supervisor's message naming a dead role's log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from buffer.state import decode_snapshot
from common.metrics import read_metrics

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
PORTS = ["--buffer.address", "tcp://127.0.0.1:0", "--learner.sync-address", "127.0.0.1:0",
         "--learner.sync-control-address", "tcp://127.0.0.1:0", "--run.wandb-mode", "disabled"]


def _command(runs_dir: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "run_async.py", "--preset", "tiny", "--run.runs-dir", str(runs_dir),
            "--run.name", name, *PORTS, *extra]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the run directory names every child of a run)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _learner_records(run_dir: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl", role="learner") if r.get(key) is not None]


def _final_counters(run_dir: Path) -> dict:
    snapshot = decode_snapshot((run_dir / "buffer_snapshot.msgpack").read_bytes())
    return {**msgspec.structs.asdict(snapshot.counters), "queue_depth": len(snapshot.queue)}


def _assert_accounted(counters: dict) -> None:
    # Every accepted group ends in exactly one place; rejected submissions are counted by reason.
    assert counters["groups_received"] == (counters["groups_served"] + counters["groups_dropped_stale"]
                                           + counters["groups_dropped_rollback"]
                                           + counters["groups_zero_variance"] + counters["queue_depth"])


def _wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.2):
    """predicate()'s first truthy value, polled every poll_s seconds; fails if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "run exited early"
        if value := predicate():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what} within {timeout} s")


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 360,
                   poll_s: float = 0.5) -> None:
    path = run_dir / "metrics.jsonl"
    _wait_until(lambda: path.exists() and any(r["step"] >= step for r in read_metrics(path, role="learner")),
                timeout, f"learner step {step}", proc, poll_s)


def _wait_for_role_pid(run_dir: Path, module: str, proc: subprocess.Popen, timeout: float = 240) -> int:
    """The pid of the one process running `module`, once it exists: looked up before a kill is due, so that the
    kill follows the awaited step by one poll, not by a scan of /proc (tiny-preset steps take a fraction of a second)."""
    def one_pid() -> int | None:
        pids = [p for p in _processes_mentioning(str(run_dir))
                if module in (Path("/proc") / str(p) / "cmdline").read_bytes().decode(errors="replace")]
        assert len(pids) < 2, f"expected one {module} process, found {pids}"
        return pids[0] if pids else None

    return _wait_until(one_pid, timeout, f"a {module} process", proc)


def _kill_while_holding_a_lease(run_dir: Path, pid: int, timeout: float = 60) -> None:
    """SIGKILL the (only) actor at a moment it holds a live lease.

    A tiny-preset lease lasts milliseconds, so a kill at a random moment often finds the actor between leases and
    nothing to re-issue. The actor is frozen with SIGSTOP while the buffer is asked about its leases: a stopped
    process cannot submit, so a live lease seen then is still live at the SIGKILL."""
    from buffer.client import BufferClient
    from common.config import load_config

    client = BufferClient.from_config(load_config(run_dir / "config.json").buffer, timeout_s=5.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            os.kill(pid, signal.SIGSTOP)
            if client.stats()["live_leases"] >= 1:
                os.kill(pid, signal.SIGKILL)
                return
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)
        raise AssertionError(f"the actor never held a lease within {timeout} s")
    finally:
        client.close()


def _kill_role_mid_run(cmd: list[str], run_dir: Path, module: str, at_step: int, timeout: float,
                       holding_lease: bool = False) -> tuple[int, str, float]:
    """Start a run, SIGKILL the process running `module` once the learner logged `at_step`, wait for the end.

    Returns the run's exit status, its output and the wall-clock time of the kill."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = _wait_for_role_pid(run_dir, module, proc)
        _wait_for_step(run_dir, at_step, proc, poll_s=0.05)
        if holding_lease:
            _kill_while_holding_a_lease(run_dir, pid)
        else:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, out, killed_at


def rollout_reward_first_and_last_fifth(run_dir: Path) -> tuple[float, float, list[float]]:
    """Mean rollout reward of actor0 over the first and the last fifth of its records, and all of them. The actor's
    rollout reward covers every sample (the learner's batch reward skips zero-variance groups)."""
    rewards = [r["rollout/reward/mean"] for r in read_metrics(run_dir / "metrics.jsonl", role="actor0")
               if r.get("rollout/reward/mean") is not None]
    fifth = len(rewards) // 5
    return sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth, rewards


def test_tiny_preset_learns_accounts_for_every_group_and_leaves_no_process(tmp_path):
    proc = _run(_command(tmp_path, "learn"))
    run_dir = tmp_path / "learn"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, last, rewards = rollout_reward_first_and_last_fifth(run_dir)
    # Margin: the preset lifts the mean rollout reward from ~0.02 to ~0.28 (docs/BENCHMARKS.md); with the policy
    # gradient's sign flipped in learner/loss.py it stays at ~0.0, so a rise of 0.1 separates the two.
    assert last > first + 0.1, (first, last, rewards)
    counters = _final_counters(run_dir)
    _assert_accounted(counters)
    assert counters["groups_served"] >= 30 * 4  # 30 steps x 4 groups, zero-variance groups excluded
    evals = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", role="eval")]
    assert evals == [0, 5, 10, 15, 20, 25, 30], evals  # the buffer's jobs: start, every 5 (the preset), the end
    assert (run_dir / "config.json").exists() and (run_dir / "logs" / "learner.log").exists()
    assert _processes_mentioning(str(run_dir)) == []


def test_ctrl_c_in_a_terminal_stops_the_roles_in_order(tmp_path):
    """A terminal's Ctrl-C is SIGINT to its whole foreground process group. Only the supervisor may be in it: were
    the roles there too, the buffer would stop at once and the learner would wait out its lost-buffer timeout
    (~30 s) and checkpoint without a buffer snapshot."""
    run_dir = tmp_path / "ctrl-c"
    cmd = _command(tmp_path, "ctrl-c", "--learner.total-steps", "1000")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # the run leads a group of its own, as a terminal's job does
    try:
        _wait_for_step(run_dir, 5, proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "buffer lost" not in learner_log, learner_log[-2000:]
    assert "stopped at version" in learner_log and "; buffer snapshot: " in learner_log
    assert "; buffer snapshot: not asked" not in learner_log
    assert _processes_mentioning(str(run_dir)) == []
    _assert_accounted(_final_counters(run_dir))


def test_actor_killed_is_restarted_and_its_lease_reissued(tmp_path):
    run_dir = tmp_path / "kill-actor"
    cmd = _command(tmp_path, "kill-actor", "--buffer.lease-timeout-s", "4", "--learner.total-steps", "16",
                   "--learner.sync-timeout-s", "20")
    returncode, out, _ = _kill_role_mid_run(cmd, run_dir, "actor.worker", at_step=4, timeout=240,
                                            holding_lease=True)
    assert returncode == 0, out
    assert "actor0 exited with status -9; restarting" in out
    assert (run_dir / "logs" / "actor0.log").read_text().count("=== start actor0") == 2
    counters = _final_counters(run_dir)
    assert counters["leases_expired"] >= 1  # the dead actor's lease came back to the pool
    _assert_accounted(counters)
    steps = [r["step"] for r in _learner_records(run_dir, "loss/policy")]
    assert max(steps) == 16
    assert _processes_mentioning(str(run_dir)) == []


def test_learner_killed_stops_the_run_and_resume_continues_with_the_same_statistics(tmp_path):
    run_dir = tmp_path / "kill-learner"
    # The kill lands a step or two after step 8 (the learner keeps stepping while the test reads metrics.jsonl); the
    # next checkpoint after 7 is 14, the end, so the resumed run always has steps to train and groups to generate.
    cmd = _command(tmp_path, "kill-learner", "--learner.total-steps", "14", "--learner.checkpoint-every", "7")
    returncode, out, _ = _kill_role_mid_run(cmd, run_dir, "learner.train", at_step=8, timeout=120)
    assert returncode == 1, out
    assert "learner exited with status -9" in out and str(run_dir / "logs" / "learner.log") in out
    assert _processes_mentioning(str(run_dir)) == []
    before = decode_snapshot((run_dir / "buffer_snapshot.msgpack").read_bytes())
    seen_before = {pid: stats.total_samples for pid, stats in before.stats.items()}
    checkpoint_version = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoint_version == 7
    # A disk that filled up mid-record left a torn line; --resume reads it at its first progress tick and in its
    # final report, and the resumed learner appends after it.
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"role": "learner", "step": 7, "loss/po')
    resume_start = time.time()

    resumed = _run([sys.executable, "run_async.py", "--resume", str(run_dir), *PORTS])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = decode_snapshot((run_dir / "buffer_snapshot.msgpack").read_bytes())
    # Prompt statistics only grow from where the killed run left them (nothing was reset to zero).
    for pid, total in seen_before.items():
        assert after.stats[pid].total_samples >= total, pid
    assert sum(s.total_samples for s in after.stats.values()) > sum(seen_before.values())
    resumed_steps = [r["step"] for r in _learner_records(run_dir, "loss/policy") if r["time"] > resume_start]
    # Same version numbering: the resumed learner trains checkpoint + 1 .. total_steps, once each.
    assert resumed_steps == list(range(checkpoint_version + 1, 15))
    assert "skipped 1 torn lines" in resumed.stdout


@pytest.mark.timeout(900)  # ~1 min on an idle machine; the roles take minutes to start on a busy one
def test_buffer_killed_is_restarted_from_its_snapshot_and_no_trained_step_is_lost(tmp_path):
    run_dir = tmp_path / "kill-buffer"
    # Checkpoints (each with a buffer snapshot) every 5 steps and periodic snapshots every 5 s (the preset).
    cmd = _command(tmp_path, "kill-buffer", "--learner.total-steps", "20", "--learner.checkpoint-every", "5")
    returncode, out, killed_at = _kill_role_mid_run(cmd, run_dir, "buffer.server", at_step=8, timeout=240)
    assert returncode == 0, out
    assert "buffer exited with status -9; restarting it from its snapshot (1/3)" in out
    buffer_log = (run_dir / "logs" / "buffer.log").read_text()
    assert buffer_log.count("=== start buffer") == 2 and "restored" in buffer_log.split("=== start buffer")[-1]
    records = _learner_records(run_dir, "loss/policy")
    # One learner trained every step once: nothing it had trained (and checkpointed) was lost or repeated.
    assert [r["step"] for r in records] == list(range(1, 21))
    killed_step = max(r["step"] for r in records if r["time"] <= killed_at)
    resumed_after = min(r["time"] for r in records if r["step"] > killed_step) - killed_at
    assert resumed_after < 60, resumed_after  # the outage costs seconds, not the client's 3 x 30 s retries
    assert decode_snapshot((run_dir / "buffer_snapshot.msgpack").read_bytes()).policy_version == 20
    _assert_accounted(_final_counters(run_dir))
    assert _processes_mentioning(str(run_dir)) == []


def test_max_staleness_zero_trains_only_on_policy(tmp_path):
    proc = _run(_command(tmp_path, "sync", "--algo.max-staleness", "0", "--learner.total-steps", "10"))
    run_dir = tmp_path / "sync"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counters = _final_counters(run_dir)
    assert set(int(k) for k in counters["staleness_hist"]) == {0}
    assert counters["groups_dropped_stale"] == 0
    assert all(r["buffer/staleness/max"] == 0 for r in _learner_records(run_dir, "buffer/staleness/max"))
    _assert_accounted(counters)


def test_supervisor_restarts_a_dead_buffer_from_its_snapshot_a_bounded_number_of_times(tmp_path):
    from common.config import PRESETS, save_config, with_overrides
    from common.processes import free_port
    from common.supervisor import RoleFailed, Supervisor

    cfg = with_overrides(PRESETS["tiny"](), run={"wandb_mode": "disabled"},
                         buffer={"address": f"tcp://127.0.0.1:{free_port()}", "max_restarts": 1})
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.json")
    said: list[str] = []
    supervisor = Supervisor(cfg, run_dir, announce=said.append)
    kills = []

    def kill_buffer_once_answering(stats: dict) -> None:
        if stats and len(kills) < 2:
            supervisor._client.snapshot()  # something to restore from
            os.kill(supervisor.buffer.pid, signal.SIGKILL)
            kills.append(supervisor.buffer.pid)

    try:
        supervisor.start_buffer()
        with pytest.raises(RoleFailed, match=r"buffer died 2 times \(last status -9\)"):
            supervisor.watch([False], on_tick=kill_buffer_once_answering, refresh_s=0.1)
    finally:
        supervisor.shutdown()
    assert len(kills) == 2 and kills[0] != kills[1]  # the second kill hit the restarted process
    assert said[0].startswith("buffer exited with status -9; restarting it from its snapshot (1/1); log: ")
    buffer_log = (run_dir / "logs" / "buffer.log").read_text()
    assert buffer_log.count("=== start buffer") == 2
    assert "restored " + str(run_dir / "buffer_snapshot.msgpack") in buffer_log.split("=== start buffer")[-1]
