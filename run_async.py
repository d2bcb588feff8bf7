"""Start and supervise the whole system — buffer, actors, learner — in one command.

    python run_async.py                              # embedded default (cpu-demo): SmolLM2-135M, arithmetic
    python run_async.py --preset tiny                # random tiny model, < 2 minutes
    python run_async.py --algo.max-staleness 0       # synchronous on-policy baseline
    python run_async.py --resume runs/<name>         # continue a stopped run
    python run_async.py --quiet                      # print only the final summary
    python run_async.py --preset paper-1.5b --dry-run   # check model and data, print the plan, start nothing
    python run_async.py --help                       # every knob

The story: resolve the config → check the model (a hub model downloads here, once) → write the config into
runs/<name>/ → start the buffer and wait until it answers → start the learner and the actors (each a plain
`python -m ...` child with its own log) → watch them, showing a live status in a terminal (one progress line
per refresh in a log file), restarting dead actors and a dead buffer (from its snapshot) → when the learner
finishes, wait for the held-out evaluations the actors still run (up to run.eval_timeout_s) → (also on Ctrl-C)
shut down in order: learner (checkpoint), actors, buffer (snapshot) → draw
runs/<name>/report.png → print held-out accuracy at start and end.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from common.config import Config, ConfigError, parse_cli, save_config, with_overrides


def resolve_config(argv: Sequence[str]) -> Config:
    """Parse the CLI; `--resume RUN_DIR` starts from that run's saved config."""
    from common.config import _pop_option

    args = list(argv)
    try:
        resume = _pop_option(args, "--resume")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if resume is None:
        return parse_cli(args, description=__doc__)
    run_dir = Path(resume)
    if not (run_dir / "config.json").exists():
        raise SystemExit(f"error: --resume {resume}: no config.json there (is it a run directory?)")
    cfg = parse_cli(["--config-file", str(run_dir / "config.json"), *args], description=__doc__)
    return with_overrides(cfg, run={"resume": str(run_dir), "name": run_dir.name,
                                    "runs_dir": str(run_dir.parent)})


def prepare_run_dir(cfg: Config) -> tuple[Config, Path]:
    """Name the run, pick free ports where asked (port 0) or where a loopback default is busy, save config.json."""
    from common.addresses import resolve_ports

    name = cfg.run.name or f"{_preset_name()}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = with_overrides(cfg, run={"name": name})
    run_dir = Path(cfg.run.runs_dir) / name
    if run_dir.exists() and not cfg.run.resume and (run_dir / "config.json").exists():
        raise SystemExit(f"error: {run_dir} already holds a run; pick another --run.name or use --resume {run_dir}")
    cfg = resolve_ports(cfg)
    if not cfg.run.secret:
        cfg = with_overrides(cfg, run={"secret": secrets.token_hex(16)})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    from buffer.curve import with_run_curve_keys

    cfg = with_run_curve_keys(cfg, run_dir)  # a buffer other hosts can reach speaks CURVE only
    save_config(cfg, run_dir / "config.json")
    os.chmod(run_dir / "config.json", 0o600)
    return cfg, run_dir


def _preset_name() -> str:
    for i, arg in enumerate(sys.argv):
        if arg == "--preset" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return "cpu-demo"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quiet, dry_run = "--quiet" in args, "--dry-run" in args
    cfg = resolve_config([a for a in args if a not in ("--quiet", "--dry-run")])
    from common.plan import check_model_or_exit, plan_lines

    if dry_run:
        print("\n".join(["dry run: nothing is started", *plan_lines(cfg), *eval_suite_lines(cfg)]))
        return 0
    check_model_or_exit(cfg)  # a hub model downloads here, once, before any role starts
    cfg, run_dir = prepare_run_dir(cfg)
    from common.progress import ProgressDisplay, final_report
    from common.supervisor import RoleFailed, Supervisor

    supervisor = Supervisor(cfg, run_dir)
    display = ProgressDisplay(run_dir, cfg, quiet=quiet,
                              actors_alive=lambda: sum(a.returncode() is None for a in supervisor.actors))
    display.note(f"run directory: {run_dir}  (logs in {run_dir / 'logs'})")
    from common.plan import dtype_warnings

    for line in dtype_warnings(cfg):
        display.note(line)
    supervisor.announce = display.note  # restarts of the buffer and the actors show in the progress output
    stop_requested = _install_signal_handlers()
    outcome = "failed"
    display.start()
    try:
        supervisor.start_buffer()
        supervisor.start_learner()
        supervisor.start_actors()
        outcome = supervisor.watch(stop_requested, on_tick=display.tick, refresh_s=display.refresh_s)
        if outcome == "completed":
            wait_for_evaluations(supervisor, display, stop_requested)
        display.tick(supervisor.buffer_stats())
    except RoleFailed as exc:
        display.console.print(f"[bold red]run stopped:[/] {exc}")
    finally:
        display.shutting_down()
        supervisor.shutdown()
        display.stop()
    report = write_run_report(run_dir, display.console)
    return final_report(run_dir, cfg, outcome, display.console, report)


def eval_suite_lines(cfg: Config) -> list[str]:
    """The dry run's check of run.eval_suite: its benchmarks as the buffer will load them. One that cannot be read
    is a warning, not an error: the suite data may be fetched after the plan is checked (the buffer refuses to
    start without it, naming the benchmark)."""
    run = cfg.run
    if not run.eval_suite:
        return []
    from common.suites import SuiteError, describe_suite
    from common.tasks import TaskError

    head = (f"eval suite {run.eval_suite}: {run.eval_samples} samples + 1 greedy answer per prompt, "
            f"{run.eval_suite_size or 'all'} prompts per benchmark")
    try:
        return [head, *(f"eval suite {line}" for line in describe_suite(run.eval_suite, run.eval_suite_size or None))]
    except (SuiteError, TaskError) as exc:
        return [head, f"warning: run.eval_suite: {exc} (the buffer will not start without it)"]


def wait_for_evaluations(supervisor: Any, display: Any, stop_requested: list[bool]) -> None:
    """The learner finished: the actors finish the buffer's pending held-out evaluations (the last version's)."""
    display.evaluating()
    if not supervisor.wait_for_evaluations(stop_requested, on_tick=display.tick, refresh_s=display.refresh_s):
        pending = supervisor.buffer_stats().get("eval_pending")
        display.note(f"held-out evaluation of versions {pending} not finished within run.eval_timeout_s "
                     f"({supervisor.cfg.run.eval_timeout_s:.0f} s) or stopped; shutting down without it")


def write_run_report(run_dir: Path, console: Any) -> Path | None:
    """Draw runs/<name>/report.png. A failed drawing is reported and does not change the run's exit status: the
    run's data is already on disk and `python -m common.report <run_dir>` can draw it again."""
    from common.report import write_report

    try:
        return write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - any plotting failure; the message is shown, the run result stands
        console.print(f"[yellow]report.png not written:[/] {type(exc).__name__}: {exc}")
        return None


def _install_signal_handlers() -> list[bool]:
    """Ctrl-C / SIGTERM set a flag that the watch loop turns into an ordered shutdown."""
    flag = [False]

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return flag


if __name__ == "__main__":
    sys.exit(main())
