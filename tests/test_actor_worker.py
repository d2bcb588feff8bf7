"""The actor as a real process (`python -m actor.worker`) against a real buffer process, with the tiny model.

Covers: groups arrive with the right shapes, versions and rewards (re-scored here from the submitted tokens);
rollout/* metrics land in metrics.jsonl; SIGTERM exits 0; kill -9 loses only the current lease, whose prompts the
buffer re-issues after the lease timeout; weights broadcast by a separate sender (this test process, over gloo)
reach the actor, which tags later tokens with the new version and samples from the new weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actor.worker import BUFFER_TIMEOUT_S, LEASE_WAIT_S
from buffer.client import BufferClient
from common.config import PRESETS, save_config, with_overrides
from common.processes import free_port
from common.metrics import read_metrics

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **sections):
    # No held-out prompts: these tests follow training leases (evaluation leases: tests/test_eval_actor.py).
    base = with_overrides(PRESETS["tiny"](), run={"wandb_mode": "disabled"}, task={"eval_size": 0},
                          learner={"sync_address": f"127.0.0.1:{free_port()}",
                                   "sync_control_address": f"tcp://127.0.0.1:{free_port()}"})
    return with_overrides(base, **sections) if sections else base


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


@contextlib.contextmanager
def buffer_and_actor(tmp_path: Path, cfg, policy_version: int = 0):
    """Start the buffer (free port) at policy_version, write the resolved config, start actor 0;
    yields (cfg, actor, address)."""
    config_file = tmp_path / "config.json"
    save_config(cfg, config_file)
    buffer = subprocess.Popen([sys.executable, "-m", "buffer.server", "--config-file", str(config_file),
                               "--buffer.address", "tcp://127.0.0.1:0"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "buffer.log", "w"), text=True)
    actor = None
    try:
        line = buffer.stdout.readline()
        assert line.startswith("buffer listening on "), line
        address = line.split()[3]
        cfg = with_overrides(cfg, buffer={"address": address})
        save_config(cfg, config_file)
        if policy_version:
            BufferClient(address, timeout_s=10).report_version(policy_version)
        actor = _start([sys.executable, "-m", "actor.worker", "--config-file", str(config_file), "--actor-index",
                        "0", "--run-dir", str(tmp_path)], tmp_path / "actor0.log")
        yield cfg, actor, address
    finally:
        for proc in (actor, buffer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _fetch(client: BufferClient, n: int, timeout_s: float, actor: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert actor.poll() is None, log.read_text()[-3000:]
        batch = client.fetch("learner", n)
        if batch.groups:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"no batch of {n} groups in {timeout_s} s:\n{log.read_text()[-3000:]}")


def test_actor_submits_well_formed_scored_groups_and_stops_on_sigterm(tmp_path):
    from common.models import load_tokenizer
    from common.tasks import encode_prompt, load_prompts, score_response

    cfg = _config(tmp_path)
    prompts = {p.prompt_id: p for p in load_prompts(cfg.task, "train")}
    tok = load_tokenizer(cfg.run.model)
    with buffer_and_actor(tmp_path, cfg) as (cfg, actor, address):
        client = BufferClient(address, timeout_s=10)
        batch = _fetch(client, 8, 60, actor, tmp_path / "actor0.log")
        for served in batch.groups:
            group = served.group
            prompt = prompts[group.prompt_id]
            assert group.prompt_array().tolist() == encode_prompt(tok, prompt.question, cfg.task)
            assert cfg.algo.n_min <= len(group.samples) <= cfg.algo.n_max
            for sample in group.samples:
                tokens, logprobs, versions = sample.arrays()
                assert 1 <= len(tokens) <= cfg.actor.max_new_tokens
                assert np.all(versions == 0) and np.all(logprobs <= 0) and np.all(np.isfinite(logprobs))
                assert sample.finish_reason == ("stop" if tokens[-1] == tok.eos_token_id else "length")
                text = tok.decode(tokens, skip_special_tokens=True)
                assert (sample.reward, sample.correct) == score_response(prompt, text, cfg.task)
        time.sleep(1.0)
        actor.send_signal(signal.SIGTERM)
        assert actor.wait(30) == 0
    records = read_metrics(tmp_path / "metrics.jsonl", role="actor0")
    assert records and all(0 <= r["rollout/truncation_ratio"] <= 1 for r in records)
    assert all(r["rollout/response_length/max"] <= cfg.actor.max_new_tokens for r in records)
    assert sum(r["rollout/tokens_per_s"] > 0 for r in records) == len(records)


def test_killed_actor_loses_only_its_lease_which_is_reissued(tmp_path):
    # The buffer says version 1 but no learner ever broadcasts it: the actor holds its lease while it waits for
    # those weights, which is when it is killed. Its prompts must come back once the lease times out.
    cfg = _config(tmp_path, buffer={"lease_timeout_s": 6.0}, learner={"sync_timeout_s": 60.0})
    with buffer_and_actor(tmp_path, cfg, policy_version=1) as (cfg, actor, address):
        client = BufferClient(address, timeout_s=10)
        held = _wait_for_first_lease(client, 60, actor, tmp_path / "actor0.log")
        actor.send_signal(signal.SIGKILL)
        actor.wait(10)
        assert client.stats()["leases_expired"] == 0
        time.sleep(cfg.buffer.lease_timeout_s + 1.0)
        grant = client.lease("test", len(held))
        assert {item.prompt_id for item in grant.items} == held  # returned to the front of the pool
        assert client.stats()["leases_expired"] == 1


def _wait_for_first_lease(client: BufferClient, timeout_s: float, actor, log: Path) -> set[str]:
    """Prompt ids of the first lease (only the actor leases, so: every prompt leased so far)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert actor.poll() is None, log.read_text()[-3000:]
        held = {row["prompt_id"] for row in client.inspect("prompts") if row["leases"] > 0}
        if held:
            assert client.inspect("leases")[0]["actor_id"] == "actor0"
            return held
        time.sleep(0.1)
    raise AssertionError(f"actor never held a lease:\n{log.read_text()[-3000:]}")


def test_weights_from_a_separate_sender_reach_the_actor(tmp_path):
    import torch

    from common.models import load_model
    from learner.weight_sync import WeightSender

    cfg = _config(tmp_path, learner={"sync_timeout_s": 30.0})
    with buffer_and_actor(tmp_path, cfg) as (cfg, actor, address):
        client = BufferClient(address, timeout_s=10)
        _fetch(client, 2, 60, actor, tmp_path / "actor0.log")  # the actor is up and generating at version 0
        model = load_model(cfg.run.model, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            model.model.norm.weight.zero_()  # every logit becomes 0: new samples are uniform, log-prob -log(V)
        sender = WeightSender(cfg.learner, world_size=2, device="cpu")
        try:
            assert sender.broadcast(model, version=1)["perf/sync_ok"] == 1.0
            client.report_version(1)
            new = _groups_at_version(client, 1, 60, actor, tmp_path / "actor0.log")
        finally:
            sender.close()
        uniform = -math.log(model.config.vocab_size)
        for served in new:
            for sample in served.group.samples:
                _, logprobs, versions = sample.arrays()
                assert np.all(versions == 1)
                np.testing.assert_allclose(logprobs, uniform, atol=1e-5)
    records = read_metrics(tmp_path / "metrics.jsonl", role="actor0")
    assert max(r["rollout/policy_version"] for r in records) == 1
    assert max(r["rollout/weight_swaps"] for r in records) >= 1


def _groups_at_version(client: BufferClient, version: int, timeout_s: float, actor, log: Path) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = _fetch(client, 1, timeout_s, actor, log)
        fresh = [g for g in batch.groups if g.group.samples[0].arrays()[2][0] >= version]
        if fresh:
            return fresh
    raise AssertionError(f"no group at version {version}:\n{log.read_text()[-3000:]}")


def test_engine_error_releases_the_lease_and_the_actor_goes_on(tmp_path, monkeypatch):
    import threading

    import actor.worker as worker
    from actor.engines.hf import EngineError, HFEngine

    class FailOnce(HFEngine):
        failed = False

        def generate(self, *args, **kwargs):
            if not FailOnce.failed:
                FailOnce.failed = True
                raise EngineError("simulated failure")
            return super().generate(*args, **kwargs)

    class NoWeights:
        def check(self):
            pass

        def take_latest(self):
            return None

        def wait_for_version(self, version, timeout_s):
            return None

        def close(self):
            pass

    def build(cfg, index, run_dir):
        base = HFEngine.from_config(cfg)
        engine = FailOnce(base.model, pad_token_id=base.pad_token_id, max_batch_sequences=8)
        engine.stop_token_ids = base.stop_token_ids
        return engine, NoWeights()

    monkeypatch.setattr(worker, "_build_engine", build)
    cfg = _config(tmp_path)
    with buffer_and_actor(tmp_path, cfg) as (cfg, actor_proc, address):
        actor_proc.kill()  # this test drives an in-process actor instead
        actor = worker.Actor(with_overrides(cfg, buffer={"address": address}), 0, tmp_path)
        thread = threading.Thread(target=actor.run, daemon=True)
        thread.start()
        try:
            client = BufferClient(address, timeout_s=10)
            deadline = time.monotonic() + 60
            while not client.fetch("learner", 4).groups:
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.2)
            stats = client.stats()
            assert FailOnce.failed and stats["leases_released"] >= 1 and stats["prompts_returned"] >= 1
        finally:
            actor.request_stop()
            thread.join(30)
            actor.close()
    assert not thread.is_alive()


def test_actor_reconnects_after_a_buffer_restart(tmp_path):
    cfg = _config(tmp_path, buffer={"address": f"tcp://127.0.0.1:{free_port()}"})
    config_file = tmp_path / "config.json"
    save_config(cfg, config_file)
    argv = [sys.executable, "-m", "buffer.server", "--config-file", str(config_file)]
    buffer = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "b1.log", "w"))
    actor = _start([sys.executable, "-m", "actor.worker", "--config-file", str(config_file), "--run-dir",
                    str(tmp_path)], tmp_path / "actor0.log")
    try:
        _fetch(BufferClient(cfg.buffer.address, timeout_s=10), 2, 60, actor, tmp_path / "actor0.log")
        buffer.kill()
        buffer.wait(10)
        # Down for longer than the client's own retries (3 attempts of BUFFER_TIMEOUT_S, each extended by the lease's
        # long-poll wait): the actor sees BufferTimeout and must reconnect itself rather than die.
        time.sleep(3 * (BUFFER_TIMEOUT_S + LEASE_WAIT_S) + 1.0)
        buffer = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "b2.log", "w"))
        client = BufferClient(cfg.buffer.address, timeout_s=10)
        _fetch(client, 2, 30, actor, tmp_path / "actor0.log")  # from the new buffer process
        assert "reconnecting" in (tmp_path / "actor0.log").read_text()
    finally:
        for proc in (actor, buffer):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
