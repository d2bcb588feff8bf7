"""The buffer under hostile input, restarts, bit flips and full disks: out-of-range integers, replies that cannot be
encoded, version reports from clients other than the learner, lease ids after a restart, a restart from an older
snapshot, failing snapshot writes, corrupt snapshot files, unbounded per-client memory, unsafe binds, oversized
messages, and the informative-yield warning. Servers run in a thread on real loopback sockets."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

import buffer.server as server_module
from buffer.client import BufferClient, BufferRejected, BufferTimeout
from buffer.server import BufferServer, restore_or_create
from buffer.state import BufferState, Rejection, decode_snapshot, encode_snapshot
from common.config import with_overrides
from common.schemas import LeaseRequest, Register, ReportVersion, StatsRequest, encode_message
from test_buffer_service import raw_request, running_server
from test_buffer_state import make_cfg, make_group, make_prompts, mixed

SECRET = "run-secret-for-tests"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.parametrize("version,rollback", [(2**63 - 1, False), (-(2**63), True), (2**31, False), (-1, True)])
def test_out_of_range_version_is_refused_and_the_server_lives(version, rollback):
    with running_server(make_cfg(), make_prompts(4)) as (_, endpoint):
        reply = raw_request(endpoint, [b"", encode_message(ReportVersion(version=version, rollback=rollback))])
        # Versions travel as int32 in every token: [0, 2**31 - 1] is the whole protocol range.
        assert reply is not None and reply.code == "invalid" and "version" in reply.message, reply
        with BufferClient(endpoint, timeout_s=2, retries=0) as client:
            stats = client.stats()
        assert stats["policy_version"] == 0 and stats["messages_bad"] == 1


@pytest.mark.integration
def test_a_reply_that_cannot_be_encoded_is_answered_internal_and_not_fatal(monkeypatch):
    with running_server(make_cfg(), make_prompts(4)) as (server, endpoint):
        monkeypatch.setattr(server.state, "stats_dict", lambda now: {"unencodable": object()})
        reply = raw_request(endpoint, [b"", encode_message(StatsRequest())])
        assert reply is not None and reply.code == "internal" and "encode" in reply.message, reply
        monkeypatch.undo()
        with BufferClient(endpoint, timeout_s=2, retries=0) as client:
            assert client.stats()["errors"] == {"internal": 1}


@pytest.mark.integration
def test_only_the_registered_learner_reports_versions():
    cfg = with_overrides(make_cfg(algo={"max_staleness": 100}, buffer={"max_version_jump": 10}),
                         run={"secret": SECRET})
    with running_server(cfg, make_prompts(8)) as (_, endpoint):
        # A stray report (no registration) must not rewind or flood anything.
        stray = raw_request(endpoint, [b"", encode_message(ReportVersion(version=1000))])
        assert stray is not None and stray.code == "not_learner", stray
        with BufferClient(endpoint, timeout_s=2, retries=0) as intruder:
            with pytest.raises(BufferRejected) as err:
                intruder.register("learner", "learner")  # no secret
            assert err.value.code == "auth_failed"
            with pytest.raises(BufferRejected) as err:
                intruder.report_version(1000)
            assert err.value.code == "auth_failed"
        learner = BufferClient(endpoint, timeout_s=2, retries=0, secret=SECRET)
        assert learner.register("learner", "learner") == 0
        learner.report_version(3)
        with pytest.raises(BufferRejected) as err:
            learner.report_version(14)  # 3 -> 14 is a jump of 11 > max_version_jump 10
        assert err.value.code == "version_jump" and "max_version_jump" in err.value.message
        learner.report_version(13)  # a jump of exactly 10 is allowed
        # A restarted learner re-registers with the secret and takes over; the old session is refused.
        resumed = BufferClient(endpoint, timeout_s=2, retries=0, secret=SECRET)
        resumed.register("learner", "learner")
        resumed.report_version(10, rollback=True)
        with pytest.raises(BufferRejected) as err:
            learner._call(ReportVersion(version=11, session=learner._session), type(None))
        assert err.value.code == "not_learner"
        stats = resumed.stats()
        assert stats["policy_version"] == 10
        assert stats["errors"] == {"not_learner": 2, "auth_failed": 2, "version_jump": 1}
        learner.close()
        resumed.close()


@pytest.mark.unit
def test_lease_ids_never_repeat_after_a_restart():
    cfg = make_cfg()
    state = BufferState(cfg, make_prompts(8))
    snap = encode_snapshot(state.to_snapshot(0.0))
    after_snapshot = state.lease("a0", 1, now=0.0)  # issued after the snapshot, then the buffer dies
    restored = BufferState.from_snapshot(decode_snapshot(snap), cfg, make_prompts(8))
    again = restored.lease("a0", 1, now=0.0)
    assert again.lease_id != after_snapshot.lease_id
    assert again.items[0].prompt_id == after_snapshot.items[0].prompt_id  # the same prompt, re-leased
    with pytest.raises(Rejection) as err:  # the dead buffer's lease is not the new one
        restored.submit(after_snapshot.lease_id, make_group(again.items[0].prompt_id, mixed(2)), now=0.0)
    assert err.value.code == "unknown_lease"
    assert 0 < again.lease_id < 2**63  # fits the wire's int64


@pytest.mark.unit
def test_two_restarts_from_one_snapshot_hand_out_different_lease_ids(tmp_path: Path):
    cfg, path = make_cfg(), tmp_path / "snap.msgpack"
    state = BufferState(cfg, make_prompts(8))
    server_module.write_snapshot_file(path, encode_snapshot(state.to_snapshot(0.0)))
    first = restore_or_create(cfg, make_prompts(8), path).lease("a0", 1, now=0.0).lease_id
    second = restore_or_create(cfg, make_prompts(8), path).lease("a0", 1, now=0.0).lease_id
    assert first != second


@pytest.mark.integration
def test_restart_from_an_older_snapshot_accepts_the_learners_forward_report(tmp_path: Path):
    cfg = with_overrides(make_cfg(algo={"max_staleness": 1}), run={"secret": SECRET})
    old = BufferState(cfg, make_prompts(8))
    old.report_version(3)
    path = tmp_path / "snap.msgpack"
    server_module.write_snapshot_file(path, encode_snapshot(old.to_snapshot(0.0)))
    with running_server(cfg, make_prompts(8)) as (server, endpoint):
        learner = BufferClient(endpoint, timeout_s=2, retries=1, secret=SECRET)
        learner.register("learner", "learner")
        learner.report_version(6)
        reconnected = []
        learner.on_reconnect = lambda: reconnected.append(learner.reconnects)
    # The buffer comes back from the version-3 snapshot, on the same port, while the learner is at version 6.
    restored = restore_or_create(with_overrides(cfg, buffer={"address": endpoint}), make_prompts(8), path)
    assert restored.policy_version == 3
    server = BufferServer(with_overrides(cfg, buffer={"address": endpoint}), restored)
    server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        learner.timeout_s = 0.5
        learner.report_version(6)  # the old session is unknown here: the client re-registers and reports again
        assert learner.reconnects >= 1 and reconnected
        actor = BufferClient(endpoint, timeout_s=2)
        grant = actor.lease("a0", 2)
        # limit (6 + 1 + 1) * 2 = 16 groups, nothing served, 2 in flight: room 14.
        assert len(grant.items) == 2 and actor.stats()["admission_room"] == 14
        ack = actor.submit(grant.lease_id, make_group(grant.items[0].prompt_id, mixed(2), version=6))
        assert ack.queued
        actor.close()
    finally:
        learner.close()
        stop.set()
        thread.join(10)
        server.close()


@pytest.mark.integration
def test_a_failed_periodic_snapshot_is_counted_and_retried(tmp_path: Path, monkeypatch, caplog):
    path = tmp_path / "snap.msgpack"
    cfg = make_cfg(buffer={"snapshot_interval_s": 0.05})
    real_write = server_module.write_snapshot_file
    full = threading.Event()
    full.set()

    def write_or_fail(target, data):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device", str(target) + ".tmp")
        real_write(target, data)

    real_write(path, encode_snapshot(BufferState(cfg, make_prompts(4)).to_snapshot(0.0)))
    good = path.read_bytes()
    monkeypatch.setattr(server_module, "write_snapshot_file", write_or_fail)
    with caplog.at_level(logging.ERROR, "buffer"), running_server(cfg, make_prompts(4), snapshot_path=path) as (
            _, endpoint), BufferClient(endpoint, timeout_s=2, retries=0) as client:
        grant = client.lease("a0", 1)
        client.submit(grant.lease_id, make_group(grant.items[0].prompt_id, mixed(2)))
        time.sleep(0.6)  # several snapshot intervals on a full disk
        stats = client.stats()
        assert stats["snapshot_failures"] >= 2 and stats["groups_received"] == 1
        assert path.read_bytes() == good  # the last good snapshot stays
        with pytest.raises(BufferRejected) as err:
            client.snapshot()
        assert err.value.code == "snapshot_failed" and "No space left" in err.value.message
        full.clear()
        time.sleep(0.3)  # the next interval retries and succeeds
        assert decode_snapshot(path.read_bytes()).counters.groups_received == 1
    assert "snapshot" in caplog.text and "No space left" in caplog.text


def _small_snapshot() -> bytes:
    state = BufferState(make_cfg(), make_prompts(2))
    grant = state.lease("a0", 1, now=0.0)
    state.submit(grant.lease_id, make_group(grant.items[0].prompt_id, mixed(2)), now=0.0)
    return encode_snapshot(state.to_snapshot(0.0))


@pytest.mark.unit
def test_every_single_bit_flip_of_a_snapshot_is_refused_or_harmless():
    data = _small_snapshot()
    original = decode_snapshot(data)
    loaded_different, loaded_same = 0, 0
    buf = bytearray(data)
    for bit in range(8 * len(data)):
        buf[bit // 8] ^= 1 << (bit % 8)
        try:
            snap = decode_snapshot(bytes(buf))
        except ValueError as exc:
            assert "snapshot" in str(exc)
        else:
            loaded_same += snap == original
            loaded_different += snap != original
        buf[bit // 8] ^= 1 << (bit % 8)
    assert loaded_different == 0, f"{loaded_different} of {8 * len(data)} flips loaded a different state"


@pytest.mark.unit
def test_a_corrupt_snapshot_is_refused_by_name_and_the_previous_one_is_used(tmp_path: Path, caplog):
    cfg, path = make_cfg(), tmp_path / "snap.msgpack"
    state = BufferState(cfg, make_prompts(4))
    server_module.write_snapshot_file(path, encode_snapshot(state.to_snapshot(0.0)))
    state.report_version(1)
    server_module.write_snapshot_file(path, encode_snapshot(state.to_snapshot(1.0)))
    corrupt = bytearray(path.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0x10
    path.write_bytes(bytes(corrupt))
    with caplog.at_level(logging.ERROR, "buffer"):
        restored = restore_or_create(cfg, make_prompts(4), path)
    assert restored.policy_version == 0  # the previous good snapshot
    assert str(path) in caplog.text and "checksum" in caplog.text
    prev = path.with_name(path.name + ".prev")
    prev.write_bytes(prev.read_bytes()[:-1])
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError) as err:
        restore_or_create(cfg, make_prompts(4), path)
    assert str(path) in str(err.value) and str(prev) in str(err.value)


@pytest.mark.integration
def test_replay_cache_and_client_map_are_bounded():
    limit = 4096  # the default buffer.max_clients
    cfg = make_cfg(algo={"max_staleness": 10**6})
    with running_server(cfg, make_prompts(8)) as (server, endpoint):
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        n = limit + 300
        for i in range(n):
            sock.send_multipart([b"", encode_message(LeaseRequest(actor_id=f"a{i}", max_prompts=1, request_id=1))])
            sock.send_multipart([b"", encode_message(Register(role="actor", client_id=f"c{i}"))])
        for _ in range(2 * n):
            assert sock.poll(10_000)
            sock.recv_multipart()
        sock.close(0)
        with BufferClient(endpoint, timeout_s=5) as client:
            stats = client.stats()
        assert len(server._replay) <= limit + 1  # + the stats client's own entry-free request
        assert len(server.state.clients) <= limit
        assert stats["replay_evictions"] == n - limit and stats["clients_evicted"] == n - limit


@pytest.mark.unit
def test_non_loopback_bind_without_curve_is_refused():
    cfg = with_overrides(make_cfg(), buffer={"address": "tcp://0.0.0.0:0"})
    server = BufferServer(cfg, BufferState(cfg, make_prompts(2)))
    try:
        with pytest.raises(ValueError) as err:
            server.bind()
        assert "buffer.insecure" in str(err.value) and "CURVE" in str(err.value)
    finally:
        server.close()


@pytest.mark.unit
def test_prepare_run_dir_generates_curve_keys_for_a_non_loopback_buffer(tmp_path: Path, monkeypatch):
    import run_async
    from common.config import PRESETS

    cfg = with_overrides(PRESETS["gpu-cluster"](), run={"runs_dir": str(tmp_path), "name": "cluster"})
    cfg, run_dir = run_async.prepare_run_dir(cfg)
    b = cfg.buffer
    for key_file in (b.curve_secret_key_file, b.curve_server_public_key_file, b.curve_client_secret_key_file):
        assert Path(key_file).is_file() and Path(key_file).is_relative_to(run_dir), key_file
    assert Path(b.curve_public_keys_dir).is_dir()
    assert oct(Path(b.curve_secret_key_file).stat().st_mode & 0o777) == "0o600"


@pytest.mark.integration
def test_unauthenticated_client_is_told_auth_or_unreachable_and_oversized_is_named(tmp_path: Path):
    from buffer.keys import create_keys

    keys = create_keys(tmp_path / "keys")
    cfg = make_cfg(buffer={"curve_secret_key_file": str(keys["server_secret"]),
                           "curve_public_keys_dir": str(keys["authorized"])})
    with running_server(cfg, make_prompts(4)) as (_, endpoint):
        with BufferClient(endpoint, timeout_s=0.5, retries=0) as anonymous:
            with pytest.raises(BufferTimeout) as err:
                anonymous.stats()
        assert "authentication failed or server unreachable" in str(err.value)
        assert "refused the handshake" in str(err.value)  # ZeroMQ saw the mechanism mismatch
        cli = subprocess.run([sys.executable, "-m", "buffer.inspect", "--addr", endpoint, "--timeout", "0.5",
                              "summary"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
        assert "authentication failed or server unreachable" in cli.stderr
    with running_server(make_cfg(), make_prompts(4)) as (_, endpoint):
        with BufferClient(endpoint, timeout_s=2, retries=0) as client:
            grant = client.lease("a0", 1)
            huge = make_group(grant.items[0].prompt_id, mixed(2))
            huge.prompt_tokens = bytes(200 * 1024 * 1024)
            with pytest.raises(BufferRejected) as err:
                client.submit(grant.lease_id, huge)
            assert err.value.code == "too_large" and str(64 * 1024 * 1024) in err.value.message
            assert client.stats()["groups_received"] == 0


@pytest.mark.unit
def test_informative_yield_and_low_yield_warning(caplog):
    cfg = make_cfg(algo={"max_staleness": 10**6}, buffer={"yield_window_groups": 4, "low_yield_threshold": 0.3})
    state = BufferState(cfg, make_prompts(8))

    def submit(outcomes: list[bool]) -> None:
        grant = state.lease("a0", 1, now=0.0)
        state.submit(grant.lease_id, make_group(grant.items[0].prompt_id, outcomes), now=0.0)

    submit([True, False])  # informative, 2 samples
    stats = state.stats_dict(0.0)
    assert stats["informative_yield"] == 1.0 and stats["low_yield_warning"] == ""
    with caplog.at_level(logging.WARNING, "buffer"):
        for _ in range(3):
            submit([True, True])  # all correct: 2 samples each, no variance
        # Window of 4 groups: 1 informative -> 1/4 = 0.25 < 0.3; samples 2 of 8 = 0.25.
        stats = state.stats_dict(0.0)
        assert stats["informative_yield"] == 0.25 and stats["informative_sample_yield"] == 0.25
        assert "too easy" in stats["low_yield_warning"] and "algo.mastery" in stats["low_yield_warning"]
        submit([True, True])  # window: 0 of 4 informative; still one warning in the log
        assert state.stats_dict(0.0)["informative_yield"] == 0.0
        assert caplog.text.count("informative") == 1
        submit([True, False])
        submit([False, True])  # 2 of 4 = 0.5 >= 0.3: fine again
        assert state.stats_dict(0.0)["low_yield_warning"] == ""



@pytest.mark.unit
def test_inspect_summary_shows_the_low_yield_warning():
    from rich.console import Console

    from buffer.inspect import summary_table

    cfg = make_cfg(algo={"max_staleness": 10**6}, buffer={"yield_window_groups": 2, "low_yield_threshold": 0.5})
    state = BufferState(cfg, make_prompts(8))
    for _ in range(2):
        grant = state.lease("a0", 1, now=0.0)
        state.submit(grant.lease_id, make_group(grant.items[0].prompt_id, [False, False]), now=0.0)
    console = Console(record=True, width=400)
    console.print(summary_table(state.stats_dict(0.0)))
    text = console.export_text()
    # 0 of 2 groups informative, both all wrong: the "too hard" sentence.
    assert "informative yield" in text and "0.000" in text and "too hard" in text
