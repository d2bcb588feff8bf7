"""The supervisor behind run_async.py: starts the roles, watches them, restarts actors, shuts down in order.

Policy: a dead actor is restarted (up to actor.max_restarts times; the buffer re-issues its lease when it
expires); a dead buffer is restarted from its last snapshot (up to buffer.max_restarts times; the learner
re-announces its version to it and the actors reconnect); a dead learner stops the run with a message naming its
log (resume it with `run_async.py --resume`). Every restart is announced with the role's log. When the learner has
finished, the actors still run the held-out evaluations the buffer has pending (its last version's among them):
`wait_for_evaluations` waits for them up to run.eval_timeout_s, still restarting dead actors and a dead buffer.
Shutdown order: learner first (it checkpoints and asks the buffer for a snapshot), then actors, then the buffer
(it writes its final snapshot).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from common.config import Config
from common.layout import narrowed_env, role_gpu_ids
from common.processes import RoleProcess

BUFFER_READY_TIMEOUT_S = 120.0


def _print_flushed(message: str) -> None:
    print(message, flush=True)


def _gpu_env(gpu_ids: tuple[int, ...]) -> dict[str, str]:
    """A role sees only its own GPUs (common/layout.py; the layout refuses overlapping NCCL ranks here, at start)."""
    return narrowed_env(gpu_ids) if gpu_ids else {}


class RoleFailed(RuntimeError):
    """A role that the run cannot go on without has died; the message names its log."""


class Supervisor:
    def __init__(self, cfg: Config, run_dir: Path, announce: Callable[[str], None] | None = None):
        """`announce` shows a restart to the person watching (the progress output)."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.announce = announce or _print_flushed
        config_file = str(run_dir / "config.json")
        common = ["--config-file", config_file, "--run-dir", str(run_dir)]
        logs = run_dir / "logs"
        self.buffer = RoleProcess("buffer", "buffer.server", common, logs / "buffer.log")
        learner_args = common + (["--resume"] if cfg.run.resume else [])
        self.learner = RoleProcess("learner", "learner.train", learner_args, logs / "learner.log",
                                   env=_gpu_env(role_gpu_ids(cfg, "learner")))
        self.actors = [
            RoleProcess(f"actor{i}", "actor.worker", common + ["--actor-index", str(i)], logs / f"actor{i}.log",
                        env=_gpu_env(role_gpu_ids(cfg, "actor", i)))
            for i in range(cfg.actor.num_actors)
        ]
        self._client: Any = None

    # ------------------------------------------------------------------------------------------- start

    def start_buffer(self) -> None:
        self.buffer.start()
        if not self._wait_for_buffer():
            self._check_alive(self.buffer)

    def _wait_for_buffer(self) -> bool:
        """True once the buffer answers, False if it died first; RoleFailed if it neither answers nor dies."""
        deadline = time.monotonic() + BUFFER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.buffer.returncode() is not None:
                return False
            if self.buffer_stats():
                return True
            time.sleep(0.3)
        raise RoleFailed(f"buffer did not answer within {BUFFER_READY_TIMEOUT_S:.0f} s; see {self.buffer.log_path}")

    def start_learner(self) -> None:
        self.learner.start()

    def start_actors(self) -> None:
        for actor in self.actors:
            actor.start()

    # ------------------------------------------------------------------------------------------- watch

    def watch(self, stop_requested: list[bool], on_tick: Callable[[dict], None], refresh_s: float) -> str:
        """Run until the learner finishes ('completed'), a stop is requested ('stopped') or a role fails."""
        next_tick = time.monotonic()
        while not stop_requested[0]:
            code = self.learner.returncode()
            if code == 0:
                return "completed"
            if code is not None:
                raise RoleFailed(f"learner exited with status {code}; see {self.learner.log_path}\n"
                                 f"{self.learner.log_tail()}")
            self._restart_dead_buffer()
            self._restart_dead_actors()
            if time.monotonic() >= next_tick:
                on_tick(self.buffer_stats())
                next_tick = time.monotonic() + refresh_s
            time.sleep(0.2)
        return "stopped"

    def wait_for_evaluations(self, stop_requested: list[bool], on_tick: Callable[[dict], None],
                             refresh_s: float) -> bool:
        """After the learner finished: wait until the buffer reports no pending evaluation (`eval_pending`), up to
        run.eval_timeout_s or a stop request; True when none is left."""
        deadline = time.monotonic() + self.cfg.run.eval_timeout_s
        next_tick = time.monotonic()
        while not stop_requested[0]:
            self._restart_dead_buffer()
            self._restart_dead_actors()
            stats = self.buffer_stats()
            if stats and not stats.get("eval_pending"):
                return True
            if time.monotonic() >= deadline:
                return False
            if time.monotonic() >= next_tick:
                on_tick(stats)
                next_tick = time.monotonic() + refresh_s
            time.sleep(0.2)
        return False

    def _check_alive(self, role: RoleProcess) -> None:
        code = role.returncode()
        if code is not None:
            raise RoleFailed(f"{role.name} exited with status {code}; see {role.log_path}\n{role.log_tail()}")

    def _restart_dead_buffer(self) -> None:
        """Restart a dead buffer from its snapshot and wait until it answers (a restart that dies is retried)."""
        while (code := self.buffer.returncode()) is not None:
            if self.buffer.restarts >= self.cfg.buffer.max_restarts:
                raise RoleFailed(f"buffer died {self.buffer.restarts + 1} times (last status {code}); "
                                 f"see {self.buffer.log_path}\n{self.buffer.log_tail()}")
            self.announce(f"buffer exited with status {code}; restarting it from its snapshot "
                          f"({self.buffer.restarts + 1}/{self.cfg.buffer.max_restarts}); log: {self.buffer.log_path}")
            self.buffer.restart()
            if self._wait_for_buffer():
                self.announce(f"buffer answers again (restart {self.buffer.restarts}); what it received after its "
                              "last snapshot is lost, trained steps are not")

    def _restart_dead_actors(self) -> None:
        for actor in self.actors:
            code = actor.returncode()
            if code is None:
                continue
            if actor.restarts >= self.cfg.actor.max_restarts:
                raise RoleFailed(f"{actor.name} died {actor.restarts + 1} times (last status {code}); "
                                 f"see {actor.log_path}\n{actor.log_tail()}")
            self.announce(f"{actor.name} exited with status {code}; restarting ({actor.restarts + 1}/"
                          f"{self.cfg.actor.max_restarts}); log: {actor.log_path}")
            actor.restart()

    def buffer_stats(self) -> dict:
        """The buffer's counters, or {} if it does not answer right now."""
        from buffer.client import BufferClient, BufferTimeout

        if self._client is None:
            self._client = BufferClient.from_config(self.cfg.buffer, timeout_s=2.0)
        try:
            return self._client.stats()
        except BufferTimeout:
            return {}

    # ------------------------------------------------------------------------------------------- stop

    def shutdown(self) -> None:
        """Learner (checkpoint), then actors, then buffer (final snapshot); SIGKILL whatever hangs."""
        self.learner.terminate(timeout_s=120.0)
        for actor in self.actors:
            actor.terminate(timeout_s=30.0)
        if self._client is not None:
            self._client.close()
            self._client = None
        self.buffer.terminate(timeout_s=30.0)

    def pids(self) -> list[int]:
        return [p.pid for p in (self.buffer, self.learner, *self.actors) if p.pid is not None]
