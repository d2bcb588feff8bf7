"""Shared helpers of the run-based benchmarks (`bench/async_vs_sync.py`, `bench/learning_curves.py`).

Launching: each run is one `python run_async.py --preset P --run.runs-dir D --run.name N ...` child in its own
session, with stdout+stderr in D/N/run_async.log and a D/N/bench_run.json (start time, wall seconds, exit status)
written when it ends. A run whose bench_run.json says it completed with the same command line is reused, so an
interrupted benchmark resumes; any other run in the way is moved aside (renamed), never deleted.
Ctrl-C or SIGTERM of the driver SIGTERMs the running child, which shuts its roles down in order; the child also
gets SIGTERM if the driver is killed outright (PR_SET_PDEATHSIG), and its roles do the same for it.

Reading: `load_run` gathers what the summaries need from a finished run directory (metrics.jsonl records by role,
the actors' cumulative generated samples over time and the final buffer snapshot's counters). The time helpers
define the learner's training window and map a time to generated samples; both benchmarks use them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.processes import die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_LOG = "run_async.log"
RUN_RECORD = "bench_run.json"
SHUTDOWN_GRACE_S = 180.0
"""How long a SIGTERMed run may take for its ordered shutdown (its learner alone may take 120 s) before SIGKILL."""
ADDRESS_ARGS = ("--buffer.address", "tcp://127.0.0.1:0", "--learner.sync-address", "127.0.0.1:0",
                "--learner.sync-control-address", "tcp://127.0.0.1:0", "--run.wandb-mode", "disabled")


class RunFailed(RuntimeError):
    """A benchmark run exited with an error or timed out; the message names its log."""


@dataclass(frozen=True)
class RunSpec:
    """One run to launch: its name (the run directory under runs_dir), its config flags, and the benchmark
    configuration and seed it belongs to."""

    name: str
    args: tuple[str, ...]
    config: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.config} seed {self.seed}"


@dataclass
class RunData:
    """What the summaries read from one finished run."""

    run_dir: Path
    learner: list[dict[str, Any]]
    actors: dict[str, list[dict[str, Any]]]
    sample_points: list[tuple[float, float]]
    counters: dict[str, Any]
    started_at: float
    wall_s: float
    evals: list[dict[str, Any]] = field(default_factory=list)
    """The `eval` role's records (the buffer's held-out evaluations; older runs have none: their learner records
    carry eval/*). `run_evals` merges both."""


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask, which respects taskset and cgroup cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_threads(cores: int) -> tuple[int, int]:
    """(actor threads, learner threads) when both run at once on `cores` cores: one share each, the learner
    taking the odd core."""
    actor = max(1, cores // 2)
    return actor, max(1, cores - actor)


def run_command(spec: RunSpec, preset: str, runs_dir: Path, steps: int | None, extra: Sequence[str]) -> list[str]:
    """The run_async.py command line; `extra` goes last so it overrides the benchmark's own flags."""
    cmd = [sys.executable, str(REPO_ROOT / "run_async.py"), "--preset", preset, "--run.runs-dir", str(runs_dir),
           "--run.name", spec.name, *ADDRESS_ARGS, *spec.args]
    if steps is not None:
        cmd += ["--learner.total-steps", str(steps)]
    return cmd + list(extra)


def run_all(specs: Sequence[RunSpec], preset: str, runs_dir: Path, steps: int | None, extra: Sequence[str],
            timeout_s: float) -> list[Path]:
    """Launch the runs one after another (they would compete for the same cores), printing a line per run."""
    dirs = []
    for i, spec in enumerate(specs, 1):
        run_dir = runs_dir / spec.name
        tag = f"[{i}/{len(specs)}] {spec.label}"
        cmd = run_command(spec, preset, runs_dir, steps, extra)
        if completed(run_dir, cmd):
            print(f"{tag}: reusing the completed run in {run_dir}", flush=True)
        else:
            print(f"{tag}: running (log {run_dir / RUN_LOG}) ...", flush=True)
            wall = launch(cmd, run_dir, timeout_s)
            print(f"{tag}: done in {wall:.0f} s", flush=True)
        dirs.append(run_dir)
    return dirs


def completed(run_dir: Path, cmd: list[str] | None = None) -> bool:
    """Whether run_dir holds a run that finished cleanly (with exactly this command line, if given)."""
    record = run_dir / RUN_RECORD
    if not record.exists():
        return False
    done = json.loads(record.read_text())
    return done.get("returncode") == 0 and (cmd is None or done.get("command") == cmd)


def launch(cmd: list[str], run_dir: Path, timeout_s: float) -> float:
    """Run one child to completion; returns its wall seconds or raises RunFailed naming the log."""
    if (run_dir / "config.json").exists():
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{int(time.time())}")
        run_dir.rename(aside)
        print(f"  an unfinished run or one with other flags was in the way; moved it to {aside}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / RUN_LOG
    started = time.time()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO_ROOT, start_new_session=True, preexec_fn=die_with_parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    code = _wait(proc, timeout_s)
    wall = time.time() - started
    (run_dir / RUN_RECORD).write_text(json.dumps({"started_at": started, "wall_s": wall, "returncode": code,
                                                  "command": cmd}, indent=2) + "\n")
    if code != 0:
        reason = f"timed out after {timeout_s:.0f} s" if code is None else f"exited with status {code}"
        raise RunFailed(f"run {run_dir.name} {reason}; see {log_path} (and {run_dir / 'logs'})\n{_tail(log_path)}")
    return wall


def _wait(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The child's exit status (None on timeout); on Ctrl-C / SIGTERM / timeout it is stopped before returning."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return None
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping run_async.py (pid {proc.pid}) ...", flush=True)
        _stop(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (run_async.py then stops learner, actors, buffer in order), SIGKILL after the grace period."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=SHUTDOWN_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------- reading


def load_run(run_dir: Path) -> RunData:
    """metrics.jsonl by role, cumulative generated samples over time, the final buffer snapshot's counters."""
    from buffer.state import decode_snapshot
    from common.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    actors: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if rec["role"].startswith("actor") and rec.get("rollout/samples_per_s") is not None:
            actors.setdefault(rec["role"], []).append(rec)
    counters: dict[str, Any] = {}
    snapshot = run_dir / "buffer_snapshot.msgpack"
    if snapshot.exists():
        snap = decode_snapshot(snapshot.read_bytes())
        counters = {f: getattr(snap.counters, f) for f in snap.counters.__struct_fields__}
    record = json.loads((run_dir / RUN_RECORD).read_text()) if (run_dir / RUN_RECORD).exists() else {}
    return RunData(run_dir=run_dir, learner=[r for r in records if r["role"] == "learner"], actors=actors,
                   sample_points=sample_points(actors), counters=counters,
                   started_at=record.get("started_at", records[0]["time"] if records else 0.0),
                   wall_s=record.get("wall_s", math.nan), evals=[r for r in records if r["role"] == "eval"])


def run_evals(data: RunData) -> list[dict[str, Any]]:
    """Held-out evaluation records in step (= evaluated version) order: the `eval` role's, or the learner's in runs
    that evaluated inside the learner."""
    from common.metrics import eval_records

    return eval_records(data.learner + data.evals)


def eval_times(data: RunData, evals: list[dict[str, Any]]) -> list[float]:
    """When the learner reached each evaluated version. An `eval` record is written when the actors finish the
    evaluation, but it measures the weights of its version: the end of that step's train+broadcast (version 0: the
    start of the training window). A learner-side evaluation record: `step_end_time`."""
    ends = {r["step"]: step_end_time(r) for r in step_records(data.learner)}
    start = training_window(data.learner)[0] if ends else data.started_at
    return [step_end_time(r) if r["role"] == "learner" else start if r["step"] == 0
            else ends.get(r["step"], r["time"]) for r in evals]


def lease_samples(records: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """(start, end, samples) of each lease record of one actor.

    An actor writes one record per lease and then resets its counters, so record i covers the time since record
    i-1 and generated rollout/samples_per_s x that interval. The first record's start is unknown: it is given the
    median sample count of the others (leases have prompts_per_lease prompts at n_mean samples on average). A
    restarted actor's first record after the restart spans the restart too, so its samples are overestimated."""
    spans = [(prev["time"], rec["time"], rec["rollout/samples_per_s"] * (rec["time"] - prev["time"]))
             for prev, rec in zip(records, records[1:])]
    if records:
        first = records[0]
        n0 = float(np.median([n for _, _, n in spans])) if spans else 0.0
        rate = first["rollout/samples_per_s"]
        spans.insert(0, (first["time"] - (n0 / rate if rate > 0 else 0.0), first["time"], n0))
    return spans


def sample_points(actors: dict[str, list[dict[str, Any]]]) -> list[tuple[float, float]]:
    """(time, cumulative generated samples of all actors): 0 when the first lease began, then one point per lease
    record. Finer than the buffer's samples_received, which is logged only every 5 s."""
    spans = [span for records in actors.values() for span in lease_samples(records)]
    if not spans:
        return []
    points, total = [(min(start for start, _, _ in spans), 0.0)], 0.0
    for _, end, n in sorted(spans, key=lambda span: span[1]):
        total += n
        points.append((end, total))
    return points


def step_end_time(rec: dict[str, Any]) -> float:
    """When a learner record's step ended (for the initial-evaluation record of a run that evaluated inside the
    learner: when that evaluation began): the record is written after its checkpoint (and, in such runs, its
    evaluation), whose durations it carries."""
    return rec["time"] - (rec.get("time/eval_s") or 0.0) - (rec.get("time/checkpoint_s") or 0.0)


def step_records(learner: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The learner's per-step records (those with a step time), in order."""
    return [r for r in learner if r.get("time/step_s") is not None]


def training_window(learner: list[dict[str, Any]]) -> tuple[float, float]:
    """(start, end) of the training loop: from the first step's start (in runs that evaluated inside the learner:
    the end of the initial evaluation, the step-0 record) to the end of the last step's train+broadcast."""
    steps = step_records(learner)
    if not steps:
        raise ValueError("no learner step records")
    initial = [r for r in learner if r["step"] == 0 and r.get("time/step_s") is None]
    if initial:
        start = initial[0]["time"]
    else:
        first = steps[0]
        start = step_end_time(first) - first["time/step_s"] - first["time/fetch_wait_s"]
    return start, step_end_time(steps[-1])


def samples_at(points: list[tuple[float, float]], t: float) -> float:
    """Generated samples at time t (from `sample_points`): linear within a lease, clamped outside the run."""
    if not points:
        return math.nan
    times, values = zip(*points)
    return float(np.interp(t, times, values))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of the finite values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def fmt_ms(values: Sequence[float], digits: int = 2) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def jsonable(value: Any) -> Any:
    """value with tuples as lists, dict keys as strings and non-finite floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def eval_key(records: list[dict[str, Any]], prefix: str) -> str | None:
    """The full name of an eval metric whose k is set by run.eval_samples, e.g. 'eval/mean_reward@' -> '...@2'."""
    for rec in records:
        for key in rec:
            if key.startswith(prefix):
                return key
    return None
