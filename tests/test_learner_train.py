"""`python -m learner.train` end to end: real buffer process, a fake actor (synthetic groups + a WeightReceiver),
SIGTERM -> checkpoint + exit 0, `--resume` continues the version numbering; asserts on metrics.jsonl."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import PRESETS, save_config, with_overrides
from common.metrics import read_metrics
from common.processes import free_port
from common.schemas import TOKEN_DTYPE, Group, encode_array, make_sample

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _config():
    return with_overrides(
        PRESETS["tiny"](),
        run={"wandb_mode": "disabled", "eval_every": 0},
        task={"eval_size": 0},
        algo={"max_staleness": 8},
        buffer={"address": f"tcp://127.0.0.1:{free_port()}", "snapshot_interval_s": 60.0},
        actor={"num_actors": 1, "dtype": "float32"},
        learner={"groups_per_step": 2, "total_steps": 4, "checkpoint_every": 2, "threads": 1,
                 "sync_address": f"127.0.0.1:{free_port()}", "sync_timeout_s": 30.0,
                 "sync_control_address": f"tcp://127.0.0.1:{free_port()}"})


class FakeActor:
    """Leases prompts and submits random responses with varied rewards; follows the weights at rank 1."""

    def __init__(self, cfg):
        from buffer.client import BufferClient
        from common.models import load_model
        from actor.weight_receiver import WeightReceiver

        self.client = BufferClient(cfg.buffer.address, timeout_s=5.0)
        template = load_model(cfg.run.model, dtype=torch.float32, device="cpu").state_dict()
        self.receiver = WeightReceiver(cfg.learner, 1, template, "cpu").start()
        self.stop = threading.Event()
        self.rng = np.random.default_rng(0)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _group(self, item, version):
        samples = []
        for j in range(item.n):
            length = int(self.rng.integers(2, 5))
            tokens = self.rng.integers(10, 60, length)
            samples.append(make_sample(tokens, -self.rng.uniform(0.5, 3.0, length), [version] * length,
                                       float(j % 2), bool(j % 2), "stop"))
        prompt = encode_array(self.rng.integers(10, 60, 6), TOKEN_DTYPE)
        return Group(prompt_id=item.prompt_id, prompt_tokens=prompt, samples=samples)

    def _run(self):
        self.client.register("actor", "actor0")
        while not self.stop.is_set():
            grant = self.client.lease("actor0", 2)
            if not grant.items:
                time.sleep(0.05)
                continue
            for item in grant.items:
                self.client.submit(grant.lease_id, self._group(item, grant.policy_version))

    def close(self):
        self.stop.set()
        self.thread.join(60)
        self.receiver.close()
        self.client.close()


def _start(module, run_dir, log, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", module, "--config-file", str(run_dir / "config.json"),
                             "--run-dir", str(run_dir), *extra], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigterm_checkpoints_and_resume_continues_the_versions(tmp_path):
    cfg = _config()
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.json")
    log = open(tmp_path / "roles.log", "w")
    buffer = _start("buffer.server", run_dir, log)
    actor, learner = None, None
    try:
        actor = FakeActor(cfg)
        actor.thread.start()
        learner = _start("learner.train", run_dir, log)
        _wait_for(lambda: (run_dir / "checkpoints" / "step_00000002").exists(), 90, "the step-2 checkpoint")
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(60) == 0
        stopped_at = max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl", role="learner"))
        assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").exists()  # SIGTERM wrote a checkpoint
        assert (run_dir / "buffer_snapshot.msgpack").exists()  # ... and asked the buffer to snapshot
        learner = _start("learner.train", run_dir, log, "--resume")
        assert learner.wait(120) == 0  # runs to total_steps and exits 0
        assert actor.receiver.wait_for_version(cfg.learner.total_steps, timeout_s=30) is not None
    finally:
        if actor is not None:  # before the buffer goes, so its thread is not left waiting on a dead socket
            actor.close()
        for proc in (learner, buffer):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        log.close()
    records = [r for r in read_metrics(run_dir / "metrics.jsonl", role="learner") if "loss/policy" in r]
    print(records[-1])
    steps = [r["step"] for r in records]
    assert steps == list(range(1, cfg.learner.total_steps + 1)), (tmp_path / "roles.log").read_text()[-3000:]
    for record in records:
        for key in ("loss/policy", "optim/grad_norm", "optim/lr", "time/fetch_wait_s", "time/idle_fraction",
                    "time/sync_s", "perf/tokens_per_s", "perf/peak_memory_mb", "buffer/staleness/max",
                    "reward/mean", "loss/is_weight/max", "modulation/beta_stab/min"):
            assert record.get(key) is not None, (key, record["step"])
    assert sum(r["perf/sync_ok"] for r in records) >= len(records) - 1  # the receiver was in the group
