"""Progress display of a run: one line per refresh (readable in a terminal and in a log file) and a final report.

The line is built from the newest learner and actor records of metrics.jsonl plus the buffer's live counters:
    step 12/40 v12 | reward 0.41 | eval@1 0.23 | samples/s 35.1 | idle 12% | queue 3 | stale 0.8 | 02:31
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from common.config import Config


class MetricsTail:
    """Reads records appended to metrics.jsonl since the last call (by file offset)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next call
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


class ProgressPrinter:
    def __init__(self, run_dir: Path, cfg: Config):
        self.cfg = cfg
        # A fixed wide width keeps one line per refresh when stdout is a log file, not a terminal.
        self.console = Console(highlight=False, width=200, soft_wrap=True)
        self.tail = MetricsTail(run_dir / "metrics.jsonl")
        self.latest: dict[str, Any] = {}
        self.samples = 0
        self.start = time.monotonic()

    def tick(self, buffer_stats: dict[str, Any]) -> None:
        for rec in self.tail.new_records():
            fields = {k: v for k, v in rec.items() if v is not None}
            if rec.get("role") != "learner":
                fields.pop("step", None)  # the step shown is the learner's; other roles count their own
            self.latest.update(fields)
        self.console.print(self.line(buffer_stats))

    def line(self, stats: dict[str, Any]) -> str:
        m = self.latest
        elapsed = time.monotonic() - self.start
        samples = stats.get("samples_received", 0)
        parts = [
            f"step {m.get('step', 0)}/{self.cfg.learner.total_steps} v{stats.get('policy_version', '?')}",
            f"reward {_fmt(m.get('reward/mean'))}",
            f"eval@1 {_fmt(m.get('eval/pass@1'))}",
            f"samples/s {samples / max(elapsed, 1e-9):.1f}",
            f"idle {_pct(m.get('time/idle_fraction'))}",
            f"queue {stats.get('queue_depth', '?')}",
            f"stale {_fmt(m.get('buffer/staleness/mean'), 1)}",
            f"{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}",
        ]
        return " | ".join(parts)


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def eval_history(run_dir: Path) -> list[dict[str, Any]]:
    """Learner evaluation records (in step order)."""
    from common.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in read_metrics(path, role="learner") if r.get("eval/pass@1") is not None]


def final_report(run_dir: Path, cfg: Config, outcome: str, console: Console) -> int:
    """Print held-out accuracy at start vs end and where everything is; return the process exit code."""
    evals = eval_history(run_dir)
    console.print(f"run {outcome}: {run_dir}")
    if evals:
        first, last = evals[0], evals[-1]
        k = cfg.run.eval_samples
        console.print(
            f"held-out pass@1: {first['eval/pass@1']:.3f} (step {first['step']}) -> "
            f"{last['eval/pass@1']:.3f} (step {last['step']}); pass@{k}: "
            f"{first.get(f'eval/pass@{k}', float('nan')):.3f} -> {last.get(f'eval/pass@{k}', float('nan')):.3f}")
    console.print(f"metrics: {run_dir / 'metrics.jsonl'} | wandb (offline): wandb sync {run_dir / 'wandb'}")
    console.print(f"inspect the buffer: python -m buffer.inspect --snapshot {run_dir / 'buffer_snapshot.msgpack'} summary")
    return 0 if outcome in ("completed", "stopped") else 1
