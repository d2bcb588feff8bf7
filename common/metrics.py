"""Metrics: one JSON line per record in <run_dir>/metrics.jsonl, mirrored to wandb (offline by default).

Names follow `namespace/quantity[/reduction]` with the namespaces of NAMESPACES. Every record carries the
writing role and a step, so several processes can append to the same file (each line is written with a single
O_APPEND write, which does not interleave for lines of this size). Each role gets its own wandb run in a group
named after the run.

A full disk must not stop training or lose the run's history: a write that fails (ENOSPC, EFBIG) is logged and
counted, never raised, and a record written after a torn line (a short write, or a file left by a process that died
mid-line) starts on a line of its own. Readers skip and count lines that are not whole records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("metrics")

NAMESPACES = ("rollout", "reward", "loss", "optim", "buffer", "allocation", "modulation", "perf", "time", "eval")


class MetricsLogger:
    def __init__(self, run_dir: str | Path | None, role: str, wandb_mode: str = "disabled",
                 wandb_project: str = "dynamo-rl", config: Mapping[str, Any] | None = None):
        self.role = role
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir else None
        self._fd: int | None = None
        self.write_errors = 0
        """Records that did not reach metrics.jsonl whole (failed or short writes)."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: see _write_line
        self._wandb = None
        if wandb_mode != "disabled" and run_dir:
            try:
                self._wandb = _init_wandb(Path(run_dir), role, wandb_mode, wandb_project, config)
            except ImportError as exc:  # a missing logging backend must not stop a role: metrics.jsonl still holds all
                print(f"{role}: wandb could not be imported ({exc}); metrics go to {self.path} only "
                      "(install wandb, or pass --run.wandb-mode disabled)", file=sys.stderr, flush=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one record; non-finite floats become null in JSON (and are skipped for wandb)."""
        for key in metrics:
            if key.split("/", 1)[0] not in NAMESPACES:
                raise ValueError(f"metric {key!r}: namespace must be one of {NAMESPACES}")
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        record = {"role": self.role, "step": int(step), "time": time.time(), **clean}
        if self._fd is not None:
            self._write_line(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=int(step))

    def _write_line(self, line: str) -> None:
        """One write call per record, so concurrent writers never interleave. If the file ends inside a line (a
        write of any writer, or of a process that died, was cut short) the record first ends that line. A failed
        or short write is logged and counted, never raised."""
        try:
            data = (("\n" if _ends_inside_a_line(self._fd) else "") + line).encode()
            written = os.write(self._fd, data)
        except OSError as exc:
            self.write_errors += 1
            log.warning("metrics: record of %s not written to %s (%s); %d records lost so far", self.role,
                        self.path, exc, self.write_errors)
            return
        if written < len(data):
            self.write_errors += 1
            log.warning("metrics: short write to %s (%d of %d bytes; disk full?); readers skip the torn line",
                        self.path, written, len(data))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _init_wandb(run_dir: Path, role: str, mode: str, project: str, config: Mapping[str, Any] | None) -> Any:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project, dir=str(run_dir), mode=mode, group=run_dir.name, job_type=role,
                      name=f"{run_dir.name}-{role}", config=redact_secrets(config or {}), reinit="create_new")


def redact_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as logged to wandb: `run.secret` replaced, so an uploaded run cannot impersonate a role."""
    out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in config.items()}
    if isinstance(out.get("run"), dict) and out["run"].get("secret"):
        out["run"]["secret"] = "<redacted>"
    return out


def _ends_inside_a_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def parse_record(line: bytes | str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a record, or None if it is not a whole record (torn by a failed write)."""
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("role"), str) or not isinstance(rec.get("step"), int):
        return None
    return rec


def read_metrics_counted(path: str | Path, role: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """(records of a metrics.jsonl, optionally of one role, in file order; lines skipped as not whole records)."""
    records, skipped = [], 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = parse_record(line)
            if rec is None:
                skipped += 1
            elif role is None or rec["role"] == role:
                records.append(rec)
    return records, skipped


def read_metrics(path: str | Path, role: str | None = None) -> list[dict[str, Any]]:
    """All whole records of a metrics.jsonl (optionally of one role), in file order; torn lines are skipped."""
    records, skipped = read_metrics_counted(path, role)
    if skipped:
        log.warning("%s: skipped %d torn lines", path, skipped)
    return records


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out evaluation records in step (= evaluated version) order, one per step: the `eval` role's (the
    buffer writes one per finished evaluation), or, for runs that evaluated inside the learner, the learner's
    records that carry eval/pass@1."""
    by_step = {r["step"]: r for r in records if r.get("role") == "learner" and r.get("eval/pass@1") is not None}
    by_step.update({r["step"]: r for r in records if r.get("role") == "eval" and r.get("eval/pass@1") is not None})
    return [by_step[step] for step in sorted(by_step)]
