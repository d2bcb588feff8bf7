"""Typed client of the replay buffer, used by actors, the learner, run_async.py and the inspect tool.

    client = BufferClient("tcp://127.0.0.1:5555", timeout_s=30.0)
    version = client.register("actor", "actor0")
    grant = client.lease("actor0", max_prompts=8)        # grant.items may be empty: see grant.wait_reason
    ack = client.submit(grant.lease_id, group)            # raises BufferRejected(code, message) if refused
    batch = client.fetch("learner", n_groups=8)           # exactly n_groups groups, or none yet

One DEALER socket speaking the REQ envelope ([empty, payload]), strictly one request in flight. A request that gets
no reply within `timeout_s` closes the socket (so a late reply can never be read as the answer to a later request,
and a restarted server is reached through a fresh connection) and is retried up to `retries` times; then
`BufferTimeout`. Every request is safe to retry: lease and fetch carry a request id the server answers once, a
submitted group is deduplicated by (lease_id, prompt_id), and the rest are idempotent.

The learner: `BufferClient(..., secret=run.secret)`; `register("learner", ...)` presents the secret and keeps the
session token that `report_version` carries. A report refused as `not_learner` (the buffer restarted and forgot the
session, or another learner took over) re-registers once and reports again.

Reconnects: `reconnects` counts connections to the buffer after the first (ZeroMQ reconnects by itself when the
buffer restarts; a timeout also replaces the socket). `on_reconnect`, if set, is called with no arguments after the
first successful request on a new connection, e.g. for the learner to re-report its version to a buffer restored
from an older snapshot. A request larger than `max_message_bytes` raises `BufferRejected("too_large")` before it is
sent (the buffer would drop the connection); a timeout says the server may be unreachable or may have refused the
handshake (CURVE keys missing or not authorised), and which of the two when the handshake was seen to fail.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from common.schemas import (
    Ack,
    Batch,
    Error,
    EvalResult,
    EvalSubmit,
    Fetch,
    Group,
    InspectReply,
    InspectRequest,
    LeaseGrant,
    LeaseRequest,
    Register,
    Registered,
    Release,
    ReportVersion,
    SnapshotRequest,
    Stats,
    StatsRequest,
    Submit,
    SubmitAck,
    WireError,
    decode_message,
    encode_message,
)


class BufferError(RuntimeError):
    """Base of the client's errors."""


class BufferRejected(BufferError):
    """The buffer answered with Error(code, message): the request was invalid or refused."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BufferTimeout(BufferError):
    """No reply within the timeout (after the retries)."""


class BufferProtocolError(BufferError):
    """The reply could not be decoded or was of the wrong type."""


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class BufferClient:
    @classmethod
    def from_config(cls, buffer_cfg: Any, *, timeout_s: float = 30.0, secret: str = "") -> "BufferClient":
        """A client for the buffer a BufferConfig describes (bind address made connectable, CURVE keys if set);
        `secret`: the run's secret, for the learner."""
        from common.addresses import connect_address

        return cls(connect_address(buffer_cfg.address), timeout_s=timeout_s,
                   curve_server_public_key_file=buffer_cfg.curve_server_public_key_file,
                   curve_client_secret_key_file=buffer_cfg.curve_client_secret_key_file, secret=secret,
                   max_message_bytes=buffer_cfg.max_message_bytes)

    def __init__(self, address: str, *, timeout_s: float = 30.0, curve_server_public_key_file: str = "",
                 curve_client_secret_key_file: str = "", retries: int = 2, secret: str = "",
                 max_message_bytes: int = 64 * 1024 * 1024):
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.secret = secret
        self.max_message_bytes = max_message_bytes
        self.reconnects = 0
        self.on_reconnect: Callable[[], None] | None = None
        self._connections = 0
        self._reconnects_seen = 0
        self._handshake_failed = ""
        self._session = ""
        self._learner_id = "learner"
        self._monitor: zmq.Socket | None = None
        self._curve = (curve_server_public_key_file, curve_client_secret_key_file)
        if bool(curve_server_public_key_file) != bool(curve_client_secret_key_file):
            raise ValueError("CURVE needs both curve_server_public_key_file and curve_client_secret_key_file")
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()
        # Request ids start at a random point so that a restarted client reusing its id is never answered from the
        # server's replay cache of its previous life.
        self._next_request_id = random.getrandbits(62) + 1
        self._connect()

    # ------------------------------------------------------------------------------------------- API

    def register(self, role: str, client_id: str) -> int:
        """Announce a client; returns the buffer's policy_version. The `learner` role presents the secret."""
        reply = self._call(Register(role=role, client_id=client_id, secret=self.secret if role == "learner" else ""),
                           Registered)
        if role == "learner":
            self._session, self._learner_id = reply.session, client_id
        return reply.policy_version

    def lease(self, actor_id: str, max_prompts: int, wait_s: float = 0.0) -> LeaseGrant:
        """Up to max_prompts (prompt, n) work items; none with `wait_reason` when the buffer says wait.

        wait_s > 0: the buffer holds the request up to that long while it has no work to grant (long poll)."""
        return self._call(LeaseRequest(actor_id=actor_id, max_prompts=max_prompts, request_id=self._request_id(),
                                       wait_s=wait_s), LeaseGrant, wait_s)

    def submit(self, lease_id: int, group: Group) -> SubmitAck:
        """Hand in one group; BufferRejected(code) if invalid (code e.g. wrong_n, expired_lease, duplicate)."""
        msg = Submit(lease_id=lease_id, group=group)
        try:
            return self._call(msg, SubmitAck)
        except _DuplicateAfterRetry:
            # Our earlier attempt reached the buffer and only its reply was lost: the group is in.
            return SubmitAck(accepted=True, queued=False, note="accepted by an earlier attempt (reply lost)")

    def submit_many(self, lease_id: int, groups: list[Group], *, window: int = 32) -> list[SubmitAck | BufferRejected]:
        """Submit several groups with up to `window` requests in flight; one result per group, in order.

        A refused group's result is its BufferRejected (returned, not raised) so that one bad group does not hide
        the fate of the others. Replies on one connection come back in request order (the server is one loop), and
        the window stays far below ZeroMQ's high-water mark, so a reply is matched to its request by position.
        """
        payloads = [encode_message(Submit(lease_id=lease_id, group=g)) for g in groups]
        results: list[Any] = [None] * len(groups)
        todo = []
        for i, payload in enumerate(payloads):
            try:
                self._check_size(payload, f"Submit of groups[{i}]")
                todo.append(i)
            except BufferRejected as exc:
                results[i] = exc
        for attempt in range(self.retries + 1):
            todo = self._pipeline(payloads, todo, results, retried=attempt > 0, window=max(1, min(window, 256)))
            if not todo:
                return results
        raise BufferTimeout(self._timeout_message(f"Submit: {len(todo)} of {len(groups)} groups unanswered",
                                                  self.retries + 1))

    def submit_eval(self, lease_id: int, result: EvalResult) -> SubmitAck:
        """Hand in one evaluation item's result (an evaluation lease: grant.eval_version >= 0); BufferRejected(code)
        if refused (e.g. unknown_lease after expiry, item_not_in_lease, wrong_n)."""
        try:
            return self._call(EvalSubmit(lease_id=lease_id, result=result), SubmitAck)
        except _DuplicateAfterRetry:
            return SubmitAck(accepted=True, queued=False, note="accepted by an earlier attempt (reply lost)")

    def release(self, lease_id: int, prompt_ids: list[str]) -> str:
        """Give back prompts this actor will not finish; they are re-issued first."""
        return self._call(Release(lease_id=lease_id, prompt_ids=list(prompt_ids)), Ack).note

    def fetch(self, learner_id: str, n_groups: int, wait_s: float = 0.0, after_arrival: int = -1) -> Batch:
        """Exactly n_groups ServedGroups (oldest first), or an empty Batch if fewer are queued.

        wait_s > 0: the buffer holds the request up to that long until n_groups are queued (long poll).
        after_arrival: the newest arrival already consumed, so a restored buffer does not serve it again."""
        return self._call(Fetch(learner_id=learner_id, n_groups=n_groups, request_id=self._request_id(),
                                wait_s=wait_s, after_arrival=after_arrival), Batch, wait_s)

    def report_version(self, version: int, rollback: bool = False) -> None:
        """The learner's version after a step; rollback=True after resuming from an older checkpoint.

        Registers as the learner first if this client has no session; re-registers once if the buffer no longer
        knows the session (it restarted)."""
        if not self._session:
            self.register("learner", self._learner_id)
        try:
            self._call(ReportVersion(version=version, rollback=rollback, session=self._session), Ack)
        except BufferRejected as exc:
            if exc.code != "not_learner":
                raise
            self.register("learner", self._learner_id)
            self._call(ReportVersion(version=version, rollback=rollback, session=self._session), Ack)

    def stats(self) -> dict[str, Any]:
        return self._call(StatsRequest(), Stats).counters

    def inspect(self, what: str = "prompts", top: int = 0) -> Any:
        """`prompts` (per-prompt table by priority), `summary`, `queue` or `leases`."""
        return self._call(InspectRequest(what=what, top=top), InspectReply).payload

    def snapshot(self) -> str:
        """Ask the buffer to write its snapshot now; returns the path (or a note if it has none)."""
        return self._call(SnapshotRequest(), Ack).note

    def close(self) -> None:
        if self._sock is not None:
            self._poller.unregister(self._sock)
            if self._monitor is not None:
                self._drain_monitor()
                self._sock.disable_monitor()
                self._monitor.close(0)
                self._monitor = None
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "BufferClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- transport

    def _request_id(self) -> int:
        self._next_request_id += 1
        return self._next_request_id

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        server_public_file, client_secret_file = self._curve
        if server_public_file:
            server_public, _ = zmq.auth.load_certificate(server_public_file)
            public, secret = zmq.auth.load_certificate(client_secret_file)
            if secret is None:
                raise ValueError(f"{client_secret_file}: holds no secret key")
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
        sock.connect(self.address)
        self._sock = sock
        self._poller.register(sock, zmq.POLLIN)

    def _drain_monitor(self) -> None:
        """Count completed handshakes (each one after the first is a reconnect) and remember a refused one."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connections += 1
                self.reconnects = max(0, self._connections - 1)
                self._handshake_failed = ""
            elif event & _HANDSHAKE_FAILED:
                self._handshake_failed = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused",
                                          zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security mechanism mismatch"
                                          }.get(event, "handshake failed")

    def _after_reply(self) -> None:
        """Tell the caller about a new connection once a request on it succeeded (not from inside the callback)."""
        self._drain_monitor()
        if self.reconnects > self._reconnects_seen:
            self._reconnects_seen = self.reconnects
            if self.on_reconnect is not None:
                self.on_reconnect()

    def _check_size(self, payload: bytes, what: str) -> None:
        if len(payload) > self.max_message_bytes:
            raise BufferRejected("too_large", f"{what}: {len(payload)} bytes exceeds the limit of "
                                              f"{self.max_message_bytes} (buffer.max_message_bytes); not sent")

    def _timeout_message(self, what: str, attempts: int) -> str:
        self._drain_monitor()
        detail = (f"; the server refused the handshake ({self._handshake_failed}: CURVE keys missing or not "
                  "authorised)" if self._handshake_failed else "")
        return (f"{what}: no reply from {self.address} within {self.timeout_s:.1f} s ({attempts} attempts): "
                f"authentication failed or server unreachable{detail}")

    def _reconnect(self) -> None:
        self.close()
        self._connect()

    def _call(self, msg: Any, expect: type, held_s: float = 0.0) -> Any:
        """`held_s`: how long the server may hold this request before answering (added to the reply timeout)."""
        payload = encode_message(msg)
        self._check_size(payload, type(msg).__name__)
        for attempt in range(self.retries + 1):
            # A bad wait (negative, NaN) adds nothing here: the server rejects it, naming the field.
            reply = self._exchange(payload, self.timeout_s + (held_s if held_s > 0 else 0.0))
            if reply is None:
                continue
            if isinstance(reply, Error):
                if reply.code == "duplicate" and attempt > 0 and isinstance(msg, (Submit, EvalSubmit)):
                    raise _DuplicateAfterRetry()
                raise BufferRejected(reply.code, reply.message)
            if not isinstance(reply, expect):
                raise BufferProtocolError(f"expected {expect.__name__}, got {type(reply).__name__}")
            self._after_reply()
            return reply
        raise BufferTimeout(self._timeout_message(type(msg).__name__, self.retries + 1))

    def _pipeline(self, payloads: list[bytes], todo: list[int], results: list[Any], *, retried: bool,
                  window: int) -> list[int]:
        """Send todo[i] requests keeping `window` in flight; fill results; return the indices left unanswered."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        waiting: list[int] = []
        next_i = 0
        while next_i < len(todo) or waiting:
            while next_i < len(todo) and len(waiting) < window:
                self._sock.send_multipart([b"", payloads[todo[next_i]]], copy=len(payloads[todo[next_i]]) < 65536)
                waiting.append(todo[next_i])
                next_i += 1
            if not self._poller.poll(self.timeout_s * 1000):
                self._reconnect()
                return waiting + todo[next_i:]
            index = waiting.pop(0)
            results[index] = self._submit_result(self._sock.recv_multipart()[-1], retried)
        return []

    def _submit_result(self, frame: bytes, retried: bool) -> SubmitAck | BufferRejected:
        try:
            reply = decode_message(frame, "reply")
        except WireError as exc:
            raise BufferProtocolError(f"undecodable reply from {self.address}: {exc}") from None
        if isinstance(reply, SubmitAck):
            return reply
        if isinstance(reply, Error):
            if reply.code == "duplicate" and retried:
                return SubmitAck(accepted=True, queued=False, note="accepted by an earlier attempt (reply lost)")
            return BufferRejected(reply.code, reply.message)
        raise BufferProtocolError(f"expected SubmitAck, got {type(reply).__name__}")

    def _exchange(self, payload: bytes, timeout_s: float) -> Any:
        """One send + wait; None on timeout (the socket is then replaced)."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        try:
            self._sock.send_multipart([b"", payload], zmq.NOBLOCK, copy=len(payload) < 65536)
        except zmq.Again:
            self._reconnect()
            return None
        if not self._poller.poll(timeout_s * 1000):
            self._reconnect()
            return None
        frames = self._sock.recv_multipart()
        try:
            return decode_message(frames[-1], "reply")
        except WireError as exc:
            raise BufferProtocolError(f"undecodable reply from {self.address}: {exc}") from None


class _DuplicateAfterRetry(Exception):
    """Internal: a retried submit was refused as a duplicate, i.e. the first attempt got through."""
