"""The replay buffer service: one process, one ZeroMQ ROUTER socket, one single-threaded event loop.

Run alone:
    python -m buffer.server --preset tiny --prompts-jsonl prompts.jsonl --buffer.address tcp://127.0.0.1:5555
or as run_async.py starts it:
    python -m buffer.server --config-file runs/<name>/config.json --run-dir runs/<name>

Prompts come from `common.tasks.load_prompts(cfg.task, "train")`, or from `--prompts-jsonl FILE` (rows
{prompt_id, question, answer, metadata}), less those whose question a benchmark of run.eval_suite asks. Every
request is decoded with the typed schemas of `common.schemas`, applied to the pure state machine
`buffer.state.BufferState`, and answered with exactly one reply; undecodable or invalid requests get an
`Error(code, message)` naming the field and are counted, never crash the loop. Long poll:
a Fetch or LeaseRequest with `wait_s > 0` that would get nothing now (too few queued groups; admission control or
back-pressure) is held, in arrival order, and answered the moment it can be served or when its wait runs out, so
neither the learner nor an actor sleeps past the event it waits for. The state is
snapshotted atomically (tmp + fsync + rename, the previous file kept as `<snapshot>.prev`) every
`buffer.snapshot_interval_s`, on SnapshotRequest and on SIGTERM/SIGINT, and restored on start (a corrupt file is
refused by name and the previous one used). With a run dir, `buffer/*` metrics go to <run_dir>/metrics.jsonl every
few seconds, and each finished held-out evaluation (buffer/evaluation.py: the held-out prompts of the task, handed
to the actors as evaluation leases) as one record with role `eval` and step = the evaluated version. An address with
port 0 binds a free port; the bound endpoint is printed as `buffer listening on ...`.

Failure model: nothing a client sends can stop the loop. Every integer is range-checked at decode time; an
exception while handling, encoding or sending a reply is logged, counted (`errors.internal`) and answered with
`Error("internal")`; a failed snapshot write is logged, counted (`snapshot_failures`) and retried at the next
interval while the last good snapshot stays. Only the registered learner may report versions: it registers with
the run's secret (`run.secret`) and gets a session token its reports carry; a new learner registration takes over.
A non-loopback bind needs CURVE (or `buffer.insecure`). Per-client memory (registrations, replay cache) is bounded
by `buffer.max_clients`.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.auth

from buffer.curve import is_local_address
from buffer.state import BufferState, PromptRecord, Rejection, SnapshotError, decode_snapshot, encode_snapshot
from common.config import Config, config_to_dict, parse_cli
from common.schemas import (
    Ack,
    Error,
    EvalSubmit,
    Fetch,
    InspectReply,
    InspectRequest,
    LeaseRequest,
    Register,
    Registered,
    Release,
    ReportVersion,
    SnapshotRequest,
    Stats,
    StatsRequest,
    Submit,
    WireError,
    decode_message,
    encode_message,
)

log = logging.getLogger("buffer")

METRICS_INTERVAL_S = 5.0
TICK_S = 0.2
"""Longest poll: how quickly expiry, snapshots, metrics and a stop request are noticed while idle."""
MAX_WAIT_S = 60.0
"""Longest long-poll a Fetch or LeaseRequest may ask for (`wait_s`)."""
MAX_PARKED = 1024
"""Held long-poll requests at most; beyond it a request is answered at once (bounded memory under any input)."""


@dataclass
class _Parked:
    """A long-poll request held until it can be answered usefully or its wait runs out."""

    envelope: list[bytes]
    msg: Any  # Fetch | LeaseRequest
    deadline: float


# ---------------------------------------------------------------------------------------------- prompts


def load_eval_prompt_records(cfg: Config) -> list[PromptRecord]:
    """The held-out prompts the buffer's evaluation jobs use (none when task.eval_size is 0, or when run.eval_suite
    evaluates a benchmark suite instead)."""
    if cfg.task.eval_size <= 0 or cfg.run.eval_suite:
        return []
    from common.tasks import load_prompts

    return [PromptRecord(p.prompt_id, p.question, p.answer, json.dumps(p.metadata))
            for p in load_prompts(cfg.task, "eval")]


def load_prompt_records(cfg: Config, prompts_jsonl: str = "") -> list[PromptRecord]:
    """The training prompt pool: a JSONL file of {prompt_id, question, answer, metadata} or the task module, less
    every prompt whose question a benchmark of run.eval_suite asks (`without_suite_questions`)."""
    return without_suite_questions(cfg, _pool_records(cfg, prompts_jsonl))


def without_suite_questions(cfg: Config, records: list[PromptRecord]) -> list[PromptRecord]:
    """`records` less those whose question (whitespace and case aside, `common.tasks.question_key`) one of the whole
    benchmarks of run.eval_suite asks: a training set that reprints a benchmark problem would otherwise be scored on
    what it trained on. The number dropped is logged."""
    if not cfg.run.eval_suite:
        return records
    from buffer.evaluation import suite_prompts
    from common.tasks import without_questions

    kept = without_questions(records, (p.question for p in suite_prompts(cfg.run.eval_suite, 0)))
    if len(kept) < len(records):
        log.info("%d training prompt(s) dropped: their question is in a benchmark of suite %s",
                 len(records) - len(kept), cfg.run.eval_suite)
    return kept


def _pool_records(cfg: Config, prompts_jsonl: str) -> list[PromptRecord]:
    if prompts_jsonl:
        records = []
        with open(prompts_jsonl) as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                try:
                    records.append(PromptRecord(str(row["prompt_id"]), str(row["question"]), str(row["answer"]),
                                                json.dumps(row.get("metadata", {}))))
                except KeyError as exc:
                    raise ValueError(f"{prompts_jsonl}:{line_no}: missing field {exc}") from None
        return records
    from common.tasks import load_prompts

    return [PromptRecord(p.prompt_id, p.question, p.answer, json.dumps(p.metadata))
            for p in load_prompts(cfg.task, "train")]


# ---------------------------------------------------------------------------------------------- snapshots


def previous_snapshot_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def write_snapshot_file(path: Path, data: bytes) -> None:
    """Atomic replace keeping the previous file as `.prev`: a reader (or a kill -9) sees the old file or the new
    one, never a torn one, and a snapshot that later turns out corrupt still has a good predecessor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a partial temp file must not fill what little space is left
        raise
    if path.exists():
        os.replace(path, previous_snapshot_path(path))
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the renames themselves durable
    finally:
        os.close(dir_fd)


def load_snapshot_file(path: Path) -> Any:
    """The Snapshot in `path`; SnapshotError naming the file if it is corrupt, truncated or of another format."""
    return decode_snapshot(path.read_bytes(), source=str(path))


def restore_or_create(cfg: Config, prompts: list[PromptRecord], snapshot_path: Path | None,
                      eval_prompts: list[PromptRecord] | None = None) -> BufferState:
    """Restore from the snapshot (or, if it is corrupt, the previous one) or start fresh; persist at once.

    Writing the new state before serving persists its incarnation, so two restarts from one snapshot never hand out
    the same lease ids. A corrupt newest snapshot is moved aside (`.corrupt`) when the previous one is used; if
    snapshots exist but none can be loaded, this refuses to start (ValueError naming the files) rather than start
    empty and lose the run's queue and statistics.
    """
    now = time.monotonic()
    eval_prompts = eval_prompts or []
    if snapshot_path is None:
        return BufferState(cfg, prompts, now=now, eval_prompts=eval_prompts)
    candidates = [p for p in (snapshot_path, previous_snapshot_path(snapshot_path)) if p.exists()]
    problems: list[str] = []
    state = None
    for path in candidates:
        try:
            state = BufferState.from_snapshot(load_snapshot_file(path), cfg, prompts, now=now,
                                              eval_prompts=eval_prompts)
        except SnapshotError as exc:
            log.error("refusing snapshot: %s", exc)
            problems.append(str(exc))
            continue
        log.info("restored %s: policy_version %d, %d queued groups, %d groups received, incarnation %d", path,
                 state.policy_version, len(state.queue), state.counters.groups_received, state.incarnation)
        if path != snapshot_path and snapshot_path.exists():
            os.replace(snapshot_path, snapshot_path.with_name(snapshot_path.name + ".corrupt"))
        break
    if state is None and candidates:
        raise ValueError("no usable buffer snapshot: " + "; ".join(problems) + " (move them away to start empty)")
    state = state or BufferState(cfg, prompts, now=now, eval_prompts=eval_prompts)
    try:
        write_snapshot_file(snapshot_path, encode_snapshot(state.to_snapshot(time.time())))
    except OSError as exc:
        state.counters.snapshot_failures += 1
        log.error("snapshot %s: cannot write the restored state (%s); lease ids may repeat if the buffer dies "
                  "before the next successful snapshot", snapshot_path, exc)
    return state


# ---------------------------------------------------------------------------------------------- metrics


def metrics_record(stats: dict[str, Any], previous: dict[str, Any] | None, dt: float) -> dict[str, float]:
    """`buffer/*` metrics from a stats dict; rates from the previous record."""
    scalar_keys = ("queue_depth", "in_flight", "live_leases", "admission_room", "epoch", "epoch_progress",
                   "leases_granted", "leases_expired", "leases_released", "prompts_leased", "groups_received",
                   "groups_zero_variance", "groups_dropped_stale", "groups_dropped_rollback", "groups_served",
                   "groups_served_before_restore", "samples_received", "messages_bad", "snapshot_failures", "informative_yield",
                   "informative_sample_yield", "prompts_skipped", "prompts_revisited", "prompts_forced",
                   "revisits_informative", "skip_probability")
    m: dict[str, float] = {f"buffer/{k}": stats[k] for k in scalar_keys}
    m["buffer/groups_rejected"] = sum(stats["groups_rejected"].values())
    for reason, count in stats["groups_rejected"].items():
        m[f"buffer/groups_rejected/{reason}"] = count
    for reason, count in stats["lease_waits"].items():
        m[f"buffer/lease_waits/{reason}"] = count
    received = stats["groups_received"]
    m["buffer/zero_variance_fraction"] = stats["groups_zero_variance"] / received if received else 0.0
    hist = stats["staleness_hist"]
    served = sum(hist.values())
    if served:
        m["buffer/staleness/mean"] = sum(int(s) * c for s, c in hist.items()) / served
        m["buffer/staleness/max"] = max(int(s) for s in hist)
    if previous is not None and dt > 0:
        m["buffer/groups_received/rate"] = (received - previous["groups_received"]) / dt
        m["buffer/groups_served/rate"] = (stats["groups_served"] - previous["groups_served"]) / dt
    return m


def allocation_metrics(state: BufferState) -> dict[str, float]:
    """`allocation/*`: how the last allocations spread and how many prompts have a known priority."""
    last = [s.allocations[-1] for s in state.stats.values() if s.allocations]
    priorities = [row["priority"] for row in state.prompt_rows()]
    known = [p for p in priorities if p >= 0]
    m: dict[str, float] = {"allocation/known_fraction": len(known) / max(1, len(priorities))}
    if known:
        m["allocation/priority_mean"] = sum(known) / len(known)
    if last:
        m.update({"allocation/n/mean": sum(last) / len(last), "allocation/n/min": min(last),
                  "allocation/n/max": max(last)})
    return m


# ---------------------------------------------------------------------------------------------- server


class BufferServer:
    """Socket + event loop around a BufferState. `bind()`, then `serve(stop_event)`; `close()` at the end."""

    def __init__(self, cfg: Config, state: BufferState, *, snapshot_path: Path | None = None,
                 run_dir: Path | None = None):
        self.cfg = cfg
        self.state = state
        self.snapshot_path = snapshot_path
        self.run_dir = run_dir
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.endpoint = ""
        self._auth: Any = None
        self._dirty = False
        self._last_snapshot = time.monotonic()
        self._replay: OrderedDict[tuple[str, str], tuple[int, Any]] = OrderedDict()  # least recent first
        self._learner_session = ""
        self._parked: list[_Parked] = []
        self._metrics: Any = None
        self._eval_metrics: Any = None
        self._last_metrics: tuple[float, dict[str, Any]] | None = None
        self._handlers: dict[type, Callable[[Any, float], Any]] = {
            Register: self._on_register, LeaseRequest: self._on_lease, Submit: self._on_submit,
            EvalSubmit: self._on_eval_submit, Release: self._on_release, Fetch: self._on_fetch,
            ReportVersion: self._on_version,
            StatsRequest: self._on_stats, InspectRequest: self._on_inspect, SnapshotRequest: self._on_snapshot,
        }
        # The held-out evaluation due at the buffer's version (version 0 of a fresh run), and the jobs a restored
        # snapshot had pending, start over now.
        self.state.evals.start(self.state.policy_version, time.monotonic())

    # ------------------------------------------------------------------------------------------- setup

    def bind(self) -> str:
        b = self.cfg.buffer
        if not b.curve_secret_key_file and not b.insecure and not is_local_address(b.address):
            raise ValueError(f"buffer.address: {b.address} is reachable from other hosts but CURVE is off; give "
                             "--buffer.curve-secret-key-file/--buffer.curve-public-keys-dir (python -m buffer.keys "
                             "DIR makes them; run_async.py does it for you) or accept the risk with --buffer.insecure")
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # The socket limit sits above the application limit so that a moderately oversized request still gets an
        # Error reply naming the limit; anything beyond it makes ZeroMQ drop the connection (bounded memory).
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.buffer.max_message_bytes)
        if self.cfg.buffer.curve_secret_key_file:
            self._enable_curve(sock)
        address = self.cfg.buffer.address
        if address.startswith("tcp://") and address.endswith(":0"):
            address = address[:-2] + ":*"
        sock.bind(address)
        self.sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.run_dir is not None:
            from common.metrics import MetricsLogger

            self._metrics = MetricsLogger(self.run_dir, "buffer", self.cfg.run.wandb_mode,
                                          self.cfg.run.wandb_project, config_to_dict(self.cfg))
            self._eval_metrics = MetricsLogger(self.run_dir, "eval", self.cfg.run.wandb_mode,
                                               self.cfg.run.wandb_project, config_to_dict(self.cfg))
        return self.endpoint

    def _enable_curve(self, sock: zmq.Socket) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        keys_dir = self.cfg.buffer.curve_public_keys_dir
        if not keys_dir or not Path(keys_dir).is_dir():
            raise ValueError(f"buffer.curve_public_keys_dir: {keys_dir!r} must be a directory of client public keys")
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=keys_dir)
        public, secret = zmq.auth.load_certificate(self.cfg.buffer.curve_secret_key_file)
        if secret is None:
            raise ValueError(f"buffer.curve_secret_key_file: {self.cfg.buffer.curve_secret_key_file} "
                             "holds no secret key")
        sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True

    # ------------------------------------------------------------------------------------------- loop

    def serve(self, stop: threading.Event) -> None:
        """Answer requests until `stop` is set; then write a final snapshot."""
        assert self.sock is not None, "bind() first"
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(self._poll_timeout_ms()):
                # Drain what is ready before doing housekeeping, but stay responsive to stop.
                for _ in range(256):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._guarded(self._handle, frames)
            self._guarded(self._housekeeping, time.monotonic())
            self._guarded(self._answer_parked, time.monotonic())
        self._guarded(self._answer_parked, float("inf"))
        self._try_snapshot("final")
        if self._metrics is not None:
            self.log_metrics(time.monotonic())

    def _poll_timeout_ms(self) -> int:
        if not self._parked:
            return int(TICK_S * 1000)
        soonest = min(p.deadline for p in self._parked) - time.monotonic()
        return max(0, int(min(TICK_S, soonest) * 1000) + 1)

    def _guarded(self, step: Callable[[Any], None], arg: Any) -> None:
        """One step of the loop; a bug in it is logged and counted, and the loop goes on serving."""
        try:
            step(arg)
        except Exception:
            log.exception("internal error in %s", step.__name__)
            self.state.count_error("internal")

    def _housekeeping(self, now: float) -> None:
        if self.state.expire_leases(now):
            self._dirty = True
        if self._dirty and now - self._last_snapshot >= self.cfg.buffer.snapshot_interval_s:
            self._try_snapshot("periodic")
        if self._metrics is not None and (self._last_metrics is None
                                          or now - self._last_metrics[0] >= METRICS_INTERVAL_S):
            self.log_metrics(now)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        # REQ peers (and our DEALER client) send [empty, payload]; a bare DEALER sends [payload].
        identity = frames[0].bytes
        if len(frames) == 3 and len(frames[1]) == 0:
            envelope, payload = [identity, b""], frames[2]
        elif len(frames) == 2:
            envelope, payload = [identity], frames[1]
        else:
            self.state.count_bad_message("bad_frames")
            self._send(envelope_for(frames), Error(code="bad_frames",
                                                    message=f"message: expected 1 payload frame, got {len(frames) - 1}"))
            return
        try:
            msg = decode_message(payload.buffer, "request", max_bytes=self.cfg.buffer.max_message_bytes)
        except WireError as exc:
            self.state.count_bad_message(exc.code)
            self._send(envelope, Error(code=exc.code, message=str(exc)))
            return
        if self._should_park(msg):
            self._parked.append(_Parked(envelope, msg, time.monotonic() + msg.wait_s))
            return
        self._send(envelope, self._reply(msg))
        if isinstance(msg, EvalSubmit):
            self._write_eval_records()

    # ------------------------------------------------------------------------------------------- long poll

    def _should_park(self, msg: Any) -> bool:
        """Hold a well-formed long-poll request that would get nothing now (a retry of an answered one is not held:
        it gets its cached reply)."""
        if not isinstance(msg, (Fetch, LeaseRequest)) or not 0.0 < msg.wait_s <= MAX_WAIT_S:
            return False  # out-of-range waits are rejected by the handler, naming the field
        if len(self._parked) >= MAX_PARKED or self._is_replay(msg):
            return False
        return not self._ready(msg)

    def _ready(self, msg: Any) -> bool:
        """True when the request can be answered usefully now, or is malformed (its handler names the field)."""
        if isinstance(msg, Fetch):
            return not self.state.fetch_would_wait(msg.n_groups, msg.after_arrival)
        return not self.state.lease_would_wait(msg.max_prompts)

    def _is_replay(self, msg: Any) -> bool:
        cached = self._replay.get(_replay_key(msg))
        return bool(msg.request_id) and cached is not None and cached[0] == msg.request_id

    def _answer_parked(self, now: float) -> None:
        """Answer, in arrival order, every held request that can now be served or whose wait has run out."""
        if not self._parked:
            return
        held = []
        for parked in self._parked:
            if now >= parked.deadline or self._ready(parked.msg):
                self._send(parked.envelope, self._reply(parked.msg))
            else:
                held.append(parked)
        self._parked = held

    # ------------------------------------------------------------------------------------------- dispatch

    def _reply(self, msg: Any) -> Any:
        try:
            return self._handlers[type(msg)](msg, time.monotonic())
        except Rejection as rej:
            self.state.count_error(rej.code)
            return Error(code=rej.code, message=rej.message)
        except Exception as exc:  # a bug must not take the buffer down with it: log loudly, answer, go on
            log.exception("internal error handling %s", type(msg).__name__)
            self.state.count_error("internal")
            return Error(code="internal", message=f"{type(msg).__name__}: {type(exc).__name__}: {exc}")

    def _send(self, envelope: list[bytes], reply: Any) -> None:
        assert self.sock is not None
        try:
            data = encode_message(reply)
        except Exception as exc:  # a reply the protocol cannot carry is a bug here, not a reason to stop serving
            log.exception("cannot encode a %s reply", type(reply).__name__)
            self.state.count_error("internal")
            data = encode_message(Error(code="internal", message=f"{type(reply).__name__}: cannot encode the reply "
                                                                 f"({type(exc).__name__}: {exc})"))
        try:
            # Zero-copy pays only for big replies (batches); for small ones its bookkeeping costs ~30 us a send.
            self.sock.send_multipart([*envelope, data], zmq.NOBLOCK, copy=len(data) < 65536)
        except zmq.Again:  # the peer's pipe is full (it stopped reading): drop the reply, it will time out
            self.state.count_error("reply_dropped")
        except zmq.ZMQError as exc:  # e.g. the peer is gone (EHOSTUNREACH): its request dies with it
            log.warning("reply to a peer dropped: %s", exc)
            self.state.count_error("reply_dropped")

    # ------------------------------------------------------------------------------------------- handlers

    def _on_register(self, msg: Register, now: float) -> Registered:
        session = ""
        if msg.role == "learner":
            expected = self.cfg.run.secret
            if expected and not hmac.compare_digest(msg.secret.encode(), expected.encode()):
                raise Rejection("auth_failed", "secret: does not match this run's secret (run.secret); only the "
                                               "run's learner may register as 'learner'")
            # A new learner registration (a restarted or resumed learner) takes over from the previous one.
            session = self._learner_session = secrets.token_hex(16)
            log.info("learner %r registered (policy_version %d)", msg.client_id, self.state.policy_version)
        return Registered(policy_version=self.state.register(msg.role, msg.client_id), session=session)

    def _on_lease(self, msg: LeaseRequest, now: float) -> Any:
        _check_wait(msg.wait_s)
        return self._once(_replay_key(msg), msg.request_id,
                          lambda: self.state.lease(msg.actor_id, msg.max_prompts, now))

    def _on_submit(self, msg: Submit, now: float) -> Any:
        self._dirty = True
        return self.state.submit(msg.lease_id, msg.group, now)

    def _on_eval_submit(self, msg: EvalSubmit, now: float) -> Any:
        self._dirty = True
        return self.state.submit_eval(msg.lease_id, msg.result, now)

    def _on_release(self, msg: Release, now: float) -> Ack:
        self._dirty = True
        return Ack(note=self.state.release(msg.lease_id, msg.prompt_ids, now))

    def _on_fetch(self, msg: Fetch, now: float) -> Any:
        _check_wait(msg.wait_s)
        return self._once(_replay_key(msg), msg.request_id, lambda: self.state.fetch(msg.n_groups, msg.after_arrival))

    def _on_version(self, msg: ReportVersion, now: float) -> Ack:
        if not (self._learner_session and hmac.compare_digest(msg.session.encode(), self._learner_session.encode())):
            raise Rejection("not_learner", "session: only the registered learner may report versions; register as "
                                           "'learner' (with the run's secret) first")
        self._dirty = True
        self.state.report_version(msg.version, rollback=msg.rollback, now=now)
        return Ack()

    def _on_stats(self, msg: StatsRequest, now: float) -> Stats:
        return Stats(counters=self.state.stats_dict(now))

    def _on_inspect(self, msg: InspectRequest, now: float) -> InspectReply:
        return InspectReply(payload=self.state.inspect(msg.what, msg.top, now))

    def _on_snapshot(self, msg: SnapshotRequest, now: float) -> Ack:
        if self.snapshot_path is None:
            return Ack(note="no snapshot path configured (run without a run dir)")
        problem = self._try_snapshot("requested")
        if problem:
            raise Rejection("snapshot_failed", f"snapshot {self.snapshot_path}: {problem}; the previous one stays")
        return Ack(note=str(self.snapshot_path))

    def _once(self, key: tuple[str, str], request_id: int, make: Callable[[], Any]) -> Any:
        """Run a non-idempotent request once per (client, request_id); a retry gets the same reply back."""
        if request_id:
            cached = self._replay.get(key)
            if cached is not None and cached[0] == request_id:
                return cached[1]
        self._dirty = True
        reply = make()
        if request_id:
            self._replay[key] = (request_id, reply)
            self._replay.move_to_end(key)
            while len(self._replay) > self.cfg.buffer.max_clients:
                self._replay.popitem(last=False)
                self.state.counters.replay_evictions += 1
        return reply

    # ------------------------------------------------------------------------------------------- outputs

    def write_snapshot(self) -> None:
        if self.snapshot_path is None:
            return
        write_snapshot_file(self.snapshot_path, encode_snapshot(self.state.to_snapshot(time.time())))
        self._dirty = False
        self._last_snapshot = time.monotonic()

    def _try_snapshot(self, why: str) -> str:
        """Write the snapshot; on failure (full disk, I/O error) log and count it, keep serving, and retry after
        the next interval. Returns the problem, or '' on success."""
        try:
            self.write_snapshot()
        except OSError as exc:
            self.state.counters.snapshot_failures += 1
            self._last_snapshot = time.monotonic()  # retry after one interval, not in a tight loop
            log.error("%s snapshot %s failed (%s); the last good snapshot stays, retrying in %.0f s", why,
                      self.snapshot_path, exc, self.cfg.buffer.snapshot_interval_s)
            return str(exc)
        return ""

    def _write_eval_records(self) -> None:
        """One `eval` record per finished evaluation job (step = the evaluated version)."""
        for version, record in self.state.evals.take_records():
            log.info("held-out evaluation of version %d: pass@1 %.3f (%.1f s)", version, record["eval/pass@1"],
                     record["eval/seconds"])
            if self._eval_metrics is not None:
                self._eval_metrics.log(version, record)
            self._try_snapshot("evaluation finished")  # a restart must not evaluate this version again

    def log_metrics(self, now: float) -> None:
        stats = self.state.stats_dict(now)
        previous = self._last_metrics
        record = metrics_record(stats, previous[1] if previous else None, now - previous[0] if previous else 0.0)
        record.update(allocation_metrics(self.state))
        self._metrics.log(self.state.policy_version, record)
        self._last_metrics = (now, stats)

    def close(self) -> None:
        for metrics in (self._metrics, self._eval_metrics):
            if metrics is not None:
                metrics.close()
        if self._auth is not None:
            self._auth.stop()
        if self.sock is not None:
            self.sock.close(0)
        self.ctx.term()


def _replay_key(msg: Fetch | LeaseRequest) -> tuple[str, str]:
    """Whose replay-cache entry a lease or fetch uses (one per client and kind)."""
    return ("fetch", msg.learner_id) if isinstance(msg, Fetch) else ("lease", msg.actor_id)


def _check_wait(wait_s: float) -> None:
    if not 0.0 <= wait_s <= MAX_WAIT_S:  # NaN fails too
        raise Rejection("bad_request", f"wait_s: must be in [0, {MAX_WAIT_S:.0f}] seconds, got {wait_s}")


def envelope_for(frames: list[zmq.Frame]) -> list[bytes]:
    """Best-effort reply envelope for a malformed multi-frame message: routing id plus an empty delimiter."""
    return [frames[0].bytes, b""]


# ---------------------------------------------------------------------------------------------- entry point


def _split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--prompts-jsonl", default="")
    return parser.parse_known_args(argv)


def snapshot_path_for(cfg: Config, run_dir: str) -> Path | None:
    if cfg.buffer.snapshot_path:
        return Path(cfg.buffer.snapshot_path)
    return Path(run_dir) / "buffer_snapshot.msgpack" if run_dir else None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s buffer %(levelname)s %(message)s")
    own, rest = _split_argv(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_cli(rest, description="The replay buffer service (--run-dir DIR, --prompts-jsonl FILE).")
    snapshot_path = snapshot_path_for(cfg, own.run_dir)
    try:  # a bad prompts file or task, a suite benchmark that cannot be read, an unusable snapshot
        prompts = load_prompt_records(cfg, own.prompts_jsonl)
        state = restore_or_create(cfg, prompts, snapshot_path, load_eval_prompt_records(cfg))
    except ValueError as exc:
        raise SystemExit(f"buffer: {exc}") from None
    server = BufferServer(cfg, state, snapshot_path=snapshot_path, run_dir=Path(own.run_dir) if own.run_dir else None)
    endpoint = server.bind()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    print(f"buffer listening on {endpoint} ({len(prompts)} prompts, snapshot {snapshot_path})", flush=True)
    try:
        server.serve(stop)
    finally:
        server.close()
    log.info("stopped; final snapshot %s", snapshot_path)


if __name__ == "__main__":
    main()
