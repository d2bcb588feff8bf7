"""Child-process management for run_async.py: one `RoleProcess` per role, each with its own log file.

Children are started as plain `python -m <module> ...` so any role can equally be run by hand or under a debugger.
On Linux each child asks the kernel to SIGTERM it if the supervisor dies (PR_SET_PDEATHSIG), so even a
`kill -9` of the supervisor leaves no orphans. Each child leads a process group of its own: Ctrl-C in a terminal
signals the supervisor only, and the supervisor's ordered shutdown stops the roles.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM this (child) process when its parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_setup() -> None:
    """In the child before it runs: a process group of its own, so that a terminal's Ctrl-C (SIGINT to the
    foreground group) reaches the supervisor alone, which stops the roles in order (learner, actors, buffer: none
    waits out a timeout on a role already gone); and, on Linux, death with the parent."""
    os.setpgrp()
    if sys.platform.startswith("linux"):
        die_with_parent()


class RoleProcess:
    """A supervised child: start, restart, poll, terminate, with stdout+stderr in `log_path`."""

    def __init__(self, name: str, module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.module = module
        self.args = args
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n=== start {self.name} (restart {self.restarts}) at {time.ctime()} ===\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     cwd=Path(__file__).resolve().parents[1], preexec_fn=_child_setup)
        log.close()

    def restart(self) -> None:
        self.restarts += 1
        self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def returncode(self) -> int | None:
        """None while running; the exit status (negative: killed by that signal) once it has exited."""
        return None if self.proc is None else self.proc.poll()

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL. Returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.returncode()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PICK = 15000  # below this sit many services' well-known ports (8000, 8080, 9090, ...)
_picked: set[int] = set()


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out for `bind(0)` and outgoing connections (Linux's default when unreadable)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and outside the kernel's ephemeral range.

    A port the OS picked with `bind(0)` is ephemeral: between this pick and the bind that uses it, any outgoing
    connection or `bind(0)` may take it (gloo's pair sockets and NCCL's bootstrap do exactly that while a process
    group forms), and the later bind fails with "Address already in use". A port below the ephemeral range is only
    ever taken by an explicit bind. This process never returns the same port twice; processes that pick at the same
    moment draw at random from ~17,000 ports, and a port already bound is skipped. Falls back to `bind(0)` where the
    ephemeral range leaves no room below or above it."""
    low, high = ephemeral_port_range()
    span = range(_LOWEST_PICK, low) if low - _LOWEST_PICK >= 1000 else range(high + 1, 65536)
    if len(span) >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.choice(span)
            if port not in _picked and not port_in_use("127.0.0.1", port, reuse=False):
                _picked.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int, reuse: bool = True) -> bool:
    """Whether binding `port` fails; with `reuse` (SO_REUSEADDR) a port held only by closed connections in
    TIME_WAIT counts as free, as it is for a server socket that sets the option."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("*", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return True
        return False
