"""Held-out evaluation served by a real actor process (HF engine, tiny model) through a real buffer: the record it
produces equals learner/evaluate.py's greedy evaluation of the same weights."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
import torch

from buffer.server import BufferServer, load_eval_prompt_records, load_prompt_records
from buffer.state import BufferState
from common.config import with_overrides
from common.metrics import read_metrics
from test_actor_worker import _config

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def buffer_thread(cfg, run_dir: Path, version: int = 0):
    """A real buffer (loopback, free port, the task's held-out prompts) at policy `version`; yields the config."""
    cfg = with_overrides(cfg, buffer={"address": "tcp://127.0.0.1:0"})
    state = BufferState(cfg, load_prompt_records(cfg), now=time.monotonic(),
                        eval_prompts=load_eval_prompt_records(cfg))
    if version:
        state.report_version(version)
    server = BufferServer(cfg, state, run_dir=run_dir)
    endpoint = server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield with_overrides(cfg, buffer={"address": endpoint})
    finally:
        stop.set()
        thread.join(10)
        server.close()


def _eval_records(run_dir: Path, timeout_s: float, worker: threading.Thread) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists():
            records = read_metrics(run_dir / "metrics.jsonl", "eval")
            if records:
                return records
        assert worker.is_alive(), "the actor's loop ended"
        time.sleep(0.1)
    raise AssertionError(f"no eval record within {timeout_s} s")


def perturbed_tiny_weights(seed: int = 3, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """The tiny model's weights plus seeded noise: with them greedy decoding answers some held-out prompts right and
    stops early on others (the tiny model's own initial weights answer none right), so the comparison below has
    something to compare."""
    from common.models import load_model

    model = load_model("tiny", dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    return {name: t + torch.randn(t.shape, generator=gen) * scale for name, t in model.named_parameters()}


def test_an_actor_served_evaluation_equals_the_learner_side_greedy_evaluation(tmp_path):
    from actor.worker import Actor
    from common.models import load_model, load_tokenizer
    from common.tasks import load_prompts
    from learner.evaluate import evaluate

    cfg = _config(tmp_path, task={"eval_size": 16}, actor={"max_new_tokens": 4},
                  run={"eval_samples": 2, "eval_every": 0})
    weights = perturbed_tiny_weights()
    with buffer_thread(cfg, tmp_path) as cfg:
        actor = Actor(cfg, 0, tmp_path)
        actor.engine.load_weights(weights, 0)
        worker = threading.Thread(target=actor.run, daemon=True)
        worker.start()
        try:
            records = _eval_records(tmp_path, 50.0, worker)
        finally:
            actor.request_stop()
            worker.join(30)
            actor.close()
    (record,) = records
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    model.load_state_dict(weights, strict=False)
    expected = evaluate(model, load_tokenizer("tiny"), load_prompts(cfg.task, "eval"), cfg)
    # With these weights 1 of 16 greedy answers is right, and 15 responses run to the 4-token limit while one stops
    # after 3 tokens: (15 * 4 + 3) / 16 = 3.9375.
    assert (expected["eval/pass@1"], expected["eval/response_tokens/mean"]) == (0.0625, 3.9375)
    assert record["step"] == 0 and record["eval/learner_step"] == 0
    assert (record["eval/weights_version_min"], record["eval/weights_version_max"]) == (0, 0)
    assert record["eval/pass@1"] == expected["eval/pass@1"]
    assert record["eval/response_tokens/mean"] == expected["eval/response_tokens/mean"]
    assert 0.0 <= record["eval/pass@2"] <= 1.0 and record["eval/seconds"] > 0


def test_learner_greedy_responses_equal_the_hf_engines_greedy_responses():
    """learner/evaluate.py's `model.generate` responses and the HF engine's greedy ones are the same tokens: a pad
    token the model generates is part of its response; only the stop token and what follows it are not."""
    from actor.engines.base import SamplingParams
    from actor.engines.hf import HFEngine, stop_token_ids_of
    from common.models import load_model, load_tokenizer
    from common.tasks import encode_prompt, load_prompts
    from learner.evaluate import generate_batched

    cfg = with_overrides(_config(Path(".")), task={"eval_size": 16})
    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    model.load_state_dict(perturbed_tiny_weights(), strict=False)
    ids = [encode_prompt(tokenizer, p.question, cfg.task) for p in load_prompts(cfg.task, "eval")]
    learner_side = generate_batched(model, tokenizer, ids, max_new_tokens=4, do_sample=False,
                                    num_return_sequences=1, temperature=1.0, batch_size=64)
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, stop_token_ids=stop_token_ids_of(tokenizer, model))
    samples = [group[0] for group in engine.generate(ids, [1] * len(ids), greedy)]
    engine_side = [s.token_ids.tolist()[: len(s.token_ids) - (s.finish_reason == "stop")] for s in samples]
    # What makes the comparison worth making: with these weights some responses hold the pad id (e.g. [0, 7, 9, 54])
    # and one stops after three tokens.
    assert any(tokenizer.pad_token_id in response for response in engine_side)
    assert sum(s.finish_reason == "stop" for s in samples) == 1
    assert learner_side == engine_side


def _stage(actor, version: int, weights: dict[str, torch.Tensor]) -> None:
    """Put `weights` where the actor's WeightReceiver keeps a fully received version (as its receive thread does)."""
    with actor.weights._cond:
        actor.weights._latest = (version, weights)
        actor.weights._cond.notify_all()


def _evaluate_once(actor, run_dir: Path) -> dict:
    """Lease and run evaluation leases until the buffer wrote the job's record."""
    actor.client = actor._connect()
    for _ in range(20):
        grant = actor.client.lease(actor.actor_id, 8)
        assert grant.eval_version >= 0, grant
        actor._work_eval(grant)
        if actor.client.stats()["eval_done"]:
            (record,) = read_metrics(run_dir / "metrics.jsonl", "eval")
            return record
    raise AssertionError("the evaluation job did not finish")


def test_an_evaluation_lease_never_swaps_in_newer_weights_but_brings_older_ones_up(tmp_path):
    from actor.worker import Actor

    cfg = _config(tmp_path, task={"eval_size": 4}, run={"eval_samples": 2, "eval_every": 1})
    newer = perturbed_tiny_weights()
    # Version 0's job, the engine at 0 and version 1 staged: evaluated with 0, version 1 stays staged.
    with buffer_thread(cfg, tmp_path / "a") as served:
        actor = Actor(served, 0, tmp_path / "a")
        try:
            _stage(actor, 1, newer)
            record = _evaluate_once(actor, tmp_path / "a")
            assert actor.engine.policy_version == 0
            assert (record["eval/weights_version_min"], record["eval/weights_version_max"]) == (0, 0)
            assert actor.weights.take_latest()[0] == 1
        finally:
            actor.close()
    # A buffer at version 1 posts version 1's job: the engine at 0 takes the staged version 1 first.
    with buffer_thread(cfg, tmp_path / "b", version=1) as served:
        actor = Actor(served, 0, tmp_path / "b")
        try:
            _stage(actor, 1, newer)
            record = _evaluate_once(actor, tmp_path / "b")
            assert actor.engine.policy_version == 1
            assert (record["step"], record["eval/weights_version_min"], record["eval/weights_version_max"]) == (1, 1, 1)
        finally:
            actor.close()
