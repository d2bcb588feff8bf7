"""The run report: one picture of a run, drawn from its metrics.jsonl and its buffer snapshot.

    python -m common.report runs/<name>                  # writes runs/<name>/report.png
    python -m common.report runs/<name> --out other.png

run_async.py draws it at the end of every run. Nine panels: reward and held-out accuracy against learner steps and
against generated samples, generated samples per second, the staleness of served groups, learner and actor idle
time, the rollout allocation n_i per prompt (its spread over time and its distribution), the informative yield
(groups that are not zero-variance) and the weight broadcast time per policy version. A panel whose metric the run
did not record says "no data" and names what it looked for. The staleness histogram and the allocations come from
the buffer's snapshot through `python -m buffer.inspect --snapshot ... --json` (the file format is the buffer's),
so a report can be drawn for a run whose buffer is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.metrics import eval_records, read_metrics

SNAPSHOT_FILE = "buffer_snapshot.msgpack"
REPORT_FILE = "report.png"
INSPECT_TIMEOUT_S = 120.0
GAP_MIN_S = 60.0
GAP_FACTOR = 10.0


@dataclass
class RunData:
    """What the report draws, read from a run directory (each list may be empty)."""

    name: str
    learner: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Held-out evaluation records, one per evaluated version (step), in step order."""
    actors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    buffer: list[dict[str, Any]] = field(default_factory=list)
    staleness_hist: dict[int, int] = field(default_factory=dict)
    allocations: list[int] = field(default_factory=list)
    """Every recent per-prompt allocation n_i kept in the snapshot (the buffer keeps the last few per prompt)."""
    snapshot_note: str = ""
    """Why the snapshot's panels are empty ('' when it was read)."""
    low_yield_threshold: float | None = None
    """buffer.low_yield_threshold from the run's config.json, when it has one."""
    t0: float = 0.0
    """Time of the first record (seconds since the epoch); times in the report count from it."""
    span_s: float = 0.0
    """Seconds from the first record to the last."""


def load_run(run_dir: Path) -> RunData:
    data = RunData(name=run_dir.name)
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    for rec in records:
        role = rec.get("role")
        if role == "learner":
            data.learner.append(rec)
        elif role == "buffer":
            data.buffer.append(rec)
        elif isinstance(role, str) and role.startswith("actor"):
            data.actors.setdefault(role, []).append(rec)
    data.evals = eval_records(records)
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    data.t0 = min(times) if times else 0.0
    data.span_s = max(times) - data.t0 if times else 0.0
    _read_snapshot(run_dir / SNAPSHOT_FILE, data)
    data.low_yield_threshold = _config_value(run_dir, "buffer", "low_yield_threshold")
    return data


def _config_value(run_dir: Path, section: str, key: str) -> float | None:
    try:
        value = json.loads((run_dir / "config.json").read_text()).get(section, {}).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read_snapshot(path: Path, data: RunData) -> None:
    """Staleness histogram and allocations from the buffer's snapshot, read by the buffer's own inspector (its
    JSON output is the interface; the file format belongs to the buffer). Both questions run at once."""
    if not path.exists():
        data.snapshot_note = f"no {SNAPSHOT_FILE}"
        return
    try:
        summary, prompts = _inspect(path, ["summary"], ["prompts", "--top", "0"])
        data.staleness_hist = {int(k): int(v) for k, v in summary["staleness_hist"].items()}
        data.allocations = [int(n) for row in prompts for n in row["allocations"]]
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        data.snapshot_note = f"{SNAPSHOT_FILE} unreadable: {exc}"


def _inspect(path: Path, *commands: list[str]) -> list[Any]:
    """The JSON answers of `python -m buffer.inspect --snapshot path <command> --json`, one per command."""
    procs = [subprocess.Popen([sys.executable, "-m", "buffer.inspect", "--snapshot", str(path), *cmd, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1], env={**os.environ, "COLUMNS": "1000"})
             for cmd in commands]
    try:
        answers = []
        for proc in procs:
            out, err = proc.communicate(timeout=INSPECT_TIMEOUT_S)
            if proc.returncode != 0:
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise ValueError(f"buffer.inspect exited {proc.returncode}: {last}")
            answers.append(json.loads(out))
        return answers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


# ---------------------------------------------------------------------------------------------- series


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, value) of the records that carry `key` (x: a record field such as step or time)."""
    pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r.get(x) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pts)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def samples_at(buffer: list[dict[str, Any]], times: np.ndarray) -> np.ndarray | None:
    """Generated samples (the buffer's samples_received) at `times`, interpolated between buffer records; None
    without buffer records. Before the first record the count is taken as 0."""
    t, s = series(buffer, "buffer/samples_received", x="time")
    if len(t) == 0:
        return None
    return np.interp(times, np.concatenate([[t[0] - 1e-9], t]), np.concatenate([[0.0], s]), left=0.0)


def informative_yield(buffer: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(time, fraction of the groups received since the previous buffer record that had reward variance).

    Intervals without new groups are left out. A group is informative unless the buffer counted it zero-variance."""
    pts = [(r["time"], r["buffer/groups_received"], r["buffer/groups_zero_variance"]) for r in buffer
           if isinstance(r.get("buffer/groups_received"), (int, float))
           and isinstance(r.get("buffer/groups_zero_variance"), (int, float))]
    out_t, out_y = [], []
    for (_, g0, z0), (t1, g1, z1) in zip(pts, pts[1:]):
        if g1 > g0 and z1 >= z0:
            out_t.append(t1)
            out_y.append(1.0 - (z1 - z0) / (g1 - g0))
    return np.asarray(out_t, dtype=float), np.asarray(out_y, dtype=float)


def samples_rate(buffer: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(time, generated samples per second between consecutive buffer records)."""
    t, s = series(buffer, "buffer/samples_received", x="time")
    if len(t) < 2:
        return t[:0], s[:0]
    dt, ds = np.diff(t), np.diff(s)
    # Records less than a second apart (the buffer's last record at shutdown) give no meaningful rate; a counter
    # that went back is a buffer restored from an older snapshot.
    keep = (dt >= 1.0) & (ds >= 0)
    return t[1:][keep], ds[keep] / dt[keep]


def break_gaps(t: np.ndarray, *ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """(t, *ys) with a NaN point inserted where the records pause for longer than GAP_MIN_S and GAP_FACTOR times
    their median spacing (a stopped and resumed run), so that plotted lines do not bridge the pause."""
    if len(t) < 3:
        return (t, *ys)
    gaps = np.diff(t)
    cut = np.nonzero(gaps > max(GAP_MIN_S, GAP_FACTOR * float(np.median(gaps))))[0] + 1
    if not len(cut):
        return (t, *ys)
    middle = (t[cut - 1] + t[cut]) / 2
    return (np.insert(t, cut, middle), *(np.insert(np.asarray(y, dtype=float), cut, np.nan) for y in ys))


def pass_at_k_key(evals: list[dict[str, Any]]) -> str | None:
    """The eval/pass@k key (k > 1) the evaluation records carry, if any."""
    for rec in evals:
        for key in rec:
            m = re.fullmatch(r"eval/pass@(\d+)", key)
            if m and int(m.group(1)) > 1:
                return key
    return None


def suite_avg_key(evals: list[dict[str, Any]]) -> str | None:
    """The eval/suite/avg@k key of a run that evaluated a benchmark suite (run.eval_suite), if any."""
    for rec in evals:
        for key in rec:
            if re.fullmatch(r"eval/suite/avg@\d+", key):
                return key
    return None


# ---------------------------------------------------------------------------------------------- drawing


def build_figure(data: RunData):
    """The report figure (matplotlib Figure, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(18, 14))
    (a_step, a_samples, a_rate), (a_stale, a_idle, a_sync), (a_alloc_t, a_alloc, a_yield) = axes
    _plot_quality(a_step, data, against="steps")
    _plot_quality(a_samples, data, against="samples")
    _plot_rate(a_rate, data)
    _plot_staleness(a_stale, data)
    _plot_idle(a_idle, data)
    _plot_sync(a_sync, data)
    _plot_allocation_time(a_alloc_t, data)
    _plot_allocation(a_alloc, data)
    _plot_yield(a_yield, data)
    steps = int(max((r.get("step", 0) for r in data.learner), default=0))
    fig.suptitle(f"run {data.name}: {steps} learner steps", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the report of `run_dir` into `out` (default runs/<name>/report.png); returns the path."""
    import matplotlib.pyplot as plt

    out = out or run_dir / REPORT_FILE
    fig = build_figure(load_run(run_dir))
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _no_data(ax, what: str) -> None:
    """Mark an empty panel; `what` names the metric or file it looked for."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, "no data\n" + textwrap.fill(f"({what})", 45), transform=ax.transAxes, ha="center",
            va="center", color="gray", fontsize=11)


def _elapsed(data: RunData, t: np.ndarray) -> np.ndarray:
    """Time since the run's first record, in the unit _time_label names (seconds for runs under 3 minutes)."""
    return (t - data.t0) / (1.0 if data.span_s < 180 else 60.0)


def _time_label(data: RunData) -> str:
    return f"time since start ({'s' if data.span_s < 180 else 'min'})"


def _plot_quality(ax, data: RunData, against: str) -> None:
    """Training reward and held-out accuracy, against learner steps or against generated samples."""
    label_x = "learner step (optimizer steps)" if against == "steps" else "generated samples (buffer, cumulative)"
    ax.set(title=f"Reward and held-out accuracy vs {'learner steps' if against == 'steps' else 'generated samples'}",
           xlabel=label_x, ylabel="fraction (0-1)")
    k_key = pass_at_k_key(data.evals)
    lines = [("reward/mean", "training reward (mean over the step's samples)", "tab:blue", "-", data.learner),
             ("eval/pass@1", "held-out pass@1 (greedy)", "tab:red", "o-", data.evals)]
    if k_key:
        lines.append((k_key, f"held-out {k_key.split('/')[1]} (sampled)", "tab:orange", "s--", data.evals))
    suite_key = suite_avg_key(data.evals)
    if suite_key:
        lines.append((suite_key, f"suite {suite_key.split('/')[2]} (mean over benchmarks)", "tab:green", "d-.",
                      data.evals))
    drawn = 0
    for key, label, color, style, records in lines:
        x, y = series(records, key)
        if against == "samples" and len(x):
            times = _step_times(data, [r for r in records if isinstance(r.get(key), (int, float))])
            xs = samples_at(data.buffer, times)
            x = xs if xs is not None else np.zeros(0)
            y = y if xs is not None else np.zeros(0)
        if len(x):
            ax.plot(x, y, style, color=color, label=label, markersize=4)
            drawn += 1
    if drawn:
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    else:
        what = "reward/mean in learner records, eval/pass@1 in eval records"
        _no_data(ax, what if against == "steps" or data.learner else what + "; buffer/samples_received")


def _step_times(data: RunData, records: list[dict[str, Any]]) -> np.ndarray:
    """When the learner reached each record's step: an evaluation record is written when the actors finish it, but
    it measures the weights of its step (version); version 0 is the run's start."""
    reached = {r["step"]: r["time"] for r in data.learner if r.get("time/step_s") is not None and "time" in r}
    return np.asarray([data.t0 if r["step"] == 0 else reached.get(r["step"], r.get("time", data.t0))
                       for r in records], dtype=float)


def _plot_rate(ax, data: RunData) -> None:
    ax.set(title="Generation throughput", xlabel=_time_label(data), ylabel="samples / s")
    t, r = samples_rate(data.buffer)
    if not len(t):
        _no_data(ax, "buffer/samples_received in buffer records")
        return
    t, r = break_gaps(t, r)
    ax.plot(_elapsed(data, t), r, color="tab:green")
    ax.grid(alpha=0.3)


def _plot_staleness(ax, data: RunData) -> None:
    ax.set(title="Staleness of served groups", xlabel="staleness (policy versions behind the learner)",
           ylabel="groups served")
    if not data.staleness_hist:
        _no_data(ax, data.snapshot_note or "staleness_hist empty in the buffer snapshot")
        return
    keys = sorted(data.staleness_hist)
    ax.bar(keys, [data.staleness_hist[k] for k in keys], color="tab:orange")
    ax.set_xticks(keys)


def _plot_idle(ax, data: RunData) -> None:
    ax.set(title="Idle time (waiting for data / for work)", xlabel=_time_label(data),
           ylabel="idle (% of wall time)", ylim=(-2, 102))
    drawn = 0
    t, y = series(data.learner, "time/idle_fraction", x="time")
    if len(t):
        t, y = break_gaps(t, y)
        ax.plot(_elapsed(data, t), 100 * y, "-", color="tab:blue", label="learner (fetch wait / step time)")
        drawn += 1
    for i, (role, recs) in enumerate(sorted(data.actors.items())):
        t, y = series(recs, "rollout/idle_fraction", x="time")
        if len(t):
            t, y = break_gaps(t, y)
            ax.plot(_elapsed(data, t), 100 * y, "-", alpha=0.6, color=f"C{1 + i % 9}",
                    label=f"{role} (per log interval)")
            drawn += 1
    if drawn:
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    else:
        _no_data(ax, "time/idle_fraction, rollout/idle_fraction")


def _plot_allocation(ax, data: RunData) -> None:
    ax.set(title="Rollout allocation per prompt (n_i)", xlabel="n_i (rollouts given to one prompt in one wave)",
           ylabel="allocations")
    if not data.allocations:
        _no_data(ax, data.snapshot_note or "no allocations in the buffer snapshot")
        return
    lo, hi = min(data.allocations), max(data.allocations)
    ax.hist(data.allocations, bins=np.arange(lo, hi + 2) - 0.5, color="tab:purple", rwidth=0.85)
    ax.set_xticks(range(lo, hi + 1))
    ax.text(0.98, 0.95, f"{len(data.allocations)} recent allocations\nmean {np.mean(data.allocations):.2f}",
            transform=ax.transAxes, ha="right", va="top", fontsize=8)


def _plot_allocation_time(ax, data: RunData) -> None:
    ax.set(title="Rollout allocation n_i over time", xlabel=_time_label(data),
           ylabel="n_i (rollouts per prompt per wave)")
    t, mean = series(data.buffer, "allocation/n/mean", x="time")
    if not len(t):
        _no_data(ax, "allocation/n/mean in buffer records")
        return
    t_lo, lo = series(data.buffer, "allocation/n/min", x="time")
    t_hi, hi = series(data.buffer, "allocation/n/max", x="time")
    have_band = len(t_lo) == len(t) and len(t_hi) == len(t)
    t, mean, lo, hi = break_gaps(t, mean, lo, hi) if have_band else (*break_gaps(t, mean), lo, hi)
    x = _elapsed(data, t)
    if have_band:
        ax.fill_between(x, lo, hi, color="tab:purple", alpha=0.2, label="min-max over prompts (latest wave each)")
    ax.plot(x, mean, "o-", color="tab:purple", markersize=3, label="mean over prompts")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _plot_yield(ax, data: RunData) -> None:
    ax.set(title="Informative yield (groups with reward variance)", xlabel=_time_label(data),
           ylabel="informative groups / groups received", ylim=(-0.02, 1.02))
    t, y = informative_yield(data.buffer)
    tw, yw = series(data.buffer, "buffer/informative_yield", x="time")
    if not len(t) and not len(tw):
        _no_data(ax, "buffer/groups_received, buffer/groups_zero_variance")
        return
    if len(t):
        t, y = break_gaps(t, y)
        ax.plot(_elapsed(data, t), y, "o-", color="tab:cyan", markersize=3, label="per buffer log interval")
    if len(tw):
        tw, yw = break_gaps(tw, yw)
        ax.plot(_elapsed(data, tw), yw, "-", color="tab:blue", label="buffer's recent-groups window")
    if data.low_yield_threshold is not None:
        ax.axhline(data.low_yield_threshold, color="tab:red", ls="--", lw=1, label="low-yield warning threshold")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _plot_sync(ax, data: RunData) -> None:
    ax.set(title="Weight broadcast time per policy version", xlabel="policy version (learner step)")
    v, s = series(data.learner, "time/sync_s")
    if not len(v):
        ax.set_ylabel("broadcast time (s)")
        _no_data(ax, "time/sync_s in learner records")
        return
    unit, scale = ("ms", 1e3) if s.max() < 1.0 else ("s", 1.0)
    ax.set_ylabel(f"broadcast time ({unit})")
    s = s * scale
    _, ok = series([r for r in data.learner if r.get("time/sync_s") is not None], "perf/sync_ok")
    failed = ok == 0 if len(ok) == len(v) else np.zeros(len(v), dtype=bool)
    ax.bar(v[~failed], s[~failed], color="tab:gray", label="delivered")
    if failed.any():
        ax.bar(v[failed], s[failed], color="tab:red", label="not delivered to every actor")
    ax.legend(fontsize=8, loc="best")


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help=f"output image (default <run_dir>/{REPORT_FILE})")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    print(write_report(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
