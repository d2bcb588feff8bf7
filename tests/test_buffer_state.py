"""Unit tests of the buffer's pure state machine (no sockets): leasing, admission control, ingest, serving,
expiry, dedup, counters and snapshots. Expectations are worked by hand in the comments."""

from __future__ import annotations

import math

import pytest

from buffer.state import BufferState, PromptRecord, Rejection, decode_snapshot, encode_snapshot
from common.config import Config, with_overrides
from common.schemas import Group, make_sample

pytestmark = pytest.mark.unit


def make_cfg(algo=None, buffer=None, learner=None) -> Config:
    base = with_overrides(Config(), algo={"allocation_mode": "uniform", "n_mean": 2, "n_min": 1, "n_max": 4,
                                          "initial_budget": 1, "max_staleness": 1},
                          buffer={"wave_size": 4, "lease_timeout_s": 10.0, "max_queued_groups": 100},
                          learner={"groups_per_step": 2})
    return with_overrides(base, algo=algo or {}, buffer=buffer or {}, learner=learner or {})


def make_prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", f"question {i}", str(i)) for i in range(n)]


def make_group(prompt_id: str, correct: list[bool], version: int = 0, n_tokens: int = 3) -> Group:
    samples = [make_sample(range(n_tokens), [-0.5] * n_tokens, [version] * n_tokens, reward=1.0 if c else 0.0,
                           correct=c, finish_reason="stop") for c in correct]
    return Group(prompt_id=prompt_id, prompt_tokens=b"\x01\x00\x00\x00", samples=samples)


def mixed(n: int) -> list[bool]:
    """n outcomes with both values (non-zero variance), first one correct."""
    return [i % 2 == 0 for i in range(n)]


def invariant_holds(state: BufferState) -> bool:
    c = state.counters
    return (c.groups_received == c.groups_served + c.groups_dropped_stale + c.groups_dropped_rollback
            + c.groups_zero_variance + len(state.queue))


def test_lease_submit_fetch_round_trip_updates_stats_exactly():
    state = BufferState(make_cfg(), make_prompts(8))
    grant = state.lease("a0", 2, now=0.0)
    # uniform mode, n_mean 2: every item has n = 2; one wave of 4 allocated, 2 leased, 2 pending.
    assert [it.n for it in grant.items] == [2, 2]
    assert state.in_flight == 2 and len(state.pending) == 2
    first = grant.items[0].prompt_id
    ack = state.submit(grant.lease_id, make_group(first, [True, False]), now=1.0)
    assert ack.accepted and ack.queued
    # G = 2 responses, k = 1 correct for exactly that prompt, nothing for the others.
    assert (state.stats[first].samples, state.stats[first].correct) == (2.0, 1.0)
    assert sum(s.samples for s in state.stats.values()) == 2.0
    assert state.fetch(2).groups == []  # only one queued: never a partial batch
    state.submit(grant.lease_id, make_group(grant.items[1].prompt_id, [False, True]), now=1.0)
    batch = state.fetch(2)
    assert [g.group.prompt_id for g in batch.groups] == [it.prompt_id for it in grant.items]
    assert [g.arrival for g in batch.groups] == [2**31, 2**31 + 1]  # incarnation 1, the first two arrivals
    s = state.stats_dict(2.0)
    assert (s["groups_received"], s["groups_served"], s["queue_depth"], s["in_flight"]) == (2, 2, 0, 0)
    assert s["staleness_hist"] == {0: 2} and s["samples_received"] == 4
    assert invariant_holds(state)


def test_allocation_from_priorities_is_visible_in_leases():
    cfg = make_cfg(algo={"allocation_mode": "reference", "n_mean": 4, "n_min": 2, "n_max": 6, "initial_budget": 2,
                         "min_history": 4, "max_staleness": 100})
    state = BufferState(cfg, make_prompts(4))
    # Give every prompt 8 responses: p0 4/8 correct (var 4*4/(8*7)=0.2857), p1 8/8 (mastered -> floor 0.01),
    # p2 2/8 (2*6/56=0.2143), p3 0/8 (floor). Epoch 0 order is random, so set stats directly.
    for pid, k in {"p0": 4, "p1": 8, "p2": 2, "p3": 0}.items():
        state.stats[pid].samples, state.stats[pid].correct = 8.0, float(k)
    grant = state.lease("a0", 4, now=0.0)
    n = {it.prompt_id: it.n for it in grant.items}
    # Budget 16, floor 2 each (8), remaining 8 shared ~ priority: p0 and p2 take it all, capped at n_max 6.
    assert n["p1"] == 2 and n["p3"] == 2
    assert n["p0"] == 6 and n["p2"] == 6
    assert sum(n.values()) == 16
    assert state.stats["p0"].allocations == [6]


def test_partially_leased_wave_keeps_its_n():
    cfg = make_cfg(algo={"allocation_mode": "reference", "n_mean": 4, "n_min": 2, "n_max": 6, "initial_budget": 2,
                         "max_staleness": 100})
    state = BufferState(cfg, make_prompts(4))
    for pid, k in {"p0": 4, "p1": 8, "p2": 2, "p3": 0}.items():
        state.stats[pid].samples, state.stats[pid].correct = 8.0, float(k)
    first = state.lease("a0", 1, now=0.0)
    # Changing the stats now must not re-allocate the rest of the wave already allocated.
    for s in state.stats.values():
        s.samples, s.correct = 0.0, 0.0
    rest = state.lease("a1", 3, now=0.0)
    n = {it.prompt_id: it.n for it in first.items + rest.items}
    assert n == {"p0": 6, "p1": 2, "p2": 6, "p3": 2}


def test_epochs_visit_every_prompt_once_in_seeded_order():
    state = BufferState(make_cfg(algo={"max_staleness": 100}), make_prompts(6))
    ids = []
    for _ in range(6):
        grant = state.lease("a0", 1, now=0.0)
        ids += [it.prompt_id for it in grant.items]
    assert sorted(ids) == [f"p{i}" for i in range(6)] and state.epoch == 0
    state.lease("a0", 1, now=0.0)
    assert state.epoch == 1
    # Same seed -> same order; another seed -> (here) another order.
    assert BufferState(make_cfg(), make_prompts(6)).epoch_order == BufferState(make_cfg(), make_prompts(6)).epoch_order
    assert BufferState(make_cfg(buffer={"seed": 1}), make_prompts(6)).epoch_order != state._shuffled(0)


def test_admission_control_caps_leases_by_staleness_window():
    # groups_per_step 2, max_staleness 1, version 0 -> limit (0+1+1)*2 = 4 groups served+queued+in flight.
    state = BufferState(make_cfg(), make_prompts(8))
    assert len(state.lease("a0", 3, now=0.0).items) == 3
    g = state.lease("a1", 3, now=0.0)
    assert len(g.items) == 1  # only 1 more fits
    w = state.lease("a1", 1, now=0.0)
    assert w.items == [] and w.wait_reason == "staleness" and w.lease_id == 0
    state.report_version(1)  # limit 6
    assert len(state.lease("a1", 5, now=0.0).items) == 2
    assert state.counters.lease_waits == {"staleness": 1}


def test_zero_variance_and_stale_groups_free_their_admission_slot():
    state = BufferState(make_cfg(), make_prompts(8))  # limit 4 at version 0
    grant = state.lease("a0", 4, now=0.0)
    for it in grant.items:
        state.submit(grant.lease_id, make_group(it.prompt_id, [True, True]), now=0.0)  # all zero variance
    # 4 received, 4 dropped as zero variance: none served, none queued, none in flight -> 4 slots free again.
    assert state.counters.groups_zero_variance == 4 and state.admission_room() == 4
    assert len(state.lease("a0", 4, now=0.0).items) == 4
    assert invariant_holds(state)


def test_backpressure_stops_leasing_when_queue_is_full():
    state = BufferState(make_cfg(algo={"max_staleness": 100}, buffer={"max_queued_groups": 2}), make_prompts(8))
    grant = state.lease("a0", 3, now=0.0)
    for it in grant.items:
        state.submit(grant.lease_id, make_group(it.prompt_id, mixed(it.n)), now=0.0)
    # 3 queued >= 2: leasing waits (the third in-flight group was still accepted: nothing is dropped silently).
    w = state.lease("a0", 1, now=0.0)
    assert w.items == [] and w.wait_reason == "backpressure" and len(state.queue) == 3
    state.fetch(2)
    assert len(state.lease("a0", 1, now=0.0).items) == 1


def test_stale_groups_are_dropped_at_fetch_and_staleness_is_reported():
    state = BufferState(make_cfg(algo={"max_staleness": 1}, learner={"groups_per_step": 2}), make_prompts(8))
    grant = state.lease("a0", 4, now=0.0)
    a, b, c, d = [it.prompt_id for it in grant.items]
    state.submit(grant.lease_id, make_group(a, [True, False], version=0), now=0.0)
    state.report_version(1)
    state.submit(grant.lease_id, make_group(b, [True, False], version=1), now=0.0)
    state.submit(grant.lease_id, make_group(c, [True, False], version=1), now=0.0)
    state.report_version(2)
    # At version 2: a has staleness 2 > 1 -> dropped; b and c have staleness 1 -> served.
    batch = state.fetch(2)
    assert batch.dropped_stale == 1
    assert [(g.group.prompt_id, g.staleness) for g in batch.groups] == [(b, 1), (c, 1)]
    assert state.counters.groups_dropped_stale == 1 and state.counters.staleness_hist == {1: 2}
    assert invariant_holds(state)


def test_max_staleness_zero_gives_strictly_on_policy_batches():
    state = BufferState(make_cfg(algo={"max_staleness": 0}, learner={"groups_per_step": 2}), make_prompts(8))
    for version in range(3):
        grant = state.lease("a0", 5, now=0.0)
        # (v + 0 + 1) * 2 - served(2v) = 2 prompts per version, exactly one batch.
        assert len(grant.items) == 2 and state.lease("a0", 1, now=0.0).wait_reason == "staleness"
        for it in grant.items:
            state.submit(grant.lease_id, make_group(it.prompt_id, mixed(it.n), version=version), now=0.0)
        batch = state.fetch(2)
        assert [g.staleness for g in batch.groups] == [0, 0]
        state.report_version(version + 1)


def test_expired_lease_returns_prompts_to_front_and_late_submission_is_rejected():
    state = BufferState(make_cfg(), make_prompts(8))
    grant = state.lease("a0", 2, now=0.0)  # deadline 10.0
    ids = [it.prompt_id for it in grant.items]
    again = state.lease("a1", 2, now=10.5)  # the expiry runs first and re-issues the same prompts
    assert [it.prompt_id for it in again.items] == ids and [it.n for it in again.items] == [2, 2]
    assert state.counters.leases_expired == 1 and state.counters.prompts_returned == 2
    with pytest.raises(Rejection) as err:
        state.submit(grant.lease_id, make_group(ids[0], [True, False]), now=11.0)
    assert err.value.code == "expired_lease"
    assert state.counters.groups_rejected == {"expired_lease": 1}


def test_release_returns_prompts_and_is_counted_separately():
    state = BufferState(make_cfg(), make_prompts(8))
    grant = state.lease("a0", 2, now=0.0)
    ids = [it.prompt_id for it in grant.items]
    state.release(grant.lease_id, [ids[1], "nope"], now=0.0)
    assert state.in_flight == 1 and state.pending[0].prompt_id == ids[1]
    assert (state.counters.leases_released, state.counters.leases_expired) == (1, 0)
    with pytest.raises(Rejection) as err:
        state.submit(grant.lease_id, make_group(ids[1], [True, False]), now=0.0)
    assert err.value.code == "prompt_not_in_lease"


def test_duplicate_submission_is_rejected_and_never_stored_twice():
    state = BufferState(make_cfg(), make_prompts(8))
    grant = state.lease("a0", 2, now=0.0)
    pid = grant.items[0].prompt_id
    state.submit(grant.lease_id, make_group(pid, [True, False]), now=0.0)
    with pytest.raises(Rejection) as err:
        state.submit(grant.lease_id, make_group(pid, [True, False]), now=0.0)
    assert err.value.code == "duplicate"
    state.submit(grant.lease_id, make_group(grant.items[1].prompt_id, [True, False]), now=0.0)
    with pytest.raises(Rejection) as err:  # after the lease completed too
        state.submit(grant.lease_id, make_group(pid, [True, False]), now=0.0)
    assert err.value.code == "duplicate"
    assert state.counters.groups_received == 2 and len(state.queue) == 2
    assert state.counters.groups_rejected == {"duplicate": 2}


@pytest.mark.parametrize("mutate, code", [
    (lambda g: g.samples.pop(), "wrong_n"),
    (lambda g: setattr(g, "prompt_id", "p_other"), "prompt_not_in_lease"),
    (lambda g: setattr(g.samples[0], "logprobs", g.samples[0].logprobs[:-4]), "invalid_logprobs"),
    (lambda g: setattr(g.samples[1], "n_tokens", 2), "invalid_tokens"),
    (lambda g: setattr(g, "prompt_tokens", b"\x01\x02\x03"), "invalid_prompt_tokens"),
    (lambda g: setattr(g.samples[0], "finish_reason", "abort"), "invalid_finish_reason"),
    (lambda g: setattr(g.samples[0], "reward", math.nan), "invalid_reward"),
])
def test_invalid_groups_are_rejected_by_reason_and_not_stored(mutate, code):
    state = BufferState(make_cfg(), make_prompts(8))
    grant = state.lease("a0", 1, now=0.0)
    group = make_group(grant.items[0].prompt_id, [True, False])
    mutate(group)
    with pytest.raises(Rejection) as err:
        state.submit(grant.lease_id, group, now=0.0)
    assert err.value.code == code
    assert state.counters.groups_rejected == {code: 1} and state.counters.groups_received == 0
    assert sum(s.samples for s in state.stats.values()) == 0 and not state.queue


def test_nan_logprobs_and_future_versions_are_rejected():
    import numpy as np
    from common.schemas import LOGPROB_DTYPE, VERSION_DTYPE

    state = BufferState(make_cfg(), make_prompts(8))
    grant = state.lease("a0", 2, now=0.0)
    g = make_group(grant.items[0].prompt_id, [True, False])
    g.samples[1].logprobs = np.array([-0.1, np.nan, -0.2], dtype=LOGPROB_DTYPE).tobytes()
    with pytest.raises(Rejection, match="logprobs") as err:
        state.submit(grant.lease_id, g, now=0.0)
    assert err.value.code == "invalid_logprobs"
    g = make_group(grant.items[0].prompt_id, [True, False])
    g.samples[0].versions = np.array([0, 0, 2], dtype=VERSION_DTYPE).tobytes()  # policy_version is 0
    with pytest.raises(Rejection) as err:
        state.submit(grant.lease_id, g, now=0.0)
    assert err.value.code == "invalid_versions"


def test_tokens_of_the_version_being_broadcast_are_accepted_before_its_report():
    """The learner broadcasts V, then reports V: between the two an engine may already generate with V.

    With the buffer at version 0, a group whose tokens carry version 1 (installed, not yet reported) is accepted;
    its staleness at the next fetch, once the learner reported 1, is 1 - 1 = 0."""
    state = BufferState(make_cfg(), make_prompts(8))
    grant = state.lease("a0", 1, now=0.0)
    ack = state.submit(grant.lease_id, make_group(grant.items[0].prompt_id, mixed(2), version=1), now=0.0)
    assert ack.accepted and ack.queued
    state.report_version(1)
    batch = state.fetch(1)
    assert [g.group.prompt_id for g in batch.groups] == [grant.items[0].prompt_id]
    assert [g.staleness for g in batch.groups] == [0]
    assert invariant_holds(state)


def test_unknown_lease_and_version_regression():
    state = BufferState(make_cfg(), make_prompts(8))
    with pytest.raises(Rejection) as err:
        state.submit(99, make_group("p0", [True]), now=0.0)
    assert err.value.code == "unknown_lease"
    state.report_version(3)
    with pytest.raises(Rejection) as err:
        state.report_version(2)
    assert err.value.code == "version_regression"


def test_stats_half_life_forgets_old_responses():
    state = BufferState(make_cfg(algo={"stats_half_life": 2.0}), make_prompts(4))
    grant = state.lease("a0", 1, now=0.0)
    pid = grant.items[0].prompt_id
    state.submit(grant.lease_id, make_group(pid, [True, False]), now=0.0)
    # decay d = 0.5**(1/2) = 0.7071: G = (0*d + 1)*d + 1 = 1.7071; k = (0*d + 1)*d + 0 = 0.7071.
    assert state.stats[pid].samples == pytest.approx(1.7071, abs=1e-4)
    assert state.stats[pid].correct == pytest.approx(0.7071, abs=1e-4)
    assert state.stats[pid].total_samples == 2


def test_snapshot_round_trip_returns_in_flight_leases_to_pool():
    state = BufferState(make_cfg(algo={"max_staleness": 100}), make_prompts(8))
    done = state.lease("a0", 2, now=0.0)
    for it in done.items:
        state.submit(done.lease_id, make_group(it.prompt_id, mixed(it.n)), now=0.0)
    open_lease = state.lease("a1", 2, now=0.0)
    state.report_version(1)
    restored = BufferState.from_snapshot(decode_snapshot(encode_snapshot(state.to_snapshot(123.0))),
                                         state.cfg, make_prompts(8))
    assert restored.policy_version == 1 and len(restored.queue) == 2 and restored.in_flight == 0
    assert restored.stats_dict(0.0)["groups_received"] == 2
    assert [it.prompt_id for it in list(restored.pending)[:2]] == [it.prompt_id for it in open_lease.items]
    with pytest.raises(Rejection) as err:  # the old lease is gone for good
        restored.submit(open_lease.lease_id, make_group(open_lease.items[0].prompt_id, [True, False]), now=0.0)
    assert err.value.code == "restart_lease"
    new = restored.lease("a1", 2, now=0.0)
    assert new.lease_id > open_lease.lease_id
    assert [it.prompt_id for it in new.items] == [it.prompt_id for it in open_lease.items]
    assert [g.group.prompt_id for g in restored.fetch(2).groups] == [it.prompt_id for it in done.items]
    assert invariant_holds(restored)


def test_inspect_prompt_rows_sorted_by_priority():
    state = BufferState(make_cfg(), make_prompts(3))
    state.stats["p0"].samples, state.stats["p0"].correct = 8.0, 4.0  # var 4*4/(8*7) = 0.2857
    state.stats["p1"].samples, state.stats["p1"].correct = 8.0, 8.0  # mastered -> floor 0.01
    rows = state.inspect("prompts", 0, now=0.0)
    assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2"]  # p2 unknown: priority -1
    assert rows[0]["variance"] == pytest.approx(0.2857, abs=1e-4) and rows[0]["success"] == 0.5
    assert rows[2]["priority"] == -1 and len(state.inspect("prompts", 2, now=0.0)) == 2
    with pytest.raises(Rejection):
        state.inspect("nonsense", 0, now=0.0)


def test_fast_group_check_agrees_with_validate_sample():
    """The one-pass group check must accept exactly the groups whose every sample passes validate_sample."""
    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from buffer.state import _INVALID, _fast_min_version
    from common.schemas import LOGPROB_DTYPE, VERSION_DTYPE, validate_sample

    special = st.sampled_from([-0.5, 0.0, 1e-5, 0.5, -np.inf, np.inf, np.nan])
    sample = st.tuples(st.integers(0, 4), st.lists(special, min_size=4, max_size=4),
                       st.lists(st.integers(-1, 4), min_size=4, max_size=4),
                       st.sampled_from(["stop", "length", "abort", "eos"]), st.sampled_from([0.0, 1.0, np.nan]),
                       st.integers(-1, 1))

    @settings(max_examples=120, deadline=None)
    @given(st.lists(sample, min_size=1, max_size=3), st.integers(0, 3))
    def check(specs, max_version):
        samples = []
        for n, lps, vs, reason, reward, skew in specs:
            s = make_sample(range(n), [-0.1] * n, [0] * n, reward=reward, correct=True, finish_reason=reason)
            s.logprobs = np.array(lps[:n], LOGPROB_DTYPE).tobytes()
            s.versions = np.array(vs[: max(0, n + skew)], VERSION_DTYPE).tobytes()  # skew: wrong length
            samples.append(s)
        group = Group(prompt_id="p", prompt_tokens=b"", samples=samples)
        valid = all(validate_sample(s, max_version) is None for s in samples)
        assert (_fast_min_version(group, max_version) is not _INVALID) == valid

    check()


def test_epoch_priority_refresh_uses_stats_frozen_at_epoch_start():
    cfg = make_cfg(algo={"allocation_mode": "reference", "n_mean": 4, "n_min": 2, "n_max": 6, "initial_budget": 2,
                         "max_staleness": 100, "priority_refresh": "epoch"})
    state = BufferState(cfg, make_prompts(4))
    for pid, k in {"p0": 4, "p1": 8, "p2": 2, "p3": 0}.items():  # known mid-epoch, but epoch 0 saw nothing
        state.stats[pid].samples, state.stats[pid].correct = 8.0, float(k)
    epoch0 = state.lease("a0", 4, now=0.0)
    # Frozen stats of epoch 0 are all (0, 0): exploration 2 each + round-robin -> uniform 4s, as in the paper.
    assert [it.n for it in epoch0.items] == [4, 4, 4, 4]
    epoch1 = state.lease("a0", 4, now=0.0)
    n = {it.prompt_id: it.n for it in epoch1.items}
    assert state.epoch == 1 and n == {"p0": 6, "p1": 2, "p2": 6, "p3": 2}  # now priority-driven


def test_rollback_after_resume_drops_groups_from_discarded_versions():
    # A learner resumed from its version-1 checkpoint while the buffer already saw version 3: the queued group
    # sampled at version 1 stays, the one sampled at version 2 (weights that no longer exist) is dropped.
    state = BufferState(make_cfg(algo={"max_staleness": 3}, learner={"groups_per_step": 2}), make_prompts(8))
    grant = state.lease("a0", 2, now=0.0)
    a, b = [it.prompt_id for it in grant.items]
    state.report_version(3)
    state.submit(grant.lease_id, make_group(a, [True, False], version=1), now=0.0)
    state.submit(grant.lease_id, make_group(b, [True, False], version=2), now=0.0)
    state.report_version(1, rollback=True)
    assert state.policy_version == 1
    assert [q.group.prompt_id for q in state.queue] == [a]
    assert state.counters.groups_dropped_rollback == 1
    assert invariant_holds(state)


def test_rollback_frees_the_admission_window_of_discarded_steps():
    # groups_per_step 2, max_staleness 0: one batch per version. Serve versions 0..2 (6 groups), then the learner
    # resumes at version 1: the 4 groups served to steps 2 and 3 (versions 1->2, 2->3) are discarded, so the window
    # (1 + 0 + 1) * 2 = 4 minus the 2 still-counted served groups leaves room for exactly 2 prompts.
    state = BufferState(make_cfg(algo={"max_staleness": 0}, learner={"groups_per_step": 2}), make_prompts(8))
    for version in range(3):
        grant = state.lease("a0", 2, now=0.0)
        for it in grant.items:
            state.submit(grant.lease_id, make_group(it.prompt_id, mixed(it.n), version=version), now=0.0)
        assert len(state.fetch(2).groups) == 2
        state.report_version(version + 1)
    assert state.admission_room() == 2  # (3 + 1) * 2 - 6 served
    state.report_version(1, rollback=True)
    assert state.counters.groups_served_discarded == 4
    assert state.admission_room() == 2  # (1 + 1) * 2 - (6 - 4): without the discard it would be -2: no leases
    assert len(state.lease("a0", 5, now=0.0).items) == 2


def test_groups_served_after_the_snapshot_are_not_served_again_after_a_restore():
    """The buffer is killed after serving groups it had queued at its last snapshot; the restored queue holds them
    again. The learner's fetch says which arrivals it has consumed: those are not served a second time, and they
    count as served (which they were), so received = served + dropped + zero-variance + queued still holds."""
    state = BufferState(make_cfg(algo={"max_staleness": 100}), make_prompts(8))
    grant = state.lease("a0", 3, now=0.0)
    for it in grant.items:
        state.submit(grant.lease_id, make_group(it.prompt_id, mixed(it.n)), now=0.0)
    snap = encode_snapshot(state.to_snapshot(0.0))
    first = state.fetch(2)  # served, then the buffer dies before its next snapshot
    consumed = max(g.arrival for g in first.groups)
    restored = BufferState.from_snapshot(decode_snapshot(snap), state.cfg, make_prompts(8))
    assert len(restored.queue) == 3
    assert restored.fetch_would_wait(2, after_arrival=consumed)  # 1 group left: not enough for 2
    batch = restored.fetch(1, after_arrival=consumed)
    assert [g.group.prompt_id for g in batch.groups] == [grant.items[2].prompt_id]
    assert restored.counters.groups_served == 3 and restored.counters.groups_served_before_restore == 2
    assert invariant_holds(restored)
    # arrivals of the new incarnation sort after every arrival the old one handed out
    more = restored.lease("a0", 1, now=0.0)
    restored.submit(more.lease_id, make_group(more.items[0].prompt_id, mixed(more.items[0].n)), now=0.0)
    assert restored.queue[-1].arrival > consumed
    assert restored.fetch(1, after_arrival=consumed).groups[0].group.prompt_id == more.items[0].prompt_id
