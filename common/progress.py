"""Progress display of a run: a live status panel in a terminal, one line per refresh in a log file, and a final
summary.

The status is folded from what the roles write: the learner's, actors' and evaluation (`eval`) records in
metrics.jsonl, the buffer's stats reply and which actor processes are alive. The phase is derived from them:
    loading        no learner record yet and the learner has not registered at the buffer (models still loading)
    training       learner steps are arriving (held-out evaluations pending at the buffer run alongside on the actors)
    evaluating     the learner has finished and the supervisor waits for the buffer's pending evaluations
    shutting down  the supervisor is stopping the roles (learner checkpoint, actors, buffer snapshot)
Outside a terminal each refresh prints one line, plus the buffer's low-yield warning when it has one:
    training | step 12/40 v12 | reward 0.41 | eval@1 0.23 | samples/s 35.1 | idle 12% | queue 3 | stale 0.8 |
    actors 1/1 | 02:31 | eta 04:10
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from common.config import Config

TREND_POINTS = 40
"""Learner steps shown in the reward sparkline."""
RATE_WINDOW_S = 30.0
"""Window of the samples/s rate (the buffer's samples_received counter)."""
ETA_STEPS = 10
"""Recent learner steps whose pace gives the ETA."""
SPARK = "▁▂▃▄▅▆▇█"


class MetricsTail:
    """Reads records appended to metrics.jsonl since the last call (by file offset)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.skipped = 0
        """Complete lines that were not whole records (torn by a failed write) and were skipped."""

    def new_records(self) -> list[dict[str, Any]]:
        from common.metrics import parse_record

        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
        self.offset += end
        records = [parse_record(line) for line in data[:end].splitlines() if line.strip()]
        self.skipped += sum(rec is None for rec in records)
        return [rec for rec in records if rec is not None]


@dataclass(frozen=True)
class RunStatus:
    """What the display shows at one refresh; built by RunWatch, drawn by render_status / status_line."""

    run_name: str
    phase: str
    """loading | training | evaluating | shutting down"""
    detail: str
    """What the phase is waiting for, in a few words ('' when nothing to add)."""
    step: int
    """The learner's newest logged step."""
    total_steps: int
    elapsed_s: float
    version: int | None = None
    """The buffer's policy version (None while it does not answer)."""
    eta_s: float | None = None
    rewards: tuple[float, ...] = ()
    """reward/mean of the recent learner steps, oldest first."""
    evals: tuple[tuple[int, float], ...] = ()
    """(step, eval/pass@1) of every held-out evaluation so far."""
    suite: tuple[tuple[int, float], ...] = ()
    """(step, eval/suite/avg@k) of every evaluation of run.eval_suite so far (the mean over its benchmarks)."""
    suite_label: str = ""
    """'<suite> avg@k' when the run evaluates a suite."""
    samples: int | None = None
    samples_per_s: float | None = None
    learner_idle: float | None = None
    actor_idle: float | None = None
    """Mean over actors of their newest rollout/idle_fraction."""
    queue: int | None = None
    staleness: float | None = None
    actors_alive: int | None = None
    actors_total: int = 0
    actors_registered: int | None = None
    buffer_answering: bool = True
    warning: str = ""
    """The buffer's low_yield_warning ('' when fine)."""


class RunWatch:
    """Folds metrics.jsonl records, buffer stats and actor liveness into one RunStatus per refresh."""

    def __init__(self, run_dir: Path, cfg: Config, actors_alive: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.run_name = run_dir.name
        self.tail = MetricsTail(run_dir / "metrics.jsonl")
        self.actors_alive = actors_alive
        self.clock = clock
        self.started = clock()
        self.shutting_down = False
        self.final_evaluation = False
        """Set while the supervisor waits for the evaluations pending after the learner finished."""
        self.learner: dict[str, Any] = {}
        # Phase and ETA look only at records written since this display started: a resumed run's metrics.jsonl
        # starts with the stopped run's records, which show as history (step, rewards, evals) and nothing else.
        self.seen_learner = False
        self.steps: deque[tuple[float, int]] = deque(maxlen=ETA_STEPS)  # (time, step) of training records
        self.rewards: deque[float] = deque(maxlen=TREND_POINTS)
        self.evals: dict[int, float] = {}  # step -> eval/pass@1
        self.suite_key = f"eval/suite/avg@{cfg.run.eval_samples}"
        self.suite: dict[int, float] = {}  # step -> eval/suite/avg@k
        self.actor_idle: dict[str, float] = {}
        self.samples: deque[tuple[float, int]] = deque()

    def ingest(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            role = rec.get("role")
            if role == "learner":
                self._learner_record(rec)
            elif role == "eval" and rec.get("eval/pass@1") is not None:
                self.evals[rec["step"]] = rec["eval/pass@1"]
                if rec.get(self.suite_key) is not None:
                    self.suite[rec["step"]] = rec[self.suite_key]
            elif isinstance(role, str) and role.startswith("actor") and rec.get("rollout/idle_fraction") is not None:
                self.actor_idle[role] = rec["rollout/idle_fraction"]

    def _learner_record(self, rec: dict[str, Any]) -> None:
        fresh = rec.get("time", 0.0) >= self.started
        self.seen_learner |= fresh
        self.learner.update({k: v for k, v in rec.items() if v is not None})
        if rec.get("time/step_s") is not None:  # a training step (not the resume broadcast or an eval alone)
            if fresh:
                self.steps.append((rec["time"], rec["step"]))
            if rec.get("reward/mean") is not None:
                self.rewards.append(rec["reward/mean"])
        if rec.get("eval/pass@1") is not None:  # a run that evaluated inside the learner
            self.evals.setdefault(rec["step"], rec["eval/pass@1"])

    def update(self, stats: dict[str, Any]) -> RunStatus:
        """Read the records appended since the last call and return the status now."""
        self.ingest(self.tail.new_records())
        now = self.clock()
        if "samples_received" in stats:
            self._add_samples(now, stats["samples_received"])
        phase, detail = self.phase(stats, now)
        clients = stats.get("clients") or {}
        return RunStatus(
            run_name=self.run_name, phase=phase, detail=detail, step=self.learner.get("step", 0),
            total_steps=self.cfg.learner.total_steps, elapsed_s=now - self.started,
            version=stats.get("policy_version"), eta_s=self.eta_s(), rewards=tuple(self.rewards),
            evals=tuple(sorted(self.evals.items())), suite=tuple(sorted(self.suite.items())),
            suite_label=(f"{self.cfg.run.eval_suite} avg@{self.cfg.run.eval_samples}" if self.cfg.run.eval_suite
                         else ""),
            samples=stats.get("samples_received"),
            samples_per_s=self.samples_per_s(),
            learner_idle=self.learner.get("time/idle_fraction"),
            actor_idle=statistics.fmean(self.actor_idle.values()) if self.actor_idle else None,
            queue=stats.get("queue_depth"), staleness=self.learner.get("buffer/staleness/mean"),
            actors_alive=self.actors_alive() if self.actors_alive else None,
            actors_total=self.cfg.actor.num_actors,
            actors_registered=clients.get("actor", 0) if "clients" in stats else None, buffer_answering=bool(stats),
            warning=str(stats.get("low_yield_warning") or ""))

    def phase(self, stats: dict[str, Any], now: float) -> tuple[str, str]:
        if self.shutting_down:
            return "shutting down", "learner checkpoint, then actors, then the buffer's snapshot"
        pending = _versions(stats.get("eval_pending"))
        if self.final_evaluation:
            return "evaluating", f"held-out evaluation of {pending or 'the last version'} on the actors"
        step = self.learner.get("step", 0)
        actors = self._actors_waiting(stats)
        alongside = f"evaluating {pending} alongside" if pending else ""
        if step >= self.cfg.learner.total_steps:
            return "training", _join("all steps done: final checkpoint", alongside)
        if not self.steps:
            if not self.seen_learner and not (stats.get("clients") or {}).get("learner"):
                return "loading", _join("starting the roles and loading the model", actors)
            return "training", _join("waiting for the first batch of groups", alongside, actors)
        return "training", alongside

    def _actors_waiting(self, stats: dict[str, Any]) -> str:
        if "clients" not in stats:
            return ""
        registered = (stats["clients"] or {}).get("actor", 0)
        total = self.cfg.actor.num_actors
        if registered >= total:
            return ""
        return f"actors registered {registered}/{total}"

    def _step_interval(self) -> float:
        times = [t for t, _ in self.steps]
        gaps = [b - a for a, b in zip(times, times[1:])]
        return statistics.median(gaps) if gaps else 0.0

    def _add_samples(self, now: float, samples: int) -> None:
        if self.samples and samples < self.samples[-1][1]:
            self.samples.clear()  # the counter went back (a buffer restored from an older snapshot)
        self.samples.append((now, samples))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()

    def samples_per_s(self) -> float | None:
        if len(self.samples) < 2 or self.samples[-1][0] <= self.samples[0][0]:
            return None
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0)

    def eta_s(self) -> float | None:
        if len(self.steps) < 2:
            return None
        (t0, s0), (t1, s1) = self.steps[0], self.steps[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return max(0, self.cfg.learner.total_steps - s1) * (t1 - t0) / (s1 - s0)


def _versions(pending: Any) -> str:
    """'v10' or 'v10, v20' for the buffer's eval_pending list ('' when none)."""
    return ", ".join(f"v{v}" for v in pending) if isinstance(pending, list) else ""


def _join(*parts: str) -> str:
    return " · ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------- drawing


def status_line(s: RunStatus) -> str:
    """The one-line form, for log files."""
    eval1 = s.evals[-1][1] if s.evals else None
    parts = [
        f"{s.phase} ({s.detail})" if s.detail else s.phase,
        f"step {s.step}/{s.total_steps} v{'?' if s.version is None else s.version}",
        f"reward {_fmt(s.rewards[-1] if s.rewards else None)}",
        f"eval@1 {_fmt(eval1)}",
        *([f"{s.suite_label} {_fmt(s.suite[-1][1] if s.suite else None)}"] if s.suite_label else []),
        f"samples/s {_fmt(s.samples_per_s, 1)}",
        f"idle {_pct(s.learner_idle)}",
        f"queue {'?' if s.queue is None else s.queue}",
        f"stale {_fmt(s.staleness, 1)}",
        f"actors {'?' if s.actors_alive is None else s.actors_alive}/{s.actors_total}",
        _clock(s.elapsed_s),
        f"eta {'-' if s.eta_s is None else _clock(s.eta_s)}",
    ]
    return " | ".join(parts)


PHASE_STYLE = {"loading": "yellow", "evaluating": "magenta", "training": "green", "shutting down": "cyan"}


def render_status(s: RunStatus) -> RenderableType:
    """The live panel: phase, step bar with ETA, reward and eval trends, throughput and health."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    head = Text.assemble((s.phase, f"bold {PHASE_STYLE.get(s.phase, 'white')}"), ("  " + s.detail, "dim"))
    grid.add_row("phase", head)
    done = min(s.step, s.total_steps)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(1, s.total_steps), completed=done, width=40),
                f"{s.step}/{s.total_steps}", f"{100 * done / max(1, s.total_steps):.0f}%",
                f"ETA {'-' if s.eta_s is None else _clock(s.eta_s)}", f"elapsed {_clock(s.elapsed_s)}")
    grid.add_row("learner step", bar)
    grid.add_row("reward", _reward_text(s.rewards))
    grid.add_row("eval pass@1", _eval_text(s.evals))
    if s.suite_label:
        grid.add_row(s.suite_label, _eval_text(s.suite))
    grid.add_row("samples/s", f"{_fmt(s.samples_per_s, 1)}   (generated {'-' if s.samples is None else s.samples}"
                              f", policy version {'?' if s.version is None else s.version})")
    grid.add_row("idle", f"learner {_pct(s.learner_idle)}   actors {_pct(s.actor_idle)}")
    grid.add_row("buffer", f"queue {'?' if s.queue is None else s.queue} groups   staleness "
                           f"{_fmt(s.staleness, 1)} versions" + ("" if s.buffer_answering else "   (not answering)"))
    grid.add_row("actors", _actors_text(s))
    parts: list[RenderableType] = [grid]
    if s.warning:
        parts.append(Text(f"⚠ {s.warning}", style="bold yellow"))
    return Panel(Group(*parts), title=f"dynamo-rl · {s.run_name}", title_align="left", border_style="blue")


def _reward_text(rewards: tuple[float, ...]) -> Text:
    if not rewards:
        return Text("-", style="dim")
    return Text.assemble((sparkline(rewards), "green"), f"  {rewards[-1]:.3f}",
                         (f"  (last {len(rewards)} steps, min {min(rewards):.2f} max {max(rewards):.2f})", "dim"))


def _eval_text(evals: tuple[tuple[int, float], ...]) -> Text:
    if not evals:
        return Text("-", style="dim")
    shown = evals[-6:]
    trail = " → ".join(f"{v:.2f}" for _, v in shown)
    return Text.assemble(("… " if len(evals) > len(shown) else "") + trail, (f"  (step {shown[-1][0]})", "dim"))


def _actors_text(s: RunStatus) -> str:
    alive = "?" if s.actors_alive is None else s.actors_alive
    registered = "" if s.actors_registered is None else f", {s.actors_registered} registered at the buffer"
    return f"{alive}/{s.actors_total} alive{registered}"


def sparkline(values: tuple[float, ...] | list[float]) -> str:
    """One block character per value, scaled between the values' min and max (flat values draw the middle)."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return SPARK[len(SPARK) // 2 - 1] * len(values)
    top = len(SPARK) - 1
    return "".join(SPARK[round((v - lo) / (hi - lo) * top)] for v in values)


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------- output


def display_mode(quiet: bool, console: Console) -> str:
    """'quiet' (final summary only), 'live' (a terminal) or 'lines' (a log file or pipe)."""
    if quiet:
        return "quiet"
    return "live" if console.is_terminal else "lines"


class ProgressDisplay:
    """Shows a RunWatch's status in the chosen mode; the supervisor calls tick(stats) every refresh_s."""

    def __init__(self, run_dir: Path, cfg: Config, quiet: bool = False,
                 actors_alive: Callable[[], int] | None = None, console: Console | None = None):
        self.console = console or Console(highlight=False)
        self.mode = display_mode(quiet, self.console)
        if self.mode != "live" and console is None:
            # A fixed wide width keeps one line per refresh when stdout is a log file, not a terminal.
            self.console = Console(highlight=False, width=200, soft_wrap=True)
        self.watch = RunWatch(run_dir, cfg, actors_alive)
        self.refresh_s = 1.0 if self.mode == "live" else 5.0
        self._live: Any = None
        self._stats: dict[str, Any] = {}

    def note(self, message: str) -> None:
        """A message for the person watching (not shown in quiet mode)."""
        if self.mode != "quiet":
            self.console.print(message)

    def start(self) -> None:
        if self.mode == "live":
            from rich.live import Live

            self._live = Live(render_status(self.watch.update({})), console=self.console, auto_refresh=False)
            self._live.start(refresh=True)

    def tick(self, stats: dict[str, Any]) -> None:
        self._stats = stats
        status = self.watch.update(stats)
        if self.mode == "live":
            self._live.update(render_status(status), refresh=True)
        elif self.mode == "lines":
            self.console.print(status_line(status))
            if status.warning:
                self.console.print(f"warning: {status.warning}")

    def evaluating(self) -> None:
        """The learner finished; the supervisor waits for the pending held-out evaluations."""
        self.watch.final_evaluation = True
        self.tick(self._stats)

    def shutting_down(self) -> None:
        self.watch.shutting_down = True
        self.tick(self._stats)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def eval_history(run_dir: Path) -> list[dict[str, Any]]:
    """Held-out evaluation records (in step order, one per evaluated version); torn lines are skipped."""
    from common.metrics import eval_records

    return eval_records(_run_records(run_dir)[0])


def _run_records(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """(every record of metrics.jsonl, lines skipped as torn)."""
    from common.metrics import read_metrics_counted

    path = run_dir / "metrics.jsonl"
    return read_metrics_counted(path) if path.exists() else ([], 0)


def final_report(run_dir: Path, cfg: Config, outcome: str, console: Console, report: Path | None = None) -> int:
    """Print held-out accuracy at start vs end and where everything is; return the process exit code."""
    from common.metrics import eval_records

    records, skipped = _run_records(run_dir)
    evals = eval_records(records)
    console.print(f"run {outcome}: {run_dir}")
    if skipped:
        console.print(f"metrics.jsonl: skipped {skipped} torn lines (records cut short by a failed write)")
    if evals:
        first, last = evals[0], evals[-1]
        k = cfg.run.eval_samples
        console.print(
            f"held-out pass@1: {first['eval/pass@1']:.3f} (step {first['step']}) -> "
            f"{last['eval/pass@1']:.3f} (step {last['step']}); pass@{k}: "
            f"{first.get(f'eval/pass@{k}', float('nan')):.3f} -> {last.get(f'eval/pass@{k}', float('nan')):.3f}")
        if f"eval/suite/avg@{k}" in last:
            nan = float("nan")
            console.print(
                f"suite {cfg.run.eval_suite} (mean over benchmarks) avg@{k}: "
                f"{first.get(f'eval/suite/avg@{k}', nan):.3f} -> {last[f'eval/suite/avg@{k}']:.3f}; pass@{k}: "
                f"{first.get(f'eval/suite/pass@{k}', nan):.3f} -> {last.get(f'eval/suite/pass@{k}', nan):.3f}")
    if report is not None:
        console.print(f"report: {report}")
    console.print(f"metrics: {run_dir / 'metrics.jsonl'} | wandb (offline): wandb sync {run_dir / 'wandb'}")
    console.print(f"inspect the buffer: python -m buffer.inspect --snapshot {run_dir / 'buffer_snapshot.msgpack'} summary")
    return 0 if outcome in ("completed", "stopped") else 1
