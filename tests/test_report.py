"""The run report (common/report.py): series derived from metrics.jsonl records, worked by hand, and the picture
drawn from a recorded tiny run (tests/data/tiny_run) with a buffer snapshot written by the buffer's own code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.config import PRESETS
from common.report import (break_gaps, build_figure, informative_yield, load_run, samples_at, samples_rate,
                           write_report)

DATA = Path(__file__).parent / "data" / "tiny_run"


@pytest.mark.unit
def test_informative_yield_per_interval():
    buffer = [{"time": 0.0, "buffer/groups_received": 0, "buffer/groups_zero_variance": 0},
              {"time": 5.0, "buffer/groups_received": 10, "buffer/groups_zero_variance": 6},
              {"time": 10.0, "buffer/groups_received": 10, "buffer/groups_zero_variance": 6},  # no new groups
              {"time": 15.0, "buffer/groups_received": 30, "buffer/groups_zero_variance": 11}]
    t, y = informative_yield(buffer)
    # 0-5 s: 10 groups, 6 zero-variance -> 4/10 = 0.4; 10-15 s: 20 groups, 5 zero-variance -> 15/20 = 0.75
    assert t.tolist() == [5.0, 15.0]
    assert y.tolist() == pytest.approx([0.4, 0.75])


@pytest.mark.unit
def test_samples_at_interpolates_the_buffer_counter():
    buffer = [{"time": 10.0, "buffer/samples_received": 100}, {"time": 20.0, "buffer/samples_received": 300}]
    # 5 s: before the first record -> 0; 15 s: halfway 100..300 -> 200; 25 s: after the last -> 300
    assert samples_at(buffer, np.array([5.0, 15.0, 25.0])).tolist() == pytest.approx([0.0, 200.0, 300.0])
    assert samples_at([], np.array([1.0])) is None


@pytest.mark.unit
def test_samples_rate_skips_records_under_a_second_apart():
    buffer = [{"time": t, "buffer/samples_received": s} for t, s in ((0, 0), (5, 100), (10, 400), (10.2, 400))]
    t, r = samples_rate(buffer)
    # 100 / 5 s = 20; 300 / 5 s = 60; the 0.2 s interval at shutdown is left out
    assert t.tolist() == [5.0, 10.0] and r.tolist() == pytest.approx([20.0, 60.0])


def _recorded_run(tmp_path: Path) -> Path:
    """The recorded tiny run's metrics.jsonl plus a snapshot holding its staleness counts and allocations."""
    from buffer.state import BufferState, PromptRecord, encode_snapshot

    run = tmp_path / "tiny"
    run.mkdir()
    shutil.copy(DATA / "metrics.jsonl", run / "metrics.jsonl")
    recorded = json.loads((DATA / "buffer_state.json").read_text())
    state = BufferState(PRESETS["tiny"](), [PromptRecord(pid, "", "") for pid in recorded["allocations"]])
    for pid, allocations in recorded["allocations"].items():
        state.stats[pid].allocations = list(allocations)
    state.counters.staleness_hist.update({int(k): v for k, v in recorded["staleness_hist"].items()})
    (run / "buffer_snapshot.msgpack").write_bytes(encode_snapshot(state.to_snapshot(0.0)))
    return run


def _panels(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes}


def _says_no_data(ax) -> bool:
    return any(t.get_text().startswith("no data") for t in ax.texts)


@pytest.mark.integration
def test_report_of_a_recorded_tiny_run_fills_every_panel(tmp_path):
    run = _recorded_run(tmp_path)
    data = load_run(run)
    assert data.snapshot_note == ""
    assert data.staleness_hist == {0: 15, 1: 30, 2: 75}
    assert len(data.allocations) == 432 and min(data.allocations) == 4 and max(data.allocations) == 12
    fig = build_figure(data)
    panels = _panels(fig)
    assert len(panels) == 9
    assert [title for title, ax in panels.items() if _says_no_data(ax)] == []
    for ax in panels.values():  # every panel explains itself
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    stale = panels["Staleness of served groups"]
    assert [p.get_height() for p in stale.patches] == [15, 30, 75]
    alloc = panels["Rollout allocation per prompt (n_i)"]
    assert sum(p.get_height() for p in alloc.patches) == 432
    # The last learner step (46.7 s) lies between buffer records of 2955 (45.6 s) and 3442 samples (50.8 s).
    reward_vs_samples = panels["Reward and held-out accuracy vs generated samples"].get_lines()[0].get_xdata()
    assert 2955 < reward_vs_samples[-1] < 3442 and reward_vs_samples[0] > 0
    out = write_report(run)
    assert out == run / "report.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_report_of_an_empty_run_says_no_data_in_every_panel(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    data = load_run(tmp_path)
    assert data.snapshot_note == "no buffer_snapshot.msgpack"
    panels = _panels(build_figure(data))
    assert len(panels) == 9 and all(_says_no_data(ax) for ax in panels.values())


@pytest.mark.integration
def test_report_names_an_unreadable_snapshot(tmp_path):
    shutil.copy(DATA / "metrics.jsonl", tmp_path / "metrics.jsonl")
    (tmp_path / "buffer_snapshot.msgpack").write_bytes(b"not a snapshot")
    data = load_run(tmp_path)
    assert data.snapshot_note.startswith("buffer_snapshot.msgpack unreadable: buffer.inspect exited")
    panels = _panels(build_figure(data))
    assert _says_no_data(panels["Staleness of served groups"])
    assert not _says_no_data(panels["Reward and held-out accuracy vs learner steps"])


@pytest.mark.unit
def test_break_gaps_cuts_lines_where_the_run_was_stopped():
    t = np.array([0.0, 5.0, 10.0, 200.0, 205.0])
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # gaps 5, 5, 190, 5: median 5 -> a pause is a gap over max(60 s, 10 x 5 s) = 60 s; one NaN at its middle
    t2, y2 = break_gaps(t, y)
    assert t2.tolist() == [0.0, 5.0, 10.0, 105.0, 200.0, 205.0]
    assert np.isnan(y2[3]) and y2[[0, 1, 2, 4, 5]].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    steady = np.arange(0.0, 50.0, 5.0)
    assert break_gaps(steady, steady)[0].tolist() == steady.tolist()
