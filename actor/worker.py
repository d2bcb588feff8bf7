"""The actor process: lease prompts from the buffer, sample responses, score them, submit groups, forever.

    python -m actor.worker --config-file runs/<name>/config.json --actor-index 0 [--run-dir runs/<name>]
                           [--section.field VALUE ...]

Loop: register -> lease (a long poll: the buffer holds the request while admission control says wait; the wait
counts as idle) -> make sure the engine's weights are at least the lease's policy_version (the contract of
docs/INTERFACES.md: swap in the newest staged version; if still older, wait for the broadcast in flight) ->
generate n_i responses per prompt -> score each -> submit one Group per prompt -> repeat. Generation never waits for the learner except for that version floor.

Weights: HF engines receive them in a background `WeightReceiver` at rank 1 + actor_index and swap at batch
boundaries; SGLang engines follow the learner's announcements in a background thread that drives the servers'
own update session (pause -> update -> continue). Failures: a buffer that stops answering is reconnected to
(register again, continue); an engine error on a batch is logged and the lease released; a prompt with an
aborted sample is released, never scored; SIGTERM/SIGINT finish the current lease (or release it while waiting
for weights) and exit 0. Metrics `rollout/*` go to <run_dir>/metrics.jsonl with role `actor<index>`.

Held-out evaluation: a grant with `eval_version` V >= 0 is an evaluation lease. Its items are generated on the same
engine, greedy items at temperature 0 (n = 1) and sampled items with the actor's sampling parameters, scored, and
answered with one EvalSubmit each (correct, rewards, lengths, and the versions of the weights that generated
them). For it the engine is brought up to V only if it is older (waiting for V like a training lease); it never
swaps in a newer staged version first, and an engine already past V evaluates with what it has. An item of a
benchmark suite (`WorkItem.benchmark`, run.eval_suite) is graded by the math scorer, as learner.evaluate_suite
grades it, whatever task.scorer says; the task's rewards apply.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("actor")

LEASE_WAIT_S = 1.0
"""Long poll: while admission control or back-pressure leave no work, the buffer holds a lease request up to this
long and grants the moment work is allowed (e.g. the learner's version report), so the actor never sleeps past it."""
IDLE_SLEEP_S = 0.01
"""Pause after an empty grant (it only comes back early if the buffer could not hold the request)."""
BUFFER_TIMEOUT_S = 5.0
RECONNECT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


@dataclass
class RolloutStats:
    """Accumulates rollout/* metrics between two log records."""

    started: float = field(default_factory=time.monotonic)
    idle_s: float = 0.0
    generate_s: float = 0.0
    tokens: int = 0
    samples: int = 0
    truncated: int = 0
    max_length: int = 0
    reward_sum: float = 0.0
    correct: int = 0
    swap_s: float = 0.0
    swaps: int = 0
    released: int = 0
    rejected: int = 0

    def add_samples(self, lengths: list[int], rewards: list[float], correct: list[bool], truncated: int) -> None:
        self.tokens += sum(lengths)
        self.samples += len(lengths)
        self.max_length = max([self.max_length, *lengths])
        self.reward_sum += sum(rewards)
        self.correct += sum(correct)
        self.truncated += truncated

    def metrics(self, policy_version: int, total_swaps: int) -> dict[str, float]:
        wall = max(time.monotonic() - self.started, 1e-9)
        n = max(self.samples, 1)
        return {
            "rollout/tokens_per_s": self.tokens / max(self.generate_s, 1e-9),
            "rollout/samples_per_s": self.samples / wall,
            "rollout/response_length/mean": self.tokens / n,
            "rollout/response_length/max": self.max_length,
            "rollout/truncation_ratio": self.truncated / n,
            "rollout/reward/mean": self.reward_sum / n,
            "rollout/accuracy/mean": self.correct / n,
            "rollout/idle_fraction": min(self.idle_s / wall, 1.0),
            "rollout/weight_swap_s": self.swap_s,
            "rollout/weight_swaps": total_swaps,
            "rollout/policy_version": policy_version,
            "rollout/released_prompts": self.released,
            "rollout/rejected_groups": self.rejected,
        }


def parse_args(argv: Sequence[str] | None) -> tuple[int, Path | None, Any]:
    """(--actor-index, --run-dir, Config); every other flag goes to common.config.parse_cli."""
    from common.config import parse_cli

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--actor-index", type=int, default=0)
    own.add_argument("--run-dir", type=Path, default=None)
    args, rest = own.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_cli(rest, description=__doc__.split("\n\n")[0])
    run_dir = args.run_dir
    if run_dir is None and cfg.run.name:
        run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    return args.actor_index, run_dir, cfg


def main(argv: Sequence[str] | None = None) -> int:
    index, run_dir, cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s actor{index} %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(cfg.torch_threads("actor"))
    actor = Actor(cfg, index, run_dir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: actor.request_stop())
    try:
        actor.run()
    finally:
        actor.close()
    return 0


class Actor:
    """One actor: an engine, its weight follower, a buffer connection and the rollout loop."""

    def __init__(self, cfg: Any, index: int, run_dir: Path | None):
        from actor.engines.base import SamplingParams
        from common.metrics import MetricsLogger
        from common.models import load_tokenizer

        self.cfg = cfg
        self.index = index
        self.actor_id = f"actor{index}"
        self.stop_event = threading.Event()
        self.tokenizer = load_tokenizer(cfg.run.model)
        self.engine, self.weights = _build_engine(cfg, index, run_dir)
        stop_ids = getattr(self.engine, "stop_token_ids", None) or _tokenizer_stop_ids(self.tokenizer)
        self.sampling = SamplingParams.from_actor_config(cfg.actor, stop_ids)
        self.metrics = MetricsLogger(run_dir, self.actor_id, cfg.run.wandb_mode, cfg.run.wandb_project)
        self.stats = RolloutStats()
        self.total_swaps = 0
        self.leases_done = 0
        self.client = None
        self._prompt_tokens: dict[str, list[int]] = {}

    def request_stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        self.client = self._connect()
        logger.info("%s: engine=%s model=%s buffer=%s", self.actor_id, self.cfg.actor.engine, self.cfg.run.model,
                    self.cfg.buffer.address)
        while not self.stop_event.is_set():
            self.weights.check()
            grant = self._lease()
            if grant is None or not grant.items:
                self._idle(IDLE_SLEEP_S)
                continue
            if grant.eval_version >= 0:
                self._work_eval(grant)
                continue
            self._work_lease(grant)
            self.leases_done += 1
            self.metrics.log(self.leases_done, self.stats.metrics(self.engine.policy_version, self.total_swaps))
            self.stats = RolloutStats()
        logger.info("%s: stopping after %d leases", self.actor_id, self.leases_done)

    def close(self) -> None:
        self.weights.close()
        self.engine.close()
        if self.client is not None:
            self.client.close()
        self.metrics.close()

    # ------------------------------------------------------------------------------------------ buffer

    def _connect(self) -> Any:
        """A registered BufferClient; retries with backoff while the buffer is down (e.g. restarting)."""
        from buffer.client import BufferClient, BufferTimeout

        attempt = 0
        while True:
            # Replies take milliseconds; a short timeout finds a restarted buffer quickly (requests are retry-safe).
            client = BufferClient.from_config(self.cfg.buffer, timeout_s=BUFFER_TIMEOUT_S)
            try:
                client.register("actor", self.actor_id)
                return client
            except BufferTimeout:
                client.close()
                delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
                logger.warning("%s: buffer at %s not answering; retrying in %.1f s", self.actor_id,
                               self.cfg.buffer.address, delay)
                attempt += 1
                if self.stop_event.wait(delay):
                    raise SystemExit(0) from None

    def _lease(self) -> Any:
        from buffer.client import BufferTimeout

        start = time.monotonic()
        try:
            return self.client.lease(self.actor_id, self.cfg.actor.prompts_per_lease, wait_s=LEASE_WAIT_S)
        except BufferTimeout:
            logger.warning("%s: lease timed out; reconnecting to the buffer", self.actor_id)
            self.client.close()
            self.client = self._connect()
            return None
        finally:  # a held request is waiting for admission: idle time (an immediate grant adds ~0.1 ms)
            self.stats.idle_s += time.monotonic() - start

    def _release(self, lease_id: int, prompt_ids: list[str]) -> None:
        from buffer.client import BufferRejected, BufferTimeout

        if not prompt_ids:
            return
        self.stats.released += len(prompt_ids)
        try:
            self.client.release(lease_id, prompt_ids)
        except (BufferRejected, BufferTimeout) as exc:
            # The lease is gone (expired, buffer restarted): its prompts return to the pool anyway.
            logger.warning("%s: release of lease %d failed (%s)", self.actor_id, lease_id, exc)

    def _idle(self, seconds: float) -> None:
        start = time.monotonic()
        self.stop_event.wait(seconds)
        self.stats.idle_s += time.monotonic() - start

    # ------------------------------------------------------------------------------------------ one lease

    def _work_lease(self, grant: Any) -> None:
        from actor.engines.hf import EngineError
        from actor.engines.sglang import SGLangError
        from common.tasks import prompt_from_work_item

        prompt_ids = [item.prompt_id for item in grant.items]
        # Give up waiting for weights well before the lease expires, so the release reaches a live lease.
        max_wait = min(self.cfg.learner.sync_timeout_s, 0.5 * grant.deadline_s or self.cfg.learner.sync_timeout_s)
        if not self._ensure_version(grant.policy_version, max_wait):
            self._release(grant.lease_id, prompt_ids)
            return
        prompts = [prompt_from_work_item(item) for item in grant.items]
        token_ids = [self._encode(p) for p in prompts]
        start = time.monotonic()
        try:
            samples = self.engine.generate(token_ids, [item.n for item in grant.items], self.sampling)
        except (EngineError, SGLangError, RuntimeError, ValueError) as exc:
            logger.error("%s: generation failed for lease %d (%s); releasing its %d prompts", self.actor_id,
                         grant.lease_id, exc, len(prompt_ids), exc_info=True)
            self._release(grant.lease_id, prompt_ids)
            return
        self.stats.generate_s += time.monotonic() - start
        groups, incomplete = self._score_groups(prompts, token_ids, samples)
        self._release(grant.lease_id, incomplete)
        self._submit(grant.lease_id, groups)

    def _work_eval(self, grant: Any) -> None:
        """An evaluation lease: generate with weights of grant.eval_version when possible, score, submit results."""
        from actor.engines.hf import EngineError
        from actor.engines.sglang import SGLangError
        from common.tasks import prompt_from_work_item

        item_ids = [item.prompt_id for item in grant.items]
        max_wait = min(self.cfg.learner.sync_timeout_s, 0.5 * grant.deadline_s or self.cfg.learner.sync_timeout_s)
        if self.engine.policy_version < grant.eval_version and not self._ensure_version(grant.eval_version,
                                                                                        max_wait):
            self._release(grant.lease_id, item_ids)
            return
        results, incomplete = [], []
        for greedy in (True, False):
            items = [item for item in grant.items if item.greedy == greedy]
            if not items:
                continue
            prompts = [prompt_from_work_item(item) for item in items]
            sampling = replace(self.sampling, temperature=0.0) if greedy else self.sampling
            try:
                samples = self.engine.generate([self._encode(p) for p in prompts], [item.n for item in items],
                                               sampling)
            except (EngineError, SGLangError, RuntimeError, ValueError) as exc:
                logger.error("%s: evaluation generation failed for lease %d (%s)", self.actor_id, grant.lease_id,
                             exc, exc_info=True)
                incomplete.extend(item.prompt_id for item in items)
                continue
            scored, aborted = self._score_eval(items, prompts, samples)
            results.extend(scored)
            incomplete.extend(aborted)
        self._release(grant.lease_id, incomplete)
        self._submit_eval(grant.lease_id, results)

    def _score_eval(self, items: list[Any], prompts: list[Any],
                    samples: list[list[Any]]) -> tuple[list[Any], list[str]]:
        """(EvalResults, item ids with an aborted sample). Lengths leave out the final stop token, as
        learner/evaluate.py counts them. Suite items are graded by the math scorer."""
        from common.schemas import EvalResult
        from common.tasks import score_response

        results, aborted = [], []
        suite_task = replace(self.cfg.task, scorer="math")
        for item, prompt, group in zip(items, prompts, samples):
            if any(s.finish_reason == "abort" for s in group):
                aborted.append(prompt.prompt_id)
                continue
            task = suite_task if item.benchmark else self.cfg.task
            scores = [score_response(prompt, self.tokenizer.decode(s.token_ids, skip_special_tokens=True), task)
                      for s in group]
            versions = [int(v) for s in group for v in (s.versions.min(), s.versions.max()) if len(s.versions)]
            versions = versions or [self.engine.policy_version]
            results.append(EvalResult(item_id=prompt.prompt_id, correct=[ok for _, ok in scores],
                                      rewards=[reward for reward, _ in scores],
                                      lengths=[len(s.token_ids) - (s.finish_reason == "stop") for s in group],
                                      weights_version_min=min(versions), weights_version_max=max(versions)))
        return results, aborted

    def _submit_eval(self, lease_id: int, results: list[Any]) -> None:
        from buffer.client import BufferRejected, BufferTimeout

        for result in results:
            try:
                self.client.submit_eval(lease_id, result)
            except BufferRejected as exc:
                logger.warning("%s: evaluation result %s of lease %d rejected: %s", self.actor_id, result.item_id,
                               lease_id, exc)
            except BufferTimeout:
                logger.warning("%s: evaluation submit of lease %d timed out; reconnecting (the buffer re-issues "
                               "its items)", self.actor_id, lease_id)
                self.client.close()
                self.client = self._connect()
                return

    def _ensure_version(self, version: int, max_wait_s: float) -> bool:
        """Bring the engine to weights >= version; False (after max_wait_s, or on stop) if they never came."""
        self._swap_in(self.weights.take_latest())
        deadline = time.monotonic() + max_wait_s
        while self.engine.policy_version < version:
            if self.stop_event.is_set() or time.monotonic() > deadline:
                if not self.stop_event.is_set():
                    logger.warning("%s: weights %d never arrived (have %d); releasing the lease", self.actor_id,
                                   version, self.engine.policy_version)
                return False
            start = time.monotonic()
            staged = self.weights.wait_for_version(version, timeout_s=0.5)
            self.stats.idle_s += time.monotonic() - start
            self._swap_in(staged)
        return True

    def _swap_in(self, staged: tuple[int, dict] | None) -> None:
        # Staged weights are the learner's newest; an older version than the engine's means a resumed learner
        # rolled back, and generating on with the discarded weights would only make groups the buffer refuses.
        if staged is None or staged[0] == self.engine.policy_version:
            return
        start = time.monotonic()
        self.engine.load_weights(staged[1], staged[0])
        self.stats.swap_s += time.monotonic() - start
        self.stats.swaps += 1
        self.total_swaps += 1

    def _encode(self, prompt: Any) -> list[int]:
        from common.tasks import encode_prompt

        if prompt.prompt_id not in self._prompt_tokens:
            self._prompt_tokens[prompt.prompt_id] = encode_prompt(self.tokenizer, prompt.question, self.cfg.task)
        return self._prompt_tokens[prompt.prompt_id]

    def _score_groups(self, prompts: list[Any], token_ids: list[list[int]],
                      samples: list[list[Any]]) -> tuple[list[Any], list[str]]:
        """(Groups to submit, prompt ids to release because a sample was aborted)."""
        from common.schemas import TOKEN_DTYPE, Group, encode_array, make_sample
        from common.tasks import score_response

        groups, incomplete = [], []
        for prompt, ids, group_samples in zip(prompts, token_ids, samples):
            if any(s.finish_reason == "abort" for s in group_samples):
                incomplete.append(prompt.prompt_id)
                continue
            wire, rewards, correct = [], [], []
            for s in group_samples:
                text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                reward, ok = score_response(prompt, text, self.cfg.task)
                rewards.append(reward)
                correct.append(ok)
                wire.append(make_sample(s.token_ids, s.logprobs, s.versions, reward, ok, s.finish_reason))
            self.stats.add_samples([len(s.token_ids) for s in group_samples], rewards, correct,
                                   sum(s.finish_reason == "length" for s in group_samples))
            groups.append(Group(prompt_id=prompt.prompt_id, prompt_tokens=encode_array(ids, TOKEN_DTYPE),
                                samples=wire))
        return groups, incomplete

    def _submit(self, lease_id: int, groups: list[Any]) -> None:
        from buffer.client import BufferRejected, BufferTimeout

        try:
            results = self.client.submit_many(lease_id, groups)
        except BufferTimeout:
            logger.warning("%s: submit of lease %d timed out; reconnecting (the buffer re-issues its prompts)",
                           self.actor_id, lease_id)
            self.client.close()
            self.client = self._connect()
            return
        for group, result in zip(groups, results):
            if isinstance(result, BufferRejected):
                self.stats.rejected += 1
                logger.warning("%s: group %s of lease %d rejected: %s", self.actor_id, group.prompt_id, lease_id,
                               result)


# ---------------------------------------------------------------------------------------------- engines


def _tokenizer_stop_ids(tokenizer: Any) -> tuple[int, ...]:
    from actor.engines.hf import stop_token_ids_of

    return stop_token_ids_of(tokenizer)


def _build_engine(cfg: Any, index: int, run_dir: Path | None) -> tuple[Any, Any]:
    """(engine, weight follower) for cfg.actor.engine; the follower has check/take_latest/wait_for_version/close."""
    if cfg.actor.engine == "sglang":
        from actor.engines.sglang import SGLangEngine
        from actor.weight_receiver import SGLangFollower

        engine = SGLangEngine.from_config(cfg, index, log_dir=str(run_dir) if run_dir else None)
        return engine, SGLangFollower(cfg, engine).start()
    from actor.engines.hf import HFEngine
    from actor.weight_receiver import WeightReceiver

    import torch

    from common.config import with_overrides
    from common.layout import hf_engine_device

    # This actor's GPU from the layout (an HF engine may share the learner's: weights arrive over gloo)
    on_device = with_overrides(cfg, actor={"device": hf_engine_device(cfg, index, torch.cuda.is_available())})
    engine = HFEngine.from_config(on_device, seed=cfg.run.seed * 1000 + index)
    receiver = WeightReceiver(cfg.learner, 1 + index, engine.state_dict_template(), engine.device)
    return engine, receiver.start()


if __name__ == "__main__":
    raise SystemExit(main())
