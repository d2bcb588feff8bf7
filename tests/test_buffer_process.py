"""Integration tests with the buffer as a real process (`python -m buffer.server`): a 20k-group load from 8 producer
processes with full accounting, kill -9 and restart from the snapshot, and the inspect CLI (live and snapshot).

Run as a script, this file is the load test's producer: `python tests/test_buffer_process.py ADDRESS ID N DUP_EVERY`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as the producer script
    sys.path.insert(0, str(REPO))

from buffer.client import BufferClient, BufferRejected  # noqa: E402
from common.schemas import TOKEN_DTYPE, Group, make_sample  # noqa: E402


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "question": f"{i} + 1 = ?", "answer": str(i + 1),
                                        "metadata": {"i": i}}) + "\n" for i in range(n)))
    return path


@contextlib.contextmanager
def server_process(tmp_path: Path, *overrides: str, n_prompts: int = 64):
    """Start the buffer; yields (Popen, address, argv) and kills it at the end."""
    argv = [sys.executable, "-m", "buffer.server", "--preset", "tiny",
            "--prompts-jsonl", str(write_prompts(tmp_path / "prompts.jsonl", n_prompts)),
            "--buffer.address", "tcp://127.0.0.1:0", "--run.wandb-mode", "disabled",
            "--task.eval-size", "0", *overrides]  # no held-out evaluation leases among the training leases
    proc = start(argv)
    try:
        yield proc, read_address(proc), argv
    finally:
        stop(proc)


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_address(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()  # "buffer listening on tcp://127.0.0.1:PORT (...)"
    assert line.startswith("buffer listening on "), line
    return line.split()[3]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


# ---------------------------------------------------------------------------------------------- load test


def produce(address: str, producer_id: int, n_groups: int, dup_every: int) -> dict:
    """Lease and submit until n_groups are accepted; every dup_every-th group is also sent a second time."""
    rng = np.random.default_rng(producer_id)
    client = BufferClient(address, timeout_s=20)
    client.register("actor", f"producer{producer_id}")
    sent, accepted_tags, duplicates, seq = 0, [], 0, 0
    while len(accepted_tags) < n_groups:
        grant = client.lease(f"producer{producer_id}", min(16, n_groups - len(accepted_tags)))
        if not grant.items:
            time.sleep(0.005)
            continue
        groups = []
        for item in grant.items:
            # prompt_tokens carries a unique (producer, seq) tag so the consumer can detect duplicates.
            samples = [make_sample([1, 2, 3], [-0.1, -0.2, -0.3], [grant.policy_version] * 3, float(r), bool(r),
                                   "stop") for r in rng.integers(0, 2, item.n)]
            groups.append(Group(prompt_id=item.prompt_id, prompt_tokens=np.array([producer_id, seq], TOKEN_DTYPE)
                                .tobytes(), samples=samples))
            seq += 1
        dups = [g for i, g in enumerate(groups) if (seq - len(groups) + i) % dup_every == 0]
        results = client.submit_many(grant.lease_id, groups + dups)
        sent += len(results)
        for group, result in zip(groups + dups, results):
            if isinstance(result, BufferRejected):
                assert result.code == "duplicate", result
                duplicates += 1
            else:
                accepted_tags.append(np.frombuffer(group.prompt_tokens, TOKEN_DTYPE).tolist())
    client.close()
    return {"sent": sent, "accepted": accepted_tags, "duplicates": duplicates}


@pytest.mark.integration
@pytest.mark.slow
def test_load_8_producers_20k_groups_all_accounted(tmp_path: Path):
    n_producers, per_producer, dup_every = 8, 2500, 50
    # ~310 versions are reported below: total_steps above that (at total_steps the buffer stops granting training)
    with server_process(tmp_path, "--learner.groups-per-step", "64", "--learner.total-steps", "100000",
                        "--algo.max-staleness", "2",
                        "--algo.allocation-mode", "uniform", "--algo.n-mean", "2", "--algo.n-min", "2",
                        "--algo.n-max", "2", "--buffer.wave-size", "16") as (_, address, _):
        producers = [subprocess.Popen([sys.executable, __file__, address, str(i), str(per_producer), str(dup_every)],
                                      cwd=REPO, stdout=subprocess.PIPE, text=True) for i in range(n_producers)]
        client = BufferClient(address, timeout_s=20)
        served, version = [], 0

        def consume(n: int) -> None:
            nonlocal version
            batch = client.fetch("learner", n)
            served.extend(tuple(np.frombuffer(g.group.prompt_tokens, TOKEN_DTYPE).tolist()) for g in batch.groups)
            if batch.groups:
                version += 1
                client.report_version(version)

        deadline = time.monotonic() + 55
        while any(p.poll() is None for p in producers):
            assert time.monotonic() < deadline, "load test too slow"
            consume(64)
        outputs = [json.loads(p.stdout.read()) for p in producers]
        assert all(p.returncode == 0 for p in producers)
        consume(max(1, client.stats()["queue_depth"]))  # drain the remainder in one (exact) batch
        stats = client.stats()
        client.close()
    accepted = {tuple(t) for out in outputs for t in out["accepted"]}
    sent = sum(out["sent"] for out in outputs)
    duplicates = sum(out["duplicates"] for out in outputs)
    # 20k distinct groups accepted; the re-sent copies (1 in 50 -> 400) were all refused as duplicates.
    assert len(accepted) == stats["groups_received"] == n_producers * per_producer
    assert duplicates == n_producers * per_producer // dup_every
    assert stats["groups_rejected"] == {"duplicate": duplicates}
    assert sent == stats["groups_received"] + sum(stats["groups_rejected"].values())
    # Every accepted group ends served, dropped (zero variance or stale) or queued; none is served twice.
    assert stats["queue_depth"] == 0
    assert stats["groups_received"] == (stats["groups_served"] + stats["groups_dropped_stale"]
                                        + stats["groups_dropped_rollback"]
                                        + stats["groups_zero_variance"])
    assert len(served) == len(set(served)) == stats["groups_served"]
    assert set(served) <= accepted
    assert max(int(s) for s in stats["staleness_hist"]) <= 2


# ---------------------------------------------------------------------------------------------- restart


def mixed_group(prompt_id: str, n: int, version: int = 0) -> Group:
    return Group(prompt_id=prompt_id, prompt_tokens=b"\x07\x00\x00\x00",
                 samples=[make_sample([5, 6], [-0.5, -0.5], [version] * 2, float(i % 2), i % 2 == 1, "stop")
                          for i in range(n)])


@pytest.mark.integration
def test_kill_9_and_restart_restores_stats_and_queue(tmp_path: Path):
    snapshot = tmp_path / "snap.msgpack"
    with server_process(tmp_path, "--buffer.snapshot-path", str(snapshot), "--buffer.snapshot-interval-s", "0.3",
                        "--algo.max-staleness", "10") as (proc, address, argv):
        client = BufferClient(address, timeout_s=5, retries=0)
        grant = client.lease("a0", 4)
        done, open_item = grant.items[:3], grant.items[3]
        for it in done:
            client.submit(grant.lease_id, mixed_group(it.prompt_id, it.n))
        client.report_version(2)
        time.sleep(1.0)  # > snapshot interval: the periodic snapshot has everything
        before = client.stats()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        restarted = start([a if a != "tcp://127.0.0.1:0" else address for a in argv])  # same port
        try:
            read_address(restarted)
            client.timeout_s = 10.0
            after = client.stats()  # the client reconnects to the new process
            for key in ("policy_version", "groups_received", "queue_depth", "leases_granted", "samples_received",
                        "epoch", "prompts_leased"):
                assert after[key] == before[key], key
            assert before["in_flight"] == 1 and after["in_flight"] == 0  # the open lease went back to the pool
            with pytest.raises(BufferRejected) as err:
                client.submit(grant.lease_id, mixed_group(open_item.prompt_id, open_item.n))
            assert err.value.code == "restart_lease"
            again = client.lease("a0", 1)
            assert again.items[0].prompt_id == open_item.prompt_id and again.lease_id > grant.lease_id
            batch = client.fetch("learner", 3)
            assert [g.group.prompt_id for g in batch.groups] == [it.prompt_id for it in done]
            assert [g.staleness for g in batch.groups] == [2, 2, 2]
            rows = {r["prompt_id"]: r for r in client.inspect("prompts")}
            assert all(rows[it.prompt_id]["G"] == it.n for it in done)
            # SIGTERM writes a final snapshot and exits cleanly.
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(15) == 0
        finally:
            stop(restarted)
            client.close()


# ---------------------------------------------------------------------------------------------- inspect CLI


def run_inspect(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "buffer.inspect", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.integration
def test_inspect_cli_live_and_snapshot(tmp_path: Path):
    snapshot = tmp_path / "snap.msgpack"
    with server_process(tmp_path, "--buffer.snapshot-path", str(snapshot), n_prompts=16) as (_, address, _):
        with BufferClient(address, timeout_s=5) as client:
            grant = client.lease("a0", 4)
            for it in grant.items:
                client.submit(grant.lease_id, mixed_group(it.prompt_id, it.n))
            client.fetch("learner", 2)
            client.snapshot()
            live_stats = client.stats()
        summary = run_inspect("--addr", address, "summary")
        assert "queue depth" in summary and "staleness of served groups" in summary
        rows = json.loads(run_inspect("--addr", address, "prompts", "--top", "3", "--json"))
        assert len(rows) == 3 and rows[0]["priority"] >= rows[1]["priority"] >= rows[2]["priority"]
        assert "prompts by priority" in run_inspect("--addr", address, "prompts")
        assert "groups received" in run_inspect("--addr", address, "watch", "--interval", "0.1",
                                                "--iterations", "1")
    from_snapshot = json.loads(run_inspect("--snapshot", str(snapshot), "summary", "--json"))
    for key in ("groups_received", "groups_served", "queue_depth", "staleness_hist"):
        assert from_snapshot[key] == json.loads(json.dumps(live_stats[key])), key
    assert len(json.loads(run_inspect("--snapshot", str(snapshot), "prompts", "--top", "0", "--json"))) == 16
    run_inspect("--snapshot", str(snapshot), "plot", "--out", str(tmp_path / "buffer.png"))
    assert (tmp_path / "buffer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


if __name__ == "__main__":
    address, producer_id, n_groups, dup_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(produce(address, producer_id, n_groups, dup_every)))
