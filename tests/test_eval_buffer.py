"""Held-out evaluation coordinated by the buffer (buffer/evaluation.py): aggregation, the job schedule, the share of
sequences it takes, lease expiry, refused results, snapshot/restore. Protocol tests use a real BufferServer over
loopback ZeroMQ."""

from __future__ import annotations

import contextlib
import math
import threading
import time

import pytest

from buffer.client import BufferClient, BufferRejected
from buffer.evaluation import ItemOutcome, aggregate
from buffer.server import BufferServer
from buffer.state import BufferState, PromptRecord, Rejection, decode_snapshot, encode_snapshot
from common.config import with_overrides
from common.metrics import read_metrics
from common.schemas import EvalResult
from test_buffer_state import make_cfg, make_group, make_prompts, mixed


def eval_prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"e{i}", f"eval question {i}", str(i)) for i in range(n)]


def eval_cfg(**run):
    cfg = make_cfg(algo={"max_staleness": 100}, buffer={"lease_timeout_s": 10.0})
    return with_overrides(cfg, run={"eval_every": 2, "eval_samples": 4, "eval_share": 0.5, **run},
                          learner={"total_steps": 5}, actor={"max_new_tokens": 16})


@contextlib.contextmanager
def serving(cfg, n_eval: int, run_dir=None):
    """A real BufferServer (loopback, free port) whose state has `n_eval` held-out prompts; yields a client."""
    cfg = with_overrides(cfg, buffer={"address": "tcp://127.0.0.1:0"})
    state = BufferState(cfg, make_prompts(8), now=time.monotonic(), eval_prompts=eval_prompts(n_eval))
    server = BufferServer(cfg, state, run_dir=run_dir)
    endpoint = server.bind()
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        with BufferClient(endpoint, timeout_s=5) as client:
            yield client
    finally:
        stop.set()
        thread.join(10)
        server.close()


def result(item, correct, version=0, length=3, reward=None):
    return EvalResult(item_id=item.prompt_id, correct=list(correct),
                      rewards=[1.0 if c else 0.0 for c in correct] if reward is None else reward,
                      lengths=[length] * len(correct), weights_version_min=version, weights_version_max=version)


def answer_all(client, grant, correct_of=lambda item: [True] * item.n, version=0):
    for item in grant.items:
        client.submit_eval(grant.lease_id, result(item, correct_of(item), version))


# ------------------------------------------------------------------------------------------------ aggregation


@pytest.mark.unit
def test_aggregate_hand_worked():
    outcomes = [
        ItemOutcome(True, (True,), (1.0,), (4,), (3, 3)),
        ItemOutcome(True, (False,), (0.0,), (8,), (3, 4)),
        ItemOutcome(False, (False, True), (0.0, 1.0), (2, 2), (2, 3)),
        ItemOutcome(False, (False, False), (0.0, 0.5), (5, 6), (3, 3)),
    ]
    m = aggregate(outcomes, k=2, version=6, seconds=1.5)
    assert m["eval/pass@1"] == 0.5                      # greedy: 1 of 2 correct
    assert m["eval/pass@2"] == 0.5                      # sampled: item 3 has a correct sample, item 4 none
    assert m["eval/mean_reward@2"] == 0.375             # (0 + 1 + 0 + 0.5) / 4
    assert m["eval/response_tokens/mean"] == 6.0        # greedy lengths (4 + 8) / 2; sampled lengths not counted
    assert (m["eval/weights_version_min"], m["eval/weights_version_max"]) == (2, 4)
    assert (m["eval/learner_step"], m["eval/seconds"]) == (6, 1.5)


# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.unit
def test_jobs_are_posted_at_start_every_eval_every_and_at_the_end():
    cfg = eval_cfg()  # eval_every 2, total_steps 5
    state = BufferState(cfg, make_prompts(4), eval_prompts=eval_prompts(2))
    state.evals.start(0, now=0.0)
    for v in range(1, 6):
        state.report_version(v, now=float(v))
    assert list(state.evals.jobs) == [0, 2, 4, 5]
    assert state.stats_dict(0.0)["eval_pending"] == [0, 2, 4, 5]
    # A job holds one greedy (n=1) and one sampled (n=eval_samples) item per held-out prompt.
    assert len(state.evals.jobs[0].pending) == 4


@pytest.mark.unit
def test_no_eval_prompts_means_no_jobs():
    state = BufferState(eval_cfg(), make_prompts(4))
    state.evals.start(0, now=0.0)
    state.report_version(1)
    state.report_version(2)
    assert state.stats_dict(0.0)["eval_pending"] == [] and state.lease("a0", 1, now=0.0).eval_version == -1


@pytest.mark.unit
def test_finished_versions_are_not_repeated_after_restore_and_pending_ones_start_over():
    cfg = eval_cfg(eval_share=1.0)
    state = BufferState(cfg, make_prompts(4), eval_prompts=eval_prompts(1))
    state.evals.start(0, now=0.0)
    grant = state.lease("a0", 8, now=0.0)
    assert grant.eval_version == 0 and len(grant.items) == 2
    for item in grant.items:
        state.submit_eval(grant.lease_id, result(item, [True] * item.n), now=1.0)
    assert state.evals.finished == {0} and len(state.evals.take_records()) == 1
    state.report_version(1)
    state.report_version(2)  # job 2 posted; one of its items in flight at snapshot time
    partial = state.lease("a0", 1, now=2.0)
    state.submit_eval(partial.lease_id, result(partial.items[0], [False]), now=2.0)
    snap = decode_snapshot(encode_snapshot(state.to_snapshot(0.0)))
    restored = BufferState.from_snapshot(snap, cfg, make_prompts(4), eval_prompts=eval_prompts(1), now=5.0)
    restored.evals.start(restored.policy_version, now=5.0)
    restored.report_version(2, now=6.0)  # a resumed learner re-reports: job 2 is pending, not posted twice
    assert restored.evals.finished == {0}
    assert list(restored.evals.jobs) == [2] and len(restored.evals.jobs[2].pending) == 2  # starts over
    # A fresh buffer restored at version 0 must not evaluate version 0 again.
    snap0 = decode_snapshot(encode_snapshot(BufferState.from_snapshot(snap, cfg, make_prompts(4)).to_snapshot(0)))
    snap0.policy_version = 0
    again = BufferState.from_snapshot(snap0, cfg, make_prompts(4), eval_prompts=eval_prompts(1))
    again.evals.start(0, now=0.0)
    assert 0 not in again.evals.jobs


# ------------------------------------------------------------------------------------------------ protocol


@pytest.mark.integration
def test_eval_share_of_sequences_and_eval_first_when_training_waits():
    cfg = eval_cfg()  # share 0.5; training items n = 2 (uniform n_mean 2); sampled eval items n = 4
    with serving(cfg, 2) as client:
        kinds = []
        for _ in range(7):
            grant = client.lease("a0", 1)
            kinds.append((grant.eval_version, sum(it.n for it in grant.items)))
        # An evaluation lease holds items up to max_prompts x n_mean = 2 sequences (at least one item): both greedy
        # items (1 each), or one sampled item (4). eval/all sequences before each lease:
        # 0/0 eval(2) -> 2/2 > 0.5 train(2) -> 2/4 eval(4) -> 6/8 train(2) -> 6/10 train(2) -> 6/12 eval(4) -> 10/16
        # train(2)
        assert kinds == [(0, 2), (-1, 2), (0, 4), (-1, 2), (-1, 2), (0, 4), (-1, 2)]
    # Training blocked by admission control: evaluation is granted at once anyway.
    cfg = eval_cfg()
    blocked = with_overrides(cfg, algo={"max_staleness": 0}, learner={"groups_per_step": 1})
    state = BufferState(blocked, make_prompts(4), eval_prompts=eval_prompts(1))
    state.evals.start(0, now=0.0)
    state.lease("a0", 1, now=0.0)  # eval (0 <= 0)
    train = state.lease("a0", 1, now=0.0)
    assert train.eval_version == -1 and state.admission_room() == 0
    assert not state.lease_would_wait(1)  # eval work left: a long poll is answered at once
    grant = state.lease("a0", 1, now=0.0)
    assert grant.eval_version == 0 and grant.items[0].n == 4


@pytest.mark.integration
def test_inspect_leases_shows_evaluation_leases_beside_training_leases():
    from rich.console import Console

    from buffer.inspect import parse_args, run

    with serving(eval_cfg(), 2) as client:
        evaluating = client.lease("eval-actor", 1)  # 0/0 sequences evaluated so far: the evaluation comes first
        training = client.lease("train-actor", 1)
        assert (evaluating.eval_version, training.eval_version) == (0, -1)
        client.submit_eval(evaluating.lease_id, result(evaluating.items[0], [True]))
        rows = client.inspect("leases")
        assert [(r["lease_id"], r["kind"], r["actor_id"], r["policy_version"], r["open"], r["done"])
                for r in rows] == [(evaluating.lease_id, "eval", "eval-actor", 0, 1, 1),
                                   (training.lease_id, "train", "train-actor", 0, 1, 0)]
        assert all(0 < r["seconds_left"] <= 10.0 for r in rows)
        console = Console(record=True, width=160)
        assert run(parse_args(["--addr", client.address, "leases"]), console) == 0
        table = console.export_text()
        assert "eval-actor" in table and "train-actor" in table and "eval " in table


@pytest.mark.integration
def test_expired_or_released_eval_lease_is_reissued_and_the_job_finishes_with_one_record(tmp_path):
    # Long enough that the re-issued lease outlives the requests below on a loaded machine.
    cfg = with_overrides(eval_cfg(eval_share=1.0), buffer={"lease_timeout_s": 2.0})
    with serving(cfg, 2, run_dir=tmp_path) as client:
        lost = client.lease("dead-actor", 2)  # an actor killed mid-evaluation
        assert [it.prompt_id for it in lost.items] == ["eval:greedy:e0", "eval:greedy:e1"]
        assert [it.greedy for it in lost.items] == [True, True]
        time.sleep(2.2)
        again = client.lease("a1", 2)
        assert [it.prompt_id for it in again.items] == ["eval:greedy:e0", "eval:greedy:e1"]
        with pytest.raises(BufferRejected) as late:
            client.submit_eval(lost.lease_id, result(lost.items[0], [True]))
        assert late.value.code == "unknown_lease"
        client.submit_eval(again.lease_id, result(again.items[0], [True], length=4))
        # Given back twice in one request: it returns once.
        assert "returned 1" in client.release(again.lease_id, [again.items[1].prompt_id] * 2)
        rest = client.lease("a1", 8)
        assert [it.prompt_id for it in rest.items] == ["eval:greedy:e1", "eval:sampled:e0", "eval:sampled:e1"]
        answers = {"eval:greedy:e1": [False], "eval:sampled:e0": [False, False, True, False],
                   "eval:sampled:e1": [False] * 4}
        answer_all(client, rest, lambda item: answers[item.prompt_id])
        stats = client.stats()
        assert (stats["eval_pending"], stats["eval_done"]) == ([], 1)
    records = read_metrics(tmp_path / "metrics.jsonl", "eval")
    assert len(records) == 1 and records[0]["step"] == 0
    rec = records[0]
    # greedy: e0 right, e1 wrong -> 0.5; sampled: e0 has one right of 4, e1 none -> 0.5; rewards 1 of 8 -> 0.125;
    # greedy lengths 4 and 3 -> 3.5
    assert (rec["eval/pass@1"], rec["eval/pass@4"], rec["eval/mean_reward@4"]) == (0.5, 0.5, 0.125)
    assert rec["eval/response_tokens/mean"] == 3.5 and rec["eval/learner_step"] == 0
    assert rec["eval/seconds"] > 2.0  # posted before the expired lease


@pytest.mark.integration
def test_bad_results_are_refused_by_name_and_counted():
    cfg = eval_cfg(eval_share=1.0)
    with serving(cfg, 1) as client:
        grant = client.lease("a0", 4)
        greedy, sampled = grant.items
        bad = {
            "unknown_lease": (grant.lease_id + 99, result(greedy, [True])),
            "item_not_in_lease": (grant.lease_id, EvalResult(item_id="eval:greedy:nope", correct=[True],
                                                             rewards=[1.0], lengths=[1], weights_version_min=0,
                                                             weights_version_max=0)),
            "wrong_n": (grant.lease_id, result(sampled, [True, False])),
            "invalid_rewards": (grant.lease_id, result(greedy, [True], reward=[math.nan])),
            "invalid_lengths": (grant.lease_id, result(greedy, [True], length=17)),
            "invalid_versions": (grant.lease_id, result(greedy, [True], version=2)),  # buffer at 0: at most 1
        }
        for code, (lease_id, res) in bad.items():
            with pytest.raises(BufferRejected) as exc:
                client.submit_eval(lease_id, res)
            assert exc.value.code == code, exc.value
        client.submit_eval(grant.lease_id, result(greedy, [True], version=1))
        with pytest.raises(BufferRejected) as dup:
            client.submit_eval(grant.lease_id, result(greedy, [True]))
        assert dup.value.code == "duplicate"
        # A training group sent to an evaluation lease is refused too, and the buffer keeps serving.
        with pytest.raises(BufferRejected):
            client.submit(grant.lease_id, make_group("p0", mixed(2)))
        stats = client.stats()
        assert sum(stats["eval_results_rejected"].values()) == len(bad) + 1
        assert stats["eval_results_rejected"]["wrong_n"] == 1
        assert stats["errors"]["invalid_versions"] == 1
        assert stats["eval_pending"] == [0]


def test_after_the_last_version_the_actors_get_only_the_final_evaluation():
    """Once the learner published learner.total_steps no training group would ever be trained on: every lease goes to
    the final evaluation (not run.eval_share of them), and with nothing left to evaluate the answer is a wait."""
    cfg = eval_cfg(eval_every=0)  # total_steps 5: the one job is v5's; share 0.5; eval n: greedy 1, sampled 4
    state = BufferState(cfg, make_prompts(8), eval_prompts=eval_prompts(2))
    for version in range(1, 5):
        state.report_version(version)
    assert state.lease("a0", 1, now=0.0).eval_version == -1  # no job yet: training
    state.report_version(5)
    kinds = [(g.eval_version, sum(it.n for it in g.items)) for g in (state.lease("a0", 1, now=0.0) for _ in range(3))]
    # 2 sequences per lease: both greedy items, then one sampled item each. With share 0.5 the second lease would
    # have been training work (2 eval of 2 sequences granted > 0.5).
    assert kinds == [(5, 2), (5, 4), (5, 4)]
    done = state.lease("a0", 1, now=0.0)
    assert (done.items, done.wait_reason) == ([], "training_done")
    assert state.counters.lease_waits == {"training_done": 1}
    assert state.lease_would_wait(1)


def test_a_rollback_drops_pending_evaluations_of_discarded_versions_and_posts_them_again_later():
    """A learner resumed from an older checkpoint: a pending job of a later version would have the actors wait for
    weights that no longer exist (and take leases ahead of training); it is dropped, with its leases, and posted
    again when the learner reaches that version."""
    cfg = eval_cfg(eval_every=5)  # total_steps 5 -> 20 below; jobs at 5, 10, ...
    cfg = with_overrides(cfg, learner={"total_steps": 20})
    state = BufferState(cfg, make_prompts(8), eval_prompts=eval_prompts(2))
    for version in range(1, 11):
        state.report_version(version)
    grants = [state.lease("a0", 1, now=0.0) for _ in range(12)]
    late = next(g for g in grants if g.eval_version == 10)  # v5's items went first, then v10's
    assert set(state.evals.jobs) == {5, 10}
    state.report_version(7, rollback=True)
    assert set(state.evals.jobs) == {5}  # v5 was evaluated with weights the learner still builds on: kept
    assert all(lease.version <= 7 for lease in state.evals.leases.values())
    with pytest.raises(Rejection, match="not a live evaluation lease"):
        state.submit_eval(late.lease_id, result(late.items[0], [True] * late.items[0].n), now=0.0)
    assert all(g.eval_version != 10 for g in (state.lease("a0", 1, now=0.0) for _ in range(6)))
    for version in (8, 9, 10):
        state.report_version(version)
    assert set(state.evals.jobs) == {5, 10}
