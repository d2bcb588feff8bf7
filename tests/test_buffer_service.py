"""Integration tests of the buffer service over real ZeroMQ sockets on loopback (server in a thread).

Round trip, allocation visible in leases, admission control and stale drops driven by a fake learner, lease expiry,
bad input of every kind, request replay (lease/fetch retries), client timeout + reconnect, CURVE, metrics."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from buffer.client import BufferClient, BufferRejected, BufferTimeout
from buffer.server import BufferServer
from buffer.state import BufferState
from common.config import with_overrides
from common.metrics import read_metrics
from common.schemas import (LOGPROB_DTYPE, Fetch, Group, StatsRequest, Submit, decode_message, encode_message,
                            make_sample)
from test_buffer_state import make_cfg, make_group, make_prompts, mixed

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def running_server(cfg, prompts, **kwargs):
    cfg = with_overrides(cfg, buffer={"address": "tcp://127.0.0.1:0"})
    server = BufferServer(cfg, BufferState(cfg, prompts, now=time.monotonic()), **kwargs)
    endpoint = server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server, endpoint
    finally:
        stop.set()
        thread.join(10)
        server.close()


def raw_request(endpoint: str, frames: list[bytes], timeout_ms: int = 3000):
    """Send raw frames from a fresh DEALER; the decoded reply or None on timeout."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return decode_message(sock.recv_multipart()[-1], "reply")
    finally:
        sock.close(0)


def test_round_trip_allocation_and_exact_stats():
    cfg = make_cfg(algo={"allocation_mode": "reference", "n_mean": 4, "n_min": 2, "n_max": 6, "initial_budget": 2,
                         "min_history": 4, "max_staleness": 100, "drop_zero_variance_groups": True},
                   buffer={"wave_size": 4}, learner={"groups_per_step": 2})
    with running_server(cfg, make_prompts(4)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        assert client.register("actor", "a0") == 0
        grant = client.lease("a0", 4)
        # Epoch 0, nothing known: exploration gives 2 each (8), the other 8 go round-robin -> n = 4 for all.
        assert sorted(it.prompt_id for it in grant.items) == ["p0", "p1", "p2", "p3"]
        assert [it.n for it in grant.items] == [4, 4, 4, 4]
        outcomes = {"p0": [1, 1, 0, 0], "p1": [1, 1, 1, 1], "p2": [1, 0, 0, 0], "p3": [0, 0, 0, 0]}
        for it in grant.items:
            ack = client.submit(grant.lease_id, make_group(it.prompt_id, [bool(c) for c in outcomes[it.prompt_id]]))
            assert ack.queued == (it.prompt_id in ("p0", "p2"))  # p1 and p3 have all-equal rewards
        stats = client.stats()
        assert (stats["groups_received"], stats["groups_zero_variance"], stats["queue_depth"]) == (4, 2, 2)
        assert stats["samples_received"] == 16
        rows = {r["prompt_id"]: r for r in client.inspect("prompts")}
        assert (rows["p0"]["G"], rows["p0"]["k"], rows["p2"]["k"]) == (4, 2, 1)
        # Priorities: p0 2*2/(4*3) = 0.3333, p2 1*3/12 = 0.25, p1 mastered -> 0.01, p3 never right -> 0.01.
        assert rows["p0"]["priority"] == pytest.approx(1 / 3, abs=1e-5)
        assert rows["p2"]["priority"] == pytest.approx(0.25, abs=1e-5)
        # Epoch 1: budget 16, floor 2 each; the 8 left go ~ priority: p0 capped at 6, p2 6, the mastered/hopeless 2.
        second = client.lease("a0", 4)
        assert {it.prompt_id: it.n for it in second.items} == {"p0": 6, "p1": 2, "p2": 6, "p3": 2}
        batch = client.fetch("learner", 2)
        assert sorted(g.group.prompt_id for g in batch.groups) == ["p0", "p2"]
        assert [g.staleness for g in batch.groups] == [0, 0]
        assert client.fetch("learner", 1).groups == []  # nothing left: an empty batch, never a partial one
        stats = client.stats()
        assert stats["groups_served"] == 2 and stats["epoch"] == 1 and stats["in_flight"] == 4
        assert stats["groups_received"] == (stats["groups_served"] + stats["groups_dropped_stale"]
                                            + stats["groups_dropped_rollback"]
                                            + stats["groups_zero_variance"] + stats["queue_depth"])


def test_admission_control_and_stale_drops_with_fake_learner():
    # groups_per_step 2, max_staleness 1: at version v at most (v + 2) * 2 groups served + queued + in flight.
    cfg = make_cfg(algo={"max_staleness": 1}, learner={"groups_per_step": 2})
    with running_server(cfg, make_prompts(16)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        old = client.lease("a0", 10)
        assert len(old.items) == 4 and client.lease("a0", 1).wait_reason == "staleness"
        for it in old.items:  # generated with version 0 weights
            client.submit(old.lease_id, make_group(it.prompt_id, mixed(it.n), version=0))
        assert len(client.fetch("learner", 2).groups) == 2
        for version in (1, 2):
            client.report_version(version)
        # At version 2 the two queued version-0 groups have staleness 2 > 1: dropped and counted, batch empty.
        batch = client.fetch("learner", 2)
        assert batch.groups == [] and batch.dropped_stale == 2
        stats = client.stats()
        assert stats["groups_dropped_stale"] == 2 and stats["staleness_hist"] == {0: 2}
        # Dropped groups free their slots: limit (2 + 2) * 2 = 8, served 2 -> room for 6.
        assert stats["admission_room"] == 6 and len(client.lease("a0", 10).items) == 6
        with pytest.raises(BufferRejected) as err:
            client.report_version(1)
        assert err.value.code == "version_regression"


def test_strictly_on_policy_with_max_staleness_zero():
    cfg = make_cfg(algo={"max_staleness": 0}, learner={"groups_per_step": 3})
    with running_server(cfg, make_prompts(16)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        for version in range(4):
            grant = client.lease("a0", 8)
            assert len(grant.items) == 3 and grant.policy_version == version
            assert client.lease("a1", 1).wait_reason == "staleness"
            for it in grant.items:
                client.submit(grant.lease_id, make_group(it.prompt_id, mixed(it.n), version=version))
            batch = client.fetch("learner", 3)
            assert [g.staleness for g in batch.groups] == [0, 0, 0]
            client.report_version(version + 1)
        assert client.stats()["staleness_hist"] == {0: 12}


class _InThread:
    """Run one blocking client call on its own connection in a thread (a held long poll), keep its result."""

    def __init__(self, endpoint: str, call):
        self.result, self.error = None, None
        self._thread = threading.Thread(target=self._run, args=(endpoint, call), daemon=True)
        self._thread.start()

    def _run(self, endpoint, call):
        try:
            with BufferClient(endpoint, timeout_s=5) as client:
                self.result = call(client)
        except Exception as exc:  # noqa: BLE001 - re-raised by wait() in the test's thread
            self.error = exc

    def waiting(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: float = 10.0):
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the held request was never answered"
        if self.error is not None:
            raise self.error
        return self.result


def test_long_poll_fetch_is_answered_when_the_groups_arrive():
    cfg = make_cfg(learner={"groups_per_step": 2})
    with running_server(cfg, make_prompts(8)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        held = _InThread(endpoint, lambda c: c.fetch("learner", 2, wait_s=30))
        grant = client.lease("a0", 2)
        client.submit(grant.lease_id, make_group(grant.items[0].prompt_id, mixed(grant.items[0].n)))
        time.sleep(0.3)
        assert held.waiting()  # one group queued, two asked for: still held
        client.submit(grant.lease_id, make_group(grant.items[1].prompt_id, mixed(grant.items[1].n)))
        batch = held.wait()  # answered by the second submit, not by the 30 s wait running out
        assert sorted(g.group.prompt_id for g in batch.groups) == sorted(it.prompt_id for it in grant.items)
        assert client.stats()["groups_served"] == 2


def test_long_poll_lease_is_granted_when_the_version_report_opens_admission():
    cfg = make_cfg(algo={"max_staleness": 0}, learner={"groups_per_step": 2})
    with running_server(cfg, make_prompts(8)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        grant = client.lease("a0", 4)
        assert len(grant.items) == 2  # the synchronous window: one step's groups
        held = _InThread(endpoint, lambda c: c.lease("a1", 4, wait_s=30))
        for it in grant.items:
            client.submit(grant.lease_id, make_group(it.prompt_id, mixed(it.n)))
        assert len(client.fetch("learner", 2).groups) == 2
        time.sleep(0.3)
        assert held.waiting()  # consumed, but version 0's window is used up until the learner reports version 1
        client.report_version(1)
        second = held.wait()
        assert len(second.items) == 2 and second.policy_version == 1
        assert client.stats()["lease_waits"] == {}  # held, never answered "wait"


def test_long_poll_wait_runs_out_bad_waits_are_rejected_and_stop_answers_held_requests():
    cfg = make_cfg()
    with running_server(cfg, make_prompts(8)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        start = time.monotonic()
        assert client.fetch("learner", 2, wait_s=0.3).groups == []
        assert time.monotonic() - start >= 0.3
        for bad in (-1.0, math.nan, 1e6):
            with pytest.raises(BufferRejected) as err:
                client.fetch("learner", 2, wait_s=bad)
            assert err.value.code == "bad_request" and "wait_s" in str(err.value)
        held = _InThread(endpoint, lambda c: c.fetch("learner", 2, wait_s=30))
        time.sleep(0.3)
        assert held.waiting()
    assert held.wait().groups == []  # the server answered it (empty) as it stopped


def test_lease_expiry_returns_prompts_and_rejects_late_submission():
    cfg = make_cfg(buffer={"lease_timeout_s": 0.3})
    with running_server(cfg, make_prompts(8)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        grant = client.lease("dead-actor", 2)
        time.sleep(0.8)  # the server's housekeeping expires it without any request
        stats = client.stats()
        assert (stats["leases_expired"], stats["in_flight"], stats["prompts_returned"]) == (1, 0, 2)
        with pytest.raises(BufferRejected) as err:
            client.submit(grant.lease_id, make_group(grant.items[0].prompt_id, mixed(2)))
        assert err.value.code == "expired_lease"
        again = client.lease("a1", 2)
        assert [it.prompt_id for it in again.items] == [it.prompt_id for it in grant.items]
        assert client.stats()["groups_rejected"] == {"expired_lease": 1}


def test_bad_input_gets_error_replies_and_is_counted():
    cfg = make_cfg(buffer={"max_message_bytes": 64 * 1024})
    with running_server(cfg, make_prompts(8)) as (server, endpoint), BufferClient(endpoint, timeout_s=3) as client:
        grant = client.lease("a0", 2)
        good = encode_message(Submit(lease_id=grant.lease_id, group=make_group(grant.items[0].prompt_id, mixed(2))))
        wrong_schema = msgspec.msgpack.encode({"type": "stats", "schema": 99})
        cases = {  # frames -> expected error code(s)
            # Random bytes may start like a valid msgpack scalar ("invalid": not a message) or not ("malformed").
            "random": ([b"", np.random.default_rng(0).bytes(300)], ("malformed", "invalid")),
            "truncated": ([b"", good[: len(good) // 2]], "malformed"),
            "schema": ([b"", wrong_schema], "schema_version"),
            "unknown_type": ([b"", msgspec.msgpack.encode({"type": "hello", "schema": 1})], "invalid"),
            "reply_as_request": ([b"", encode_message(server_reply_example())], "invalid"),
            "missing_field": ([b"", msgspec.msgpack.encode({"type": "lease", "schema": 1, "actor_id": "x"})],
                              "invalid"),
            "oversized": ([b"", b"\x00" * (100 * 1024)], "too_large"),
            "extra_frames": ([b"", good, b"more"], "bad_frames"),
        }
        replies = {}
        for name, (frames, code) in cases.items():
            reply = replies[name] = raw_request(endpoint, frames)
            assert reply is not None and reply.code in (code if isinstance(code, tuple) else (code,)), (name, reply)
        assert "max_prompts" in replies["missing_field"].message  # the reply names the field
        assert "65536" in replies["oversized"].message
        # Far beyond the socket limit (2x max_message_bytes): ZeroMQ drops that connection, the server lives on.
        assert raw_request(endpoint, [b"", b"\x00" * (300 * 1024)], timeout_ms=500) is None
        # Semantically bad groups through the typed client.
        pid = grant.items[0].prompt_id
        nan_group = make_group(pid, mixed(2))
        nan_group.samples[0].logprobs = np.array([-1.0, math.nan, -1.0], dtype=LOGPROB_DTYPE).tobytes()
        short = make_group(pid, mixed(2))
        short.samples[1].tokens = short.samples[1].tokens[:4]
        for group, lease_id, code in [(nan_group, grant.lease_id, "invalid_logprobs"),
                                      (short, grant.lease_id, "invalid_tokens"),
                                      (make_group(pid, mixed(3)), grant.lease_id, "wrong_n"),
                                      (make_group(pid, mixed(2)), 12345, "unknown_lease")]:
            with pytest.raises(BufferRejected) as err:
                client.submit(lease_id, group)
            assert err.value.code == code
        assert client.submit(grant.lease_id, make_group(pid, mixed(2))).queued  # still serving, still correct
        stats = client.stats()
        assert stats["messages_bad"] == len(cases)  # every undecodable request; the dropped connection is not seen
        assert stats["errors"]["bad_frames"] == 1 and stats["errors"]["too_large"] == 1
        assert stats["groups_rejected"] == {"invalid_logprobs": 1, "invalid_tokens": 1, "wrong_n": 1,
                                            "unknown_lease": 1}
        assert stats["groups_received"] == 1 and stats["queue_depth"] == 1


def server_reply_example():
    from common.schemas import Ack

    return Ack(note="a reply is not a request")


def test_lease_and_fetch_retries_are_answered_once():
    cfg = make_cfg(algo={"max_staleness": 100})
    with running_server(cfg, make_prompts(8)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        grant = client.lease("a0", 2)
        for it in grant.items:
            client.submit(grant.lease_id, make_group(it.prompt_id, mixed(2)))
        fetch = encode_message(Fetch(learner_id="L", n_groups=2, request_id=77))
        first, retry = raw_request(endpoint, [b"", fetch]), raw_request(endpoint, [b"", fetch])
        # The retry (same learner, same request id) gets the same batch; the groups are served once.
        assert [g.arrival for g in first.groups] == [g.arrival for g in retry.groups] == [2**31, 2**31 + 1]
        stats = client.stats()
        assert stats["groups_served"] == 2 and stats["queue_depth"] == 0


def test_submit_many_pipelines_and_reports_each_result():
    cfg = make_cfg(algo={"max_staleness": 100})
    with running_server(cfg, make_prompts(8)) as (_, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        grant = client.lease("a0", 4)
        groups = [make_group(it.prompt_id, mixed(2)) for it in grant.items]
        groups[2] = make_group(grant.items[2].prompt_id, mixed(5))  # wrong n
        results = client.submit_many(grant.lease_id, groups, window=3)
        assert [type(r).__name__ for r in results] == ["SubmitAck", "SubmitAck", "BufferRejected", "SubmitAck"]
        assert results[2].code == "wrong_n"
        assert client.stats()["queue_depth"] == 3


def test_client_times_out_then_reconnects_to_a_restarted_server():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    client = BufferClient(address, timeout_s=0.3, retries=1)
    t0 = time.monotonic()
    with pytest.raises(BufferTimeout):
        client.stats()
    assert time.monotonic() - t0 < 2.0  # 2 attempts x 0.3 s
    cfg = with_overrides(make_cfg(), buffer={"address": address})
    server = BufferServer(cfg, BufferState(cfg, make_prompts(4)))
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        client.timeout_s = 5.0
        assert client.stats()["policy_version"] == 0
    finally:
        client.close()
        stop.set()
        thread.join(10)
        server.close()


def test_curve_authentication(tmp_path: Path):
    from buffer.keys import create_keys

    keys = create_keys(tmp_path / "keys")
    cfg = make_cfg(buffer={"curve_secret_key_file": str(keys["server_secret"]),
                           "curve_public_keys_dir": str(keys["authorized"])})
    with running_server(cfg, make_prompts(4)) as (_, endpoint):
        with BufferClient(endpoint, timeout_s=5, curve_server_public_key_file=str(keys["server_public"]),
                          curve_client_secret_key_file=str(keys["client_secret"])) as client:
            assert client.stats()["policy_version"] == 0
        # Roles build their client from the config: the same keys given as buffer.curve_* fields.
        client_cfg = with_overrides(cfg, buffer={"address": endpoint,
                                                 "curve_server_public_key_file": str(keys["server_public"]),
                                                 "curve_client_secret_key_file": str(keys["client_secret"])})
        with BufferClient.from_config(client_cfg.buffer, timeout_s=5) as client:
            assert client.stats()["policy_version"] == 0
        with BufferClient(endpoint, timeout_s=0.5, retries=0) as anonymous:  # no keys: never answered
            with pytest.raises(BufferTimeout):
                anonymous.stats()
        assert raw_request(endpoint, [b"", encode_message(StatsRequest())], timeout_ms=300) is None


def test_metrics_jsonl_gets_buffer_records(tmp_path: Path):
    cfg = with_overrides(make_cfg(algo={"max_staleness": 100}), run={"wandb_mode": "disabled"})
    with running_server(cfg, make_prompts(8), run_dir=tmp_path, snapshot_path=tmp_path / "snap.msgpack") as (
            _, endpoint), BufferClient(endpoint, timeout_s=5) as client:
        grant = client.lease("a0", 3)
        for it in grant.items:
            client.submit(grant.lease_id, make_group(it.prompt_id, mixed(2)))
        client.fetch("learner", 2)
        assert client.snapshot() == str(tmp_path / "snap.msgpack")
    records = read_metrics(tmp_path / "metrics.jsonl", role="buffer")
    final = records[-1]  # written when the server stops
    assert final["buffer/groups_received"] == 3 and final["buffer/groups_served"] == 2
    assert final["buffer/queue_depth"] == 1 and final["buffer/staleness/mean"] == 0
    assert final["allocation/n/mean"] == 2
    # The 3 groups each have one correct and one wrong answer: all informative, 6 of 6 samples.
    assert final["buffer/informative_yield"] == 1.0 and final["buffer/informative_sample_yield"] == 1.0
    assert (tmp_path / "snap.msgpack").exists()


def test_a_learner_is_not_served_again_what_it_consumed_before_the_buffer_restarted():
    """Three groups are queued at the buffer's snapshot; it serves two, then dies. The restarted buffer restores all
    three, but the learner's fetch names what it consumed: it gets the third group only, and never one twice."""
    from buffer.client import BufferClient
    from buffer.state import decode_snapshot, encode_snapshot
    from common.processes import free_port
    from learner.buffer_link import BufferLink

    cfg = with_overrides(make_cfg(algo={"max_staleness": 100}), buffer={"address": f"tcp://127.0.0.1:{free_port()}"})
    prompts = make_prompts(8)
    state = BufferState(cfg, prompts, now=time.monotonic())
    grant = state.lease("a0", 3, now=time.monotonic())
    for it in grant.items:
        state.submit(grant.lease_id, make_group(it.prompt_id, mixed(it.n)), now=time.monotonic())
    snapshot = encode_snapshot(state.to_snapshot(0.0))

    def serve(buffer_state):
        server = BufferServer(cfg, buffer_state)
        server.bind()
        stop = threading.Event()
        thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
        thread.start()
        return server, stop, thread

    def shut(running):
        server, stop, thread = running
        stop.set()
        thread.join(10)
        server.close()

    client = BufferClient(cfg.buffer.address, timeout_s=2.0)
    link = BufferLink(client, cfg, threading.Event(), version=lambda: 0, on_lost=lambda: None)
    running = serve(state)
    try:
        first = link.fetch("learner", 2)
        assert [g.group.prompt_id for g in first.groups] == [it.prompt_id for it in grant.items[:2]]
    finally:
        shut(running)
    restored = BufferState.from_snapshot(decode_snapshot(snapshot), cfg, prompts, now=time.monotonic())
    running = serve(restored)
    try:
        second = link.fetch("learner", 1)
        assert [g.group.prompt_id for g in second.groups] == [grant.items[2].prompt_id]
        stats = client.stats()
        assert stats["groups_served"] == 3 and stats["groups_served_before_restore"] == 2
        assert stats["queue_depth"] == 0
    finally:
        client.close()
        shut(running)
