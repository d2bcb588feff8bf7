"""Pre-rollout prompt skipping (ALGORITHM §8): the skip rule, revisits, the adaptive exploration probability,
never-starve, persistence, "off changes nothing", and the real buffer process skipping solved prompts.
Expected numbers are worked by hand in the comments."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from buffer import skipping
from buffer.state import (_SNAPSHOT_HEADER, SNAPSHOT_MAGIC, BufferState, _snapshot_digest, decode_snapshot,
                          encode_snapshot)
from tests.test_buffer_state import make_cfg, make_group, make_prompts, mixed

SKIP_ON = {"prompt_skipping": True, "max_staleness": 1000}


def with_streak(state: BufferState, streaks: dict[str, int]) -> None:
    for pid, z in streaks.items():
        state.stats[pid].zero_variance_streak = z


def leased_ids(state: BufferState, leases: int, m: int) -> list[tuple[str, int]]:
    out = []
    for i in range(leases):
        out += [(it.prompt_id, it.n) for it in state.lease(f"a{i}", m, now=0.0).items]
    return out


@pytest.mark.unit
def test_explore_probability_and_revisits_grow_with_each_skip():
    # p_explore 0.5, z = 3 zero-variance groups in a row: q = 0.5^(3 - s).
    assert skipping.explore_probability(0.5, 3, 0) == 0.125
    assert skipping.explore_probability(0.5, 3, 1) == 0.25
    assert skipping.explore_probability(0.5, 3, 2) == 0.5
    assert skipping.explore_probability(0.5, 3, 3) == 1.0  # skipped z times: certain revisit
    assert skipping.explore_probability(0.5, 3, 7) == 1.0
    assert skipping.explore_probability(0.05, 0, 0) == 1.0  # an informative (or new) prompt is never skipped


@pytest.mark.unit
def test_streak_prompt_is_skipped_with_the_computed_probability():
    cfg = make_cfg(algo=SKIP_ON, buffer={"wave_size": 400})
    state = BufferState(cfg, make_prompts(400))
    with_streak(state, {f"p{i}": 2 for i in range(400)})
    # q = 0.5^2 = 0.25: exactly the prompts whose seeded draw lies below 0.25 enter the wave.
    expected = {f"p{i}" for i in range(400) if skipping.decision_draw(cfg.buffer.seed, 0, f"p{i}") < 0.25}
    assert 100 - 3 * 8.67 < len(expected) < 100 + 3 * 8.67  # Binomial(400, 0.25): mean 100, sd 8.66
    grant = state.lease("a0", len(expected), now=0.0)  # the whole first wave: it ends with epoch 0
    assert {it.prompt_id for it in grant.items} == expected and not state.pending
    s = state.stats_dict(0.0)
    assert s["prompts_skipped"] == 400 - len(expected) and s["prompts_revisited"] == len(expected)
    skipped = next(pid for pid in state.prompts if pid not in expected)
    assert state.stats[skipped].skips_in_row == 1 and state.stats[skipped].skips == 1
    row = next(r for r in state.prompt_rows() if r["prompt_id"] == skipped)
    assert row["skip_probability"] == 0.5  # next visit: 1 - 0.5^(2 - 1)


@pytest.mark.unit
def test_skipped_prompt_comes_back_and_a_rollout_resets_its_state():
    cfg = make_cfg(algo=SKIP_ON, buffer={"wave_size": 4})
    state = BufferState(cfg, make_prompts(4))
    with_streak(state, {"p0": 1, "p1": 1, "p2": 1, "p3": 1})
    seen = []
    for _ in range(3):  # z = 1: skipped at most once in a row, so every prompt is leased within two epochs
        seen += [pid for pid, _ in leased_ids(state, 1, 4)]
    assert set(seen) == {"p0", "p1", "p2", "p3"}
    lease = state.lease("b", 1, now=0.0)
    pid = lease.items[0].prompt_id
    state.submit(lease.lease_id, make_group(pid, mixed(lease.items[0].n)), now=0.0)
    assert (state.stats[pid].zero_variance_streak, state.stats[pid].skips_in_row) == (0, 0)


@pytest.mark.unit
def test_adaptive_explore_probability_moves_toward_the_target():
    # target 0.75, step 0.02, p 0.5: a zero-variance group gives 0.5 + 0.02 * (0 - 0.75) = 0.485,
    # an informative one 0.485 + 0.02 * (1 - 0.75) = 0.49.
    state = BufferState(make_cfg(algo=SKIP_ON), make_prompts(8))
    grant = state.lease("a0", 2, now=0.0)
    a, b = grant.items
    state.submit(grant.lease_id, make_group(a.prompt_id, [True] * a.n), now=0.0)
    assert state.stats_dict(0.0)["skip_explore_probability"] == pytest.approx(0.485)
    assert state.stats_dict(0.0)["skip_probability"] == pytest.approx(0.515)
    state.submit(grant.lease_id, make_group(b.prompt_id, mixed(b.n)), now=0.0)
    assert state.stats_dict(0.0)["skip_explore_probability"] == pytest.approx(0.49)
    assert skipping.updated_explore(0.05, False, 0.75, 0.02, 0.05, 1.0) == 0.05  # held at the lower bound
    assert skipping.updated_explore(0.999, True, 0.75, 0.02, 0.05, 1.0) == 1.0  # and at the upper one


@pytest.mark.unit
def test_never_starve_when_every_prompt_of_an_epoch_is_skipped():
    state = BufferState(make_cfg(algo=SKIP_ON), make_prompts(4))
    with_streak(state, {f"p{i}": 40 for i in range(4)})  # q = 0.5^40 ~ 1e-12: every draw says skip
    grant = state.lease("a0", 4, now=0.0)
    assert sorted(it.prompt_id for it in grant.items) == ["p0", "p1", "p2", "p3"]
    s = state.stats_dict(0.0)
    assert (s["prompts_skipped"], s["prompts_forced"]) == (4, 4)


@pytest.mark.unit
def test_snapshot_round_trip_keeps_skip_state_and_decisions():
    cfg = make_cfg(algo=SKIP_ON, buffer={"wave_size": 4})
    state = BufferState(cfg, make_prompts(12))
    with_streak(state, {f"p{i}": 1 + i % 3 for i in range(12)})
    grant = state.lease("a0", 2, now=0.0)
    for it in grant.items:
        state.submit(grant.lease_id, make_group(it.prompt_id, [False] * it.n), now=0.0)
    restored = BufferState.from_snapshot(decode_snapshot(encode_snapshot(state.to_snapshot(1.0))), cfg,
                                         make_prompts(12))
    for pid, s in state.stats.items():
        r = restored.stats[pid]
        assert (r.zero_variance_streak, r.skips_in_row, r.skips, r.last_wave) == \
               (s.zero_variance_streak, s.skips_in_row, s.skips, s.last_wave), pid
    assert restored.skip == state.skip and restored.skip.p_explore == pytest.approx(0.47)  # 0.5 - 2 * 0.015
    for key in ("prompts_skipped", "prompts_revisited", "prompts_forced"):
        assert restored.stats_dict(0.0)[key] == state.stats_dict(0.0)[key]
    assert leased_ids(restored, 6, 2) == leased_ids(state, 6, 2)  # same decisions after the restart


@pytest.mark.unit
def test_previous_snapshot_format_still_loads_without_skip_state():
    state = BufferState(make_cfg(), make_prompts(4))
    leased_ids(state, 1, 2)
    payload = msgspec.to_builtins(state.to_snapshot(1.0))
    payload["format"] = 2
    del payload["skip"]
    for stats in payload["stats"].values():
        for key in ("zero_variance_streak", "skips_in_row", "skips", "last_wave"):
            del stats[key]
    body = msgspec.msgpack.encode(payload)
    data = _SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, 2, len(body), _snapshot_digest(2, body)) + body
    restored = BufferState.from_snapshot(decode_snapshot(data), make_cfg(algo=SKIP_ON), make_prompts(4))
    assert restored.skip.p_explore == 0.5 and restored.stats["p0"].zero_variance_streak == 0
    assert restored.counters.prompts_leased == 2


def reference_lease_sequence(seed: int, n_prompts: int, leases: int, m: int) -> list[str]:
    """The leasing order without skipping: epoch e is the sorted ids shuffled by Random(seed*1_000_003 + e), taken
    m at a time; a prompt repeated inside one lease (across an epoch boundary) waits at the front for the next."""
    stream: list[str] = []
    for epoch in range(leases * m // n_prompts + 2):
        order = sorted(f"p{i}" for i in range(n_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        stream += order
    out: list[str] = []
    for _ in range(leases):
        taken, stream = stream[:m], stream[m:]
        lease = [pid for i, pid in enumerate(taken) if pid not in taken[:i]]
        stream = [pid for i, pid in enumerate(taken) if pid in taken[:i]] + stream
        out += lease
    return out


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["uniform", "reference", "neyman"])
def test_off_leases_exactly_as_without_skipping(mode):
    algo = {"allocation_mode": mode, "max_staleness": 1000}
    off = BufferState(make_cfg(algo=algo), make_prompts(10))
    on_fresh = BufferState(make_cfg(algo={**algo, "prompt_skipping": True}), make_prompts(10))
    with_streak(off, {f"p{i}": 5 for i in range(10)})  # history that skipping would act on
    got = leased_ids(off, 10, 3)
    assert [pid for pid, _ in got] == reference_lease_sequence(0, 10, 10, 3)
    assert got == leased_ids(on_fresh, 10, 3)  # on, without zero-variance history: nothing is skipped
    assert off.stats_dict(0.0)["prompts_skipped"] == 0


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["uniform", "reference", "neyman"])
def test_skipping_composes_with_every_allocation_mode(mode):
    cfg = make_cfg(algo={**SKIP_ON, "allocation_mode": mode, "n_mean": 2, "n_min": 1, "n_max": 4},
                   buffer={"wave_size": 8})
    state = BufferState(cfg, make_prompts(8))
    with_streak(state, {f"p{i}": 3 for i in range(4)})
    grant = state.lease("a0", 8, now=0.0)
    kept = len(grant.items)
    assert 4 <= kept < 8  # p4..p7 always; p0..p3 each with q = 0.125
    assert sum(it.n for it in grant.items) == 2 * kept  # the wave's budget is n_mean per prompt that entered


# ---------------------------------------------------------------------------------------------- real process


def submit_round(client, easy: set[str], leased: dict[str, int]) -> None:
    from tests.test_buffer_process import mixed_group

    grant = client.lease("a0", 4)
    assert grant.items, grant.wait_reason
    groups = []
    for it in grant.items:
        leased[it.prompt_id] = leased.get(it.prompt_id, 0) + 1
        group = mixed_group(it.prompt_id, it.n)
        if it.prompt_id in easy:  # all correct: zero variance
            group = msgspec.structs.replace(group, samples=[msgspec.structs.replace(s, reward=1.0, correct=True)
                                                            for s in group.samples])
        groups.append(group)
    client.submit_many(grant.lease_id, groups)
    if client.stats()["queue_depth"] >= 8:
        client.fetch("learner", 8)


@pytest.mark.integration
def test_buffer_process_skips_solved_prompts_and_yield_rises(tmp_path: Path):
    from buffer.client import BufferClient
    from tests.test_buffer_process import server_process

    easy = {f"p{i}" for i in range(8)}
    with server_process(tmp_path, "--algo.prompt-skipping", "--algo.max-staleness", "100000",
                        "--buffer.yield-window-groups", "16", n_prompts=16) as (_, address, _):
        with BufferClient(address, timeout_s=10) as client:
            first: dict[str, int] = {}
            for _ in range(4):  # epoch 0: no history, all 16 prompts leased once
                submit_round(client, easy, first)
            assert sorted(first.values()) == [1] * 16
            before = client.stats()
            assert before["informative_yield"] == 0.5  # 8 of 16 groups had variance
            later: dict[str, int] = {}
            for _ in range(24):
                submit_round(client, easy, later)
            after = client.stats()
    easy_leases = sum(later.get(p, 0) for p in easy)
    hard_leases = sum(n for p, n in later.items() if p not in easy)
    assert easy_leases < hard_leases / 2, later
    assert after["prompts_skipped"] > 0 and after["prompts_revisited"] > 0
    assert after["informative_yield"] > before["informative_yield"]
    assert after["skip_explore_probability"] < 0.5  # the yield stayed below the 0.75 target: skip harder


@pytest.mark.unit
def test_skip_counts_and_probability_reach_the_buffer_metrics():
    from buffer.server import metrics_record

    state = BufferState(make_cfg(algo=SKIP_ON), make_prompts(4))
    with_streak(state, {f"p{i}": 40 for i in range(4)})
    state.lease("a0", 4, now=0.0)
    m = metrics_record(state.stats_dict(0.0), None, 0.0)
    # every prompt skipped, then all four forced; p_explore still 0.5, so a streak-1 prompt is skipped w.p. 0.5
    assert (m["buffer/prompts_skipped"], m["buffer/prompts_forced"], m["buffer/prompts_revisited"]) == (4, 4, 0)
    assert m["buffer/skip_probability"] == 0.5 and m["buffer/revisits_informative"] == 0


@pytest.mark.unit
def test_inspect_shows_skip_state_per_prompt_and_in_the_summary(tmp_path: Path):
    from rich.console import Console

    from buffer import inspect

    state = BufferState(make_cfg(algo=SKIP_ON), make_prompts(4))
    with_streak(state, {"p0": 2})
    rows, stats = state.prompt_rows(), state.stats_dict(0.0)
    p0 = next(r for r in rows if r["prompt_id"] == "p0")
    assert (p0["zero_variance_streak"], p0["skip_probability"], p0["waves_since_seen"]) == (2, 0.75, None)
    console = Console(record=True, width=200)
    console.print(inspect.prompts_table(rows))
    console.print(inspect.summary_table(stats))
    text = console.export_text()
    assert "zv streak" in text and "p skip" in text and "prompts skipped" in text and "skip probability" in text
    fig = inspect.figure(stats, rows)
    assert any("skip" in ax.get_title() for ax in fig.axes)


@pytest.mark.unit
def test_skip_config_is_validated_and_the_cli_flag_turns_it_on():
    from common.config import ConfigError, parse_cli

    assert make_cfg().algo.prompt_skipping is False  # default off
    with pytest.raises(ConfigError, match="algo.skip_explore_min"):
        make_cfg(algo={"skip_explore_min": 0.6, "skip_explore_max": 0.5})
    with pytest.raises(ConfigError, match="algo.skip_explore_init"):
        make_cfg(algo={"skip_explore_init": 0.01})
    with pytest.raises(ConfigError, match="algo.skip_target_yield"):
        make_cfg(algo={"skip_target_yield": 0.0})
    assert parse_cli(["--preset", "tiny", "--algo.prompt-skipping"]).algo.prompt_skipping is True
