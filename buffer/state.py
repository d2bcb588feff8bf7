"""The replay buffer's state machine, free of ZeroMQ so it can be tested directly.

`BufferState` holds everything the buffer knows: the prompt pool with per-prompt statistics (G responses, k correct,
optionally with exponential forgetting), the epoch order, waves of allocated work, live leases, the FIFO queue of
groups waiting for the learner, and counters. The server (`buffer/server.py`) decodes a request, calls one method
here and encodes what it returns; a rejected request raises `Rejection(code, message)`.

Life of a prompt: epoch order -> [skip rule, with algo.prompt_skipping: ALGORITHM §8, `buffer/skipping.py`] ->
wave (n_i from `allocate_rollouts`) -> `pending` -> leased (in flight) ->
submitted group -> queue -> served to the learner (or dropped: zero variance / too stale). An expired or released
lease puts its prompts back at the front of `pending` with the n they were allocated.

Admission control (docs/ALGORITHM.md §5): a lease of m prompts fits only if
    served + queued + in_flight + m <= (policy_version + max_staleness + 1) * groups_per_step,
where `served` counts only groups handed to the learner (dropped groups free their slot, or the learner starves).

Lease ids are `incarnation * 2**31 + n`: every restore from a snapshot starts a new incarnation (persisted at once
by the server), so a lease id handed out after the last snapshot by a buffer that then died is never handed out
again, and a late group for it is refused as an unknown lease.

Only the learner moves `policy_version`: forward by at most `buffer.max_version_jump` per report, backward only
with rollback=True. The informative yield (groups with reward variance / generated groups, over the last
`buffer.yield_window_groups`) is tracked at ingest; below `buffer.low_yield_threshold` on a full window the stats
carry a one-sentence `low_yield_warning`, logged once per episode.

A snapshot file is a header (magic, format, payload length, SHA-256 of format + length + payload) followed by the
MessagePack payload: `decode_snapshot` refuses any file whose header or checksum does not match, naming it.

Held-out evaluation (`buffer/evaluation.py`, `self.evals`): a version report posts the job due at that version; a
lease request gets an evaluation lease instead of training work within run.eval_share of the granted sequences (or
when training work would wait, as it always does once the policy version reached learner.total_steps); evaluation
leases share the lease id space and expiry, and the snapshot keeps the finished and pending versions.

Time is passed in explicitly (`now`, monotonic seconds) so tests can drive expiry without sleeping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgspec
import numpy as np
from buffer import skipping
from buffer.evaluation import EvalJobs, EvalSnapshot
from buffer.prompts import PromptRecord
from buffer.rejection import Rejection
from buffer.skipping import SkipController
from common.config import Config, config_from_dict, config_to_dict
from common.schemas import (
    FINISH_REASONS,
    LOGPROB_DTYPE,
    VERSION_DTYPE,
    Batch,
    EvalResult,
    Group,
    LeaseGrant,
    ServedGroup,
    SubmitAck,
    WireError,
    INT32_MAX,
    WorkItem,
    validate_sample,
)

log = logging.getLogger("buffer")

SNAPSHOT_FORMAT = 3
SNAPSHOT_FORMATS_READ = (2, 3)
"""Format 2 lacks the skipping state (per-prompt streaks, the controller): it loads with those at their start."""
SNAPSHOT_MAGIC = b"DYNAMO-RL-BUFFER"
_SNAPSHOT_HEADER = struct.Struct("<16sIQ32s")  # magic, format, payload length, sha256(format, length, payload)
LEASE_SEQ_LIMIT = 2**31
"""Lease ids of one incarnation: incarnation * LEASE_SEQ_LIMIT + [1, LEASE_SEQ_LIMIT)."""
MAX_INCARNATION = 2**32 - 1
"""Keeps every lease id below 2**63 (the wire's int64)."""
ALLOCATION_HISTORY = 16
"""Recent allocations remembered per prompt (for inspection)."""
RETIRED_LEASES_KEPT = 16384
"""Finished/expired lease ids remembered so that late or duplicate submissions get a precise rejection."""


class PromptStats(msgspec.Struct, kw_only=True):
    """Per-prompt statistics. `samples`/`correct` are G/k (decayed when algo.stats_half_life > 0)."""

    samples: float = 0.0
    correct: float = 0.0
    total_samples: int = 0
    total_correct: int = 0
    leases: int = 0
    allocations: list[int] = msgspec.field(default_factory=list)
    zero_variance_streak: int = 0
    """Groups in a row, most recent last, whose rewards were all equal (prompt skipping, ALGORITHM §8)."""
    skips_in_row: int = 0
    """Times the prompt was skipped since its last rollout."""
    skips: int = 0
    """Times the prompt was skipped in all."""
    last_wave: int = -1
    """Index of the last wave the prompt entered (-1: never); with waves_allocated it says when it was last seen."""


class PendingItem(msgspec.Struct, array_like=True):
    prompt_id: str
    n: int


class QueuedGroup(msgspec.Struct, array_like=True):
    group: Group
    arrival: int
    min_version: int


class RetiredLease(msgspec.Struct, array_like=True):
    reason: str  # completed | expired | released | restart
    done: list[str]


class Counters(msgspec.Struct, kw_only=True):
    """Monotone counters (persisted). Stats replies add the gauges (queue_depth, in_flight, ...)."""

    leases_granted: int = 0
    leases_expired: int = 0
    leases_released: int = 0
    lease_waits: dict[str, int] = msgspec.field(default_factory=dict)
    prompts_leased: int = 0
    prompts_returned: int = 0
    waves_allocated: int = 0
    groups_received: int = 0
    groups_rejected: dict[str, int] = msgspec.field(default_factory=dict)
    groups_zero_variance: int = 0
    groups_dropped_stale: int = 0
    groups_dropped_rollback: int = 0
    groups_served_before_restore: int = 0
    """Restored-queue groups the learner had already consumed before the restart (also counted in groups_served)."""
    groups_served: int = 0
    groups_served_discarded: int = 0
    """Served groups whose training steps a learner rollback discarded; admission control stops counting them."""
    samples_received: int = 0
    staleness_hist: dict[int, int] = msgspec.field(default_factory=dict)
    messages_bad: int = 0
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    snapshot_failures: int = 0
    replay_evictions: int = 0
    """Replay-cache entries (last lease/fetch answer of a client) forgotten to stay within buffer.max_clients."""
    clients_evicted: int = 0
    """Registered clients forgotten to stay within buffer.max_clients."""
    prompts_skipped: int = 0
    """Prompts left out of a wave by prompt skipping."""
    prompts_revisited: int = 0
    """Prompts with a zero-variance streak that prompt skipping let into a wave."""
    prompts_forced: int = 0
    """Prompts leased although skipped, because every prompt of their epoch was skipped."""
    revisits_informative: int = 0
    """Groups with reward variance from prompts that had a zero-variance streak (a revisit that paid off)."""


class Snapshot(msgspec.Struct, kw_only=True):
    """Everything that survives a restart. Leases in flight at snapshot time are already folded into `pending`."""

    format: int = SNAPSHOT_FORMAT
    config_json: str
    saved_at: float
    policy_version: int
    epoch: int
    epoch_order: list[str]
    epoch_pos: int
    pending: list[PendingItem]
    stats: dict[str, PromptStats]
    epoch_stats: dict[str, tuple[float, float]]
    counters: Counters
    queue: list[QueuedGroup]
    retired: dict[int, RetiredLease]
    next_lease_id: int
    next_arrival: int
    incarnation: int = 1
    skip: SkipController | None = None
    """Prompt skipping's controller (None in format 2: started from the config)."""
    evaluation: EvalSnapshot | None = None
    """Held-out evaluation: finished and pending versions (None in older snapshots: nothing finished)."""


class SnapshotError(ValueError):
    """A snapshot file that must not be loaded (not a snapshot, unsupported format, truncated, corrupt)."""


@dataclass
class Lease:
    lease_id: int
    actor_id: str
    open: dict[str, int]  # prompt_id -> n, not yet submitted
    deadline: float
    policy_version: int
    done: list[str] = field(default_factory=list)


def _bump(counts: dict, key: Any, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by


def _allocation_module() -> Any:
    # Imported lazily: allocation.py is a separate module with its own owner and tests.
    from buffer import allocation

    return allocation


class BufferState:
    def __init__(self, cfg: Config, prompts: Iterable[PromptRecord], *, now: float = 0.0,
                 eval_prompts: Iterable[PromptRecord] = ()):
        self.cfg = cfg
        self.prompts: dict[str, PromptRecord] = {}
        for p in prompts:
            if p.prompt_id in self.prompts:
                raise ValueError(f"prompts: duplicate prompt_id {p.prompt_id!r}")
            self.prompts[p.prompt_id] = p
        if not self.prompts:
            raise ValueError("prompts: the prompt pool is empty")
        self.stats: dict[str, PromptStats] = {pid: PromptStats() for pid in self.prompts}
        self.policy_version = 0
        self.epoch = 0
        self.epoch_order: list[str] = self._shuffled(0)
        self.epoch_pos = 0
        self.epoch_stats: dict[str, tuple[float, float]] = {pid: (0.0, 0.0) for pid in self.prompts}
        self.pending: deque[PendingItem] = deque()
        self.leases: OrderedDict[int, Lease] = OrderedDict()
        self.retired: OrderedDict[int, RetiredLease] = OrderedDict()
        self.queue: deque[QueuedGroup] = deque()
        self.counters = Counters()
        self.clients: OrderedDict[tuple[str, str], None] = OrderedDict()  # (role, client_id), least recent first
        self.incarnation = 1
        self.next_lease_id = 1
        self.next_arrival = 0
        self.started_at = now
        self.yield_window: deque[tuple[int, int, int]] = deque()  # (informative, samples, all correct) per group
        self._yield_sums = [0, 0, 0, 0]  # informative groups, samples, informative samples, all-correct groups
        self.low_yield_warning = ""
        self.skip = SkipController(p_explore=cfg.algo.skip_explore_init)
        self.evals = EvalJobs(cfg, eval_prompts)
        """Held-out evaluation jobs (buffer/evaluation.py): their leases share the id space of training leases."""

    # ------------------------------------------------------------------------------------------- gauges

    @property
    def in_flight(self) -> int:
        return sum(len(lease.open) for lease in self.leases.values())

    def admission_room(self) -> int:
        """Prompts that may still be leased before some group could exceed max_staleness (docs/ALGORITHM.md §5)."""
        limit = (self.policy_version + self.cfg.algo.max_staleness + 1) * self.cfg.learner.groups_per_step
        served = self.counters.groups_served - self.counters.groups_served_discarded
        return limit - (served + len(self.queue) + self.in_flight)

    # ------------------------------------------------------------------------------------------- requests

    def register(self, role: str, client_id: str) -> int:
        """Remember a client (the least recently registered is forgotten beyond buffer.max_clients)."""
        key = (role, client_id)
        self.clients[key] = None
        self.clients.move_to_end(key)
        while len(self.clients) > self.cfg.buffer.max_clients:
            self.clients.popitem(last=False)
            self.counters.clients_evicted += 1
        return self.policy_version

    def _lease_wait_reason(self) -> str | None:
        """Why a lease now would grant nothing (`training_done`, `backpressure`, `staleness`), or None if it would grant
        work. Once the learner has published its last version (learner.total_steps) no group would ever be trained on:
        the actors get only the final held-out evaluation, at the whole engine's capacity."""
        if self.policy_version >= self.cfg.learner.total_steps:
            return "training_done"
        if len(self.queue) >= self.cfg.buffer.max_queued_groups:
            return "backpressure"
        return "staleness" if self.admission_room() <= 0 else None

    def lease_would_wait(self, max_prompts: int) -> bool:
        """Whether lease() would now answer "wait" (not a grant, and not a rejection of a bad request)."""
        return max_prompts >= 1 and self._lease_wait_reason() is not None and not self.evals.has_work()

    def fetch_would_wait(self, n_groups: int, after_arrival: int = -1) -> bool:
        """Whether fetch() would now answer an empty batch for lack of groups (not a rejection of a bad size)."""
        self._forget_consumed(after_arrival)
        return self._valid_fetch_size(n_groups) and len(self.queue) < n_groups

    def _forget_consumed(self, after_arrival: int) -> None:
        """Drop queued groups with arrival <= after_arrival: the learner consumed them already. Only a queue restored
        from a snapshot holds such groups (the buffer served them after the snapshot, then was killed); they were
        served, so they count as served. Arrivals grow across restarts, so a new group never matches."""
        while self.queue and self.queue[0].arrival <= after_arrival:
            self.queue.popleft()
            self.counters.groups_served += 1
            self.counters.groups_served_before_restore += 1

    def _valid_fetch_size(self, n_groups: int) -> bool:
        return 1 <= n_groups <= self.cfg.buffer.max_queued_groups

    def lease(self, actor_id: str, max_prompts: int, now: float) -> LeaseGrant:
        """Grant up to max_prompts (prompt, n) items, or none with a wait_reason."""
        if max_prompts < 1:
            raise Rejection("bad_request", f"max_prompts: must be >= 1, got {max_prompts}")
        self.expire_leases(now)
        reason = self._lease_wait_reason()
        if self.evals.wants_grant(training_waits=reason is not None):
            return self._eval_lease(actor_id, max_prompts, now)
        if reason is not None:
            return self._wait(reason)
        leased = self._distinct(self._take(min(max_prompts, self.admission_room())))
        lease = Lease(self._new_lease_id(), actor_id, {it.prompt_id: it.n for it in leased},
                      now + self.cfg.buffer.lease_timeout_s, self.policy_version)
        self.leases[lease.lease_id] = lease
        self.counters.leases_granted += 1
        self.counters.prompts_leased += len(leased)
        for it in leased:
            self.stats[it.prompt_id].leases += 1
        items = [self._work_item(it) for it in leased]
        self.evals.count_granted(sum(it.n for it in items))
        return LeaseGrant(lease_id=lease.lease_id, items=items, policy_version=self.policy_version,
                          deadline_s=self.cfg.buffer.lease_timeout_s)

    def _eval_lease(self, actor_id: str, max_prompts: int, now: float) -> LeaseGrant:
        """An evaluation lease (buffer/evaluation.py); the actor generates it with weights of eval_version."""
        lease_id = self._new_lease_id()
        version, items = self.evals.grant(lease_id, max_prompts, now, actor_id)
        return LeaseGrant(lease_id=lease_id, items=items, policy_version=self.policy_version,
                          deadline_s=self.cfg.buffer.lease_timeout_s, eval_version=version)

    def submit_eval(self, lease_id: int, result: EvalResult, now: float) -> SubmitAck:
        """One evaluation item's result; Rejection (counted under eval_results_rejected) if refused."""
        self.expire_leases(now)
        # Weights one version ahead of the buffer's are legitimate (broadcast before the report).
        self.evals.submit(lease_id, result, self.policy_version + 1, now)
        return SubmitAck(accepted=True, queued=False, note="evaluation")

    def submit(self, lease_id: int, group: Group, now: float) -> SubmitAck:
        """Validate and ingest one group; raises Rejection (counted by reason) for anything invalid."""
        self.expire_leases(now)
        try:
            lease, min_version = self._check_submission(lease_id, group)
        except Rejection as rej:
            _bump(self.counters.groups_rejected, rej.code)
            raise
        del lease.open[group.prompt_id]
        lease.done.append(group.prompt_id)
        if not lease.open:
            self._retire(lease, "completed")
        return self._ingest(group, min_version)

    def release(self, lease_id: int, prompt_ids: list[str], now: float) -> str:
        """An actor gives back prompts it will not finish; they go to the front of the pool."""
        self.expire_leases(now)
        if self.evals.owns(lease_id):
            return self.evals.release(lease_id, prompt_ids)
        lease = self.leases.get(lease_id)
        if lease is None:
            raise Rejection("unknown_lease", f"lease_id: {lease_id} is not a live lease")
        returned = [PendingItem(pid, lease.open.pop(pid)) for pid in prompt_ids if pid in lease.open]
        self.pending.extendleft(reversed(returned))
        self.counters.leases_released += 1
        self.counters.prompts_returned += len(returned)
        if not lease.open:
            self._retire(lease, "released")
        ignored = len(prompt_ids) - len(returned)
        return f"returned {len(returned)} prompts" + (f", ignored {ignored} not open in the lease" if ignored else "")

    def fetch(self, n_groups: int, after_arrival: int = -1) -> Batch:
        """Exactly n_groups oldest groups (after dropping too-stale ones), or an empty batch if fewer wait.

        after_arrival: the newest arrival the learner has consumed (-1: none); older queued groups are not served
        again (see _forget_consumed)."""
        if not self._valid_fetch_size(n_groups):
            raise Rejection("bad_request",
                            f"n_groups: must be in [1, {self.cfg.buffer.max_queued_groups}], got {n_groups}")
        self._forget_consumed(after_arrival)
        dropped = self._drop_stale()
        if len(self.queue) < n_groups:
            return Batch(groups=[], policy_version=self.policy_version, dropped_stale=dropped)
        served = []
        for _ in range(n_groups):
            q = self.queue.popleft()
            staleness = max(0, self.policy_version - q.min_version)  # a group of the version being reported: 0
            _bump(self.counters.staleness_hist, staleness)
            served.append(ServedGroup(group=q.group, staleness=staleness, arrival=q.arrival))
        self.counters.groups_served += n_groups
        return Batch(groups=served, policy_version=self.policy_version, dropped_stale=dropped)

    def _new_lease_id(self) -> int:
        if self.next_lease_id >= LEASE_SEQ_LIMIT:  # 2**31 leases in one life: continue in a fresh incarnation
            self.incarnation += 1
            self.next_lease_id = 1
        lease_id = self.incarnation * LEASE_SEQ_LIMIT + self.next_lease_id
        self.next_lease_id += 1
        return lease_id

    def report_version(self, version: int, rollback: bool = False, now: float = 0.0) -> None:
        """A learner resumed from an older checkpoint reports with rollback=True: queued groups sampled by the
        discarded newer weights can no longer be importance-corrected and are dropped (counted). A forward step
        larger than buffer.max_version_jump is refused (a stray or broken report would otherwise drop every queued
        group as stale and open admission for work nobody will train on)."""
        if not 0 <= version <= INT32_MAX:
            raise Rejection("bad_request", f"version: must be in [0, {INT32_MAX}], got {version}")
        jump = version - self.policy_version
        if jump > self.cfg.buffer.max_version_jump:
            raise Rejection("version_jump",
                            f"version: {version} is {jump} ahead of the buffer's policy_version "
                            f"{self.policy_version}; buffer.max_version_jump allows {self.cfg.buffer.max_version_jump}")
        if version < self.policy_version and not rollback:
            raise Rejection("version_regression",
                            f"version: {version} is older than the buffer's policy_version {self.policy_version}")
        if version < self.policy_version:
            kept = deque(q for q in self.queue if _max_version(q.group) <= version)
            self.counters.groups_dropped_rollback += len(self.queue) - len(kept)
            self.queue = kept
            # The discarded steps consumed their batches; without this the staleness window would stay full of
            # groups no version will ever account for, and leasing (hence training) would stop.
            c = self.counters
            discarded = (self.policy_version - version) * self.cfg.learner.groups_per_step
            c.groups_served_discarded += min(discarded, c.groups_served - c.groups_served_discarded)
            self.evals.rollback(version)
        self.policy_version = version
        self.evals.on_version(version, now)

    def count_bad_message(self, code: str) -> None:
        self.counters.messages_bad += 1
        _bump(self.counters.errors, code)

    def count_error(self, code: str) -> None:
        _bump(self.counters.errors, code)

    # ------------------------------------------------------------------------------------------- leases

    def expire_leases(self, now: float) -> int:
        """Return the prompts of leases past their deadline to the front of the pool; how many expired."""
        expired = 0
        # Deadlines grow with grant order (one timeout for all), so only the oldest leases can be due.
        while self.leases:
            lease = next(iter(self.leases.values()))
            if lease.deadline > now:
                break
            returned = [PendingItem(pid, n) for pid, n in lease.open.items()]
            self.pending.extendleft(reversed(returned))
            self.counters.prompts_returned += len(returned)
            self.counters.leases_expired += 1
            self._retire(lease, "expired")
            expired += 1
        return expired + self.evals.expire(now)

    def _retire(self, lease: Lease, reason: str) -> None:
        self.leases.pop(lease.lease_id, None)
        self.retired[lease.lease_id] = RetiredLease(reason, list(lease.done))
        while len(self.retired) > RETIRED_LEASES_KEPT:
            self.retired.popitem(last=False)

    def _distinct(self, taken: list[PendingItem]) -> list[PendingItem]:
        """Items with distinct prompt ids; repeats go back to the front of the pool for the next lease.

        A prompt can be pending twice (an expired lease returned it while a new epoch re-allocated it); inside one
        lease the two would collide on prompt_id, the key of a submission.
        """
        seen: set[str] = set()
        leased, deferred = [], []
        for it in taken:
            (deferred if it.prompt_id in seen else leased).append(it)
            seen.add(it.prompt_id)
        self.pending.extendleft(reversed(deferred))
        return leased

    def _wait(self, reason: str) -> LeaseGrant:
        _bump(self.counters.lease_waits, reason)
        return LeaseGrant(lease_id=0, items=[], policy_version=self.policy_version, deadline_s=0.0,
                          wait_reason=reason)

    def _work_item(self, item: PendingItem) -> WorkItem:
        p = self.prompts[item.prompt_id]
        return WorkItem(prompt_id=p.prompt_id, prompt=p.question, n=item.n, answer=p.answer,
                        metadata_json=p.metadata_json)

    # ------------------------------------------------------------------------------------------- waves

    def _take(self, m: int) -> list[PendingItem]:
        while len(self.pending) < m:
            self._allocate_wave()
        return [self.pending.popleft() for _ in range(m)]

    def _allocate_wave(self) -> None:
        if self.epoch_pos >= len(self.epoch_order):
            self._start_epoch()
        if self.cfg.algo.prompt_skipping:
            ids = self._skipping_wave_ids()
        else:
            ids = self.epoch_order[self.epoch_pos : self.epoch_pos + self.cfg.buffer.wave_size]
            self.epoch_pos += len(ids)
        for pid, n in zip(ids, self.allocate(ids)):
            self.pending.append(PendingItem(pid, n))
            s = self.stats[pid]
            s.allocations.append(n)
            del s.allocations[:-ALLOCATION_HISTORY]
            s.last_wave = self.counters.waves_allocated
        self.counters.waves_allocated += 1

    def _skipping_wave_ids(self) -> list[str]:
        """Up to wave_size prompts of the epoch that the skip rule lets in (ALGORITHM §8), never none.

        The wave ends with its epoch, as without skipping. If a whole epoch was skipped, its first wave_size
        prompts are leased anyway (counted as forced): the pool never starves."""
        size = self.cfg.buffer.wave_size
        while True:
            ids = []
            while len(ids) < size and self.epoch_pos < len(self.epoch_order):
                pid = self.epoch_order[self.epoch_pos]
                self.epoch_pos += 1
                if self._enters_wave(pid):
                    ids.append(pid)
            self.skip.epoch_kept += len(ids)
            if ids:
                return ids
            if self.skip.epoch_kept == 0:
                forced = self.epoch_order[:size]
                self.counters.prompts_forced += len(forced)
                return forced
            self._start_epoch()

    def _enters_wave(self, pid: str) -> bool:
        """Draw the skip decision for one prompt of the epoch and record it."""
        s = self.stats[pid]
        if s.zero_variance_streak == 0:
            return True
        q = skipping.explore_probability(self.skip.p_explore, s.zero_variance_streak, s.skips_in_row)
        if q >= 1.0 or skipping.decision_draw(self.cfg.buffer.seed, self.epoch, pid) < q:
            self.counters.prompts_revisited += 1
            return True
        s.skips_in_row += 1
        s.skips += 1
        self.counters.prompts_skipped += 1
        return False

    def allocate(self, prompt_ids: list[str]) -> list[int]:
        """n_i for a wave (docs/ALGORITHM.md §1) from the stats the refresh policy says to use."""
        algo = self.cfg.algo
        alloc = _allocation_module()
        counts, priorities = [], []
        for pid in prompt_ids:
            g, k = self._priority_inputs(pid)
            counts.append(int(round(g)))
            priorities.append(self.priority(g, k))
        ns = alloc.allocate_rollouts(counts, priorities, algo.n_mean * len(prompt_ids), algo.n_min, algo.n_max,
                                     algo.initial_budget, algo.allocation_mode)
        ns = [int(n) for n in ns]
        if len(ns) != len(prompt_ids) or min(ns) < 1:
            raise RuntimeError(f"allocate_rollouts returned {ns} for {len(prompt_ids)} prompts")
        return ns

    def priority(self, g: float, k: float) -> float:
        algo = self.cfg.algo
        if algo.stats_half_life == 0:
            g, k = int(round(g)), int(round(k))  # exact counts: keep the integer contract of prompt_priority
        return float(_allocation_module().prompt_priority(g, k, min_history=algo.min_history,
                                                           mastery=algo.mastery, floor=algo.priority_floor))

    def _priority_inputs(self, pid: str) -> tuple[float, float]:
        if self.cfg.algo.priority_refresh == "epoch":
            return self.epoch_stats.get(pid, (0.0, 0.0))
        s = self.stats[pid]
        return s.samples, s.correct

    def _start_epoch(self) -> None:
        self.epoch += 1
        self.skip.epoch_kept = 0
        self.epoch_order = self._shuffled(self.epoch)
        self.epoch_pos = 0
        self.epoch_stats = {pid: (s.samples, s.correct) for pid, s in self.stats.items()}

    def _shuffled(self, epoch: int) -> list[str]:
        order = sorted(self.prompts)
        random.Random(self.cfg.buffer.seed * 1_000_003 + epoch).shuffle(order)
        return order

    # ------------------------------------------------------------------------------------------- ingest

    def _check_submission(self, lease_id: int, group: Group) -> tuple[Lease, int]:
        """The live lease and the group's smallest token version, or Rejection naming the problem."""
        pid = group.prompt_id
        lease = self.leases.get(lease_id)
        if lease is None:
            retired = self.retired.get(lease_id)
            if retired is None:
                raise Rejection("unknown_lease", f"lease_id: {lease_id} is not a known lease")
            if pid in retired.done:
                raise Rejection("duplicate", f"group: prompt {pid!r} of lease {lease_id} was already submitted")
            raise Rejection(f"{retired.reason}_lease" if retired.reason != "completed" else "prompt_not_in_lease",
                            f"lease_id: lease {lease_id} is {retired.reason}; prompt {pid!r} is not open in it")
        if pid not in lease.open:
            if pid in lease.done:
                raise Rejection("duplicate", f"group: prompt {pid!r} of lease {lease_id} was already submitted")
            raise Rejection("prompt_not_in_lease", f"group.prompt_id: {pid!r} is not open in lease {lease_id}")
        n = lease.open[pid]
        if len(group.samples) != n:
            raise Rejection("wrong_n", f"group.samples: has {len(group.samples)} samples, lease asked for {n}")
        try:
            group.prompt_array()
        except WireError as exc:
            raise Rejection("invalid_prompt_tokens", str(exc)) from None
        # The learner broadcasts V before it reports V, so an engine may generate with V while the buffer still
        # has V - 1: tokens one version ahead are legitimate, anything newer is not.
        newest = self.policy_version + 1
        min_version = _fast_min_version(group, newest)
        if min_version is _INVALID:
            for i, sample in enumerate(group.samples):
                problem = validate_sample(sample, newest)
                if problem is not None:
                    field_name = problem.split(":", 1)[0].rsplit(".", 1)[-1]
                    raise Rejection(f"invalid_{field_name}", f"group.samples[{i}]: {problem}")
            raise RuntimeError("group failed the fast check but every sample passed validate_sample")
        # An all-empty group carries no token versions; the lease's version is when its work was handed out.
        return lease, lease.policy_version if min_version is None else min_version

    def _ingest(self, group: Group, min_version: int) -> SubmitAck:
        self._update_stats(group)
        self.counters.groups_received += 1
        self.counters.samples_received += len(group.samples)
        rewards = [s.reward for s in group.samples]
        zero_variance = max(rewards) == min(rewards)
        all_correct = zero_variance and all(s.correct for s in group.samples)
        self._track_yield(not zero_variance, len(group.samples), all_correct)
        self._track_streak(group.prompt_id, zero_variance)
        if self.cfg.algo.drop_zero_variance_groups and zero_variance:
            self.counters.groups_zero_variance += 1
            return SubmitAck(accepted=True, queued=False, note="zero_variance")
        if self.next_arrival >= LEASE_SEQ_LIMIT:  # 2**31 groups in one life: continue in a fresh incarnation
            self.incarnation += 1
            self.next_arrival = 0
        # Arrival ids carry the incarnation like lease ids, so they keep growing across restarts (the learner names
        # what it consumed by arrival: fetch's after_arrival).
        self.queue.append(QueuedGroup(group, self.incarnation * LEASE_SEQ_LIMIT + self.next_arrival, min_version))
        self.next_arrival += 1
        return SubmitAck(accepted=True, queued=True)

    # ------------------------------------------------------------------------------------------- yield

    def _track_yield(self, informative: bool, samples: int, all_correct: bool) -> None:
        """Slide the yield window by one group (running sums, O(1)); warn on entering a low-yield episode."""
        entry = (int(informative), samples, int(all_correct))
        self._add_to_yield(entry, +1)
        self.yield_window.append(entry)
        if len(self.yield_window) > self.cfg.buffer.yield_window_groups:
            self._add_to_yield(self.yield_window.popleft(), -1)
        warning = self._low_yield_sentence()
        if warning and not self.low_yield_warning:
            log.warning("low informative yield: %s", warning)
        elif self.low_yield_warning and not warning:
            log.info("yield recovered: %.0f%% of recent groups have reward variance", 100 * self.informative_yield())
        self.low_yield_warning = warning

    def _track_streak(self, pid: str, zero_variance: bool) -> None:
        """Per-prompt zero-variance streak (kept with skipping off too, so turning it on has history) and, with
        skipping on, one step of the adaptive p_explore toward the target yield."""
        s = self.stats[pid]
        if not zero_variance and s.zero_variance_streak > 0:
            self.counters.revisits_informative += 1
        s.zero_variance_streak = s.zero_variance_streak + 1 if zero_variance else 0
        s.skips_in_row = 0
        algo = self.cfg.algo
        if algo.prompt_skipping:
            self.skip.p_explore = skipping.updated_explore(self.skip.p_explore, not zero_variance,
                                                           algo.skip_target_yield, algo.skip_rate_step,
                                                           algo.skip_explore_min, algo.skip_explore_max)

    def _add_to_yield(self, entry: tuple[int, int, int], sign: int) -> None:
        informative, samples, all_correct = entry
        sums = self._yield_sums
        sums[0] += sign * informative
        sums[1] += sign * samples
        sums[2] += sign * samples * informative
        sums[3] += sign * all_correct

    def informative_yield(self) -> float:
        """Groups with reward variance / generated groups, over the window (0 before the first group)."""
        return self._yield_sums[0] / len(self.yield_window) if self.yield_window else 0.0

    def informative_sample_yield(self) -> float:
        """Samples in groups with reward variance / generated samples, over the window."""
        return self._yield_sums[2] / self._yield_sums[1] if self._yield_sums[1] else 0.0

    def _low_yield_sentence(self) -> str:
        window = len(self.yield_window)
        y = self.informative_yield()
        if window < self.cfg.buffer.yield_window_groups or y >= self.cfg.buffer.low_yield_threshold:
            return ""
        flat = window - self._yield_sums[0]
        start = f"only {y:.1%} of the last {window} groups have any reward variance, so most generation teaches nothing"
        if self._yield_sums[3] * 2 >= flat:
            return (f"{start}: {self._yield_sums[3] / window:.0%} of groups are all correct, the prompts are too easy "
                    "for the model; use harder prompts or a larger task, or lower algo.mastery so solved prompts get "
                    "fewer rollouts.")
        return (f"{start}: {(flat - self._yield_sums[3]) / window:.0%} of groups are all wrong, the prompts are too "
                "hard for the model; use easier prompts, more response tokens (actor.max_new_tokens) or more "
                "rollouts per prompt (algo.n_max).")

    def _update_stats(self, group: Group) -> None:
        s = self.stats.get(group.prompt_id)
        if s is None:  # a prompt that left the pool after a restart still counts, under its own id
            s = self.stats[group.prompt_id] = PromptStats()
        decay = 0.5 ** (1.0 / self.cfg.algo.stats_half_life) if self.cfg.algo.stats_half_life > 0 else 1.0
        for sample in group.samples:
            correct = bool(sample.correct)
            s.samples = s.samples * decay + 1.0
            s.correct = s.correct * decay + float(correct)
            s.total_samples += 1
            s.total_correct += int(correct)

    def _drop_stale(self) -> int:
        limit = self.policy_version - self.cfg.algo.max_staleness
        if not self.queue or min(q.min_version for q in self.queue) >= limit:
            return 0
        kept = deque(q for q in self.queue if q.min_version >= limit)
        dropped = len(self.queue) - len(kept)
        self.queue = kept
        self.counters.groups_dropped_stale += dropped
        return dropped

    # ------------------------------------------------------------------------------------------- views

    def stats_dict(self, now: float) -> dict[str, Any]:
        """The `stats` reply: counters plus gauges. Key names are part of the interface."""
        out = msgspec.structs.asdict(self.counters)
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in out.items()}
        out.update(
            policy_version=self.policy_version,
            epoch=self.epoch,
            epoch_progress=self.epoch_pos / max(1, len(self.epoch_order)),
            queue_depth=len(self.queue),
            in_flight=self.in_flight,
            live_leases=len(self.leases),
            pending=len(self.pending),
            admission_room=self.admission_room(),
            prompts=len(self.prompts),
            clients=self._client_counts(),
            uptime_s=max(0.0, now - self.started_at),
            informative_yield=self.informative_yield(),
            informative_sample_yield=self.informative_sample_yield(),
            low_yield_warning=self.low_yield_warning,
            incarnation=self.incarnation,
            prompt_skipping=self.cfg.algo.prompt_skipping,
            skip_explore_probability=self.skip.p_explore,
            skip_probability=1.0 - self.skip.p_explore if self.cfg.algo.prompt_skipping else 0.0,
        )
        out.update(self.evals.stats())
        return out

    def _client_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for role, _ in self.clients:
            _bump(counts, role)
        return counts

    def prompt_rows(self, top: int = 0) -> list[dict[str, Any]]:
        """Per-prompt table sorted by priority (highest first), then id."""
        rows = []
        for pid, s in self.stats.items():
            g, k = s.samples, s.correct
            rows.append({
                "prompt_id": pid,
                "G": round(g, 3),
                "k": round(k, 3),
                "success": k / g if g > 0 else None,
                "variance": k * (g - k) / (g * (g - 1)) if g > 1 else None,
                "priority": self.priority(g, k),
                "last_n": s.allocations[-1] if s.allocations else 0,
                "allocations": list(s.allocations),
                "leases": s.leases,
                "zero_variance_streak": s.zero_variance_streak,
                "skips_in_row": s.skips_in_row,
                "skips": s.skips,
                "waves_since_seen": self.counters.waves_allocated - s.last_wave if s.last_wave >= 0 else None,
                "skip_probability": self.prompt_skip_probability(s),
            })
        rows.sort(key=lambda r: (-r["priority"], r["prompt_id"]))
        return rows[:top] if top > 0 else rows

    def prompt_skip_probability(self, s: PromptStats) -> float:
        """Chance that the prompt is skipped the next time its epoch reaches it (0 with skipping off)."""
        if not self.cfg.algo.prompt_skipping:
            return 0.0
        return 1.0 - skipping.explore_probability(self.skip.p_explore, s.zero_variance_streak, s.skips_in_row)

    def inspect(self, what: str, top: int, now: float) -> Any:
        if what == "prompts":
            return self.prompt_rows(top)
        if what == "summary":
            return self.stats_dict(now)
        if what == "queue":
            rows = [{"prompt_id": q.group.prompt_id, "arrival": q.arrival, "samples": len(q.group.samples),
                     "min_version": q.min_version, "staleness": self.policy_version - q.min_version}
                    for q in self.queue]
            return rows[:top] if top > 0 else rows
        if what == "leases":
            rows = [{"lease_id": lease.lease_id, "kind": "train", "actor_id": lease.actor_id, "open": len(lease.open),
                     "done": len(lease.done), "seconds_left": round(lease.deadline - now, 1),
                     "policy_version": lease.policy_version} for lease in self.leases.values()]
            rows = sorted(rows + self.evals.lease_rows(now), key=lambda row: row["lease_id"])
            return rows[:top] if top > 0 else rows
        raise Rejection("bad_request", f"what: {what!r} is not one of prompts, summary, queue, leases")

    # ------------------------------------------------------------------------------------------- persistence

    def to_snapshot(self, wall_time: float) -> Snapshot:
        """A copy of the durable state; in-flight leases become pending again (their actors' work is lost)."""
        in_flight = [PendingItem(pid, n) for lease in self.leases.values() for pid, n in lease.open.items()]
        retired = dict(self.retired)
        for lease in self.leases.values():
            retired[lease.lease_id] = RetiredLease("restart", list(lease.done))
        return Snapshot(
            config_json=json.dumps(config_to_dict(self.cfg)), saved_at=wall_time,
            policy_version=self.policy_version, epoch=self.epoch, epoch_order=list(self.epoch_order),
            epoch_pos=self.epoch_pos, pending=in_flight + list(self.pending), stats=dict(self.stats),
            epoch_stats=dict(self.epoch_stats), counters=self.counters, queue=list(self.queue), retired=retired,
            next_lease_id=self.next_lease_id, next_arrival=self.next_arrival, incarnation=self.incarnation,
            skip=msgspec.structs.replace(self.skip), evaluation=self.evals.to_snapshot(),
        )

    @classmethod
    def from_snapshot(cls, snap: Snapshot, cfg: Config | None = None,
                      prompts: Iterable[PromptRecord] | None = None, *, now: float = 0.0,
                      eval_prompts: Iterable[PromptRecord] = ()) -> "BufferState":
        """Restore; `cfg`/`prompts` default to the snapshot's own (read-only inspection of a finished run).

        The restored state is a new incarnation: its lease ids differ from every id the snapshot's buffer (or any
        earlier restore of it that was persisted) could have handed out."""
        if snap.format not in SNAPSHOT_FORMATS_READ:
            raise SnapshotError(f"snapshot: format {snap.format} is not supported (expected one of "
                                f"{list(SNAPSHOT_FORMATS_READ)})")
        if not 1 <= snap.incarnation < MAX_INCARNATION:
            raise SnapshotError(f"snapshot: incarnation {snap.incarnation} is out of range")
        cfg = cfg or config_from_dict(json.loads(snap.config_json))
        if prompts is None:
            prompts = [PromptRecord(pid, "", "") for pid in snap.stats]
        state = cls(cfg, prompts, now=now, eval_prompts=eval_prompts)
        known = state.prompts
        state.stats.update(snap.stats)
        state.policy_version = snap.policy_version
        state.epoch = snap.epoch
        state.epoch_order = [pid for pid in snap.epoch_order if pid in known]
        state.epoch_pos = min(snap.epoch_pos, len(state.epoch_order))
        state.epoch_stats = {pid: tuple(v) for pid, v in snap.epoch_stats.items()}
        state.pending = deque(it for it in snap.pending if it.prompt_id in known)
        state.counters = snap.counters
        state.queue = deque(snap.queue)
        state.retired = OrderedDict(snap.retired)
        state.incarnation = snap.incarnation + 1
        state.next_lease_id = 1
        state.next_arrival = 0  # arrival ids of the new incarnation start above every earlier one
        if snap.skip is not None:
            algo = state.cfg.algo  # a resume may have changed the bounds
            p = min(algo.skip_explore_max, max(algo.skip_explore_min, snap.skip.p_explore))
            state.skip = SkipController(p_explore=p, epoch_kept=snap.skip.epoch_kept)
        state.evals.restore(snap.evaluation, now)
        return state


_INVALID = object()
_OK_FINISH = frozenset(FINISH_REASONS) - {"abort"}


def _fast_min_version(group: Group, max_version: int) -> Any:
    """Smallest token version of a valid group (None if it has no tokens), or _INVALID.

    The same checks as `validate_sample`, done once over the concatenated arrays of the whole group instead of a
    dozen numpy calls per sample (the difference is about 3x in ingest throughput). Only a group that fails here
    goes through `validate_sample` to name its first bad field.
    """
    logprobs, versions = [], []
    for s in group.samples:
        n4 = 4 * s.n_tokens
        if (s.n_tokens < 0 or len(s.tokens) != n4 or len(s.logprobs) != n4 or len(s.versions) != n4
                or s.finish_reason not in _OK_FINISH or not math.isfinite(s.reward)):
            return _INVALID
        logprobs.append(s.logprobs)
        versions.append(s.versions)
    lp = np.frombuffer(b"".join(logprobs), LOGPROB_DTYPE)
    if lp.size == 0:
        return None
    # min/max propagate NaN and reach +-inf, so two reductions cover "finite and <= 0 (with slack)".
    if not math.isfinite(float(lp.min())) or float(lp.max()) > 1e-4:
        return _INVALID
    v = np.frombuffer(b"".join(versions), VERSION_DTYPE)
    lo = int(v.min())
    if lo < 0 or int(v.max()) > max_version:
        return _INVALID
    return lo


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)


def _snapshot_digest(fmt: int, payload: bytes) -> bytes:
    return hashlib.sha256(struct.pack("<IQ", fmt, len(payload)) + payload).digest()


def encode_snapshot(snap: Snapshot) -> bytes:
    """Header (magic, format, length, SHA-256) + MessagePack payload."""
    payload = _snapshot_encoder.encode(snap)
    header = _SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, len(payload),
                                   _snapshot_digest(SNAPSHOT_FORMAT, payload))
    return header + payload


def decode_snapshot(data: bytes, source: str = "snapshot") -> Snapshot:
    """Check the header and checksum, then decode; SnapshotError naming `source` (the file) on any mismatch."""
    if len(data) < _SNAPSHOT_HEADER.size:
        raise SnapshotError(f"{source}: {len(data)} bytes is too short to be a buffer snapshot")
    magic, fmt, length, digest = _SNAPSHOT_HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotError(f"{source}: not a buffer snapshot of this version (no snapshot header)")
    if fmt not in SNAPSHOT_FORMATS_READ:
        raise SnapshotError(f"{source}: snapshot format {fmt} is not supported (expected one of "
                            f"{list(SNAPSHOT_FORMATS_READ)})")
    payload = memoryview(data)[_SNAPSHOT_HEADER.size:]
    if len(payload) != length:
        raise SnapshotError(f"{source}: payload is {len(payload)} bytes, the header says {length} (truncated file)")
    if _snapshot_digest(fmt, bytes(payload)) != digest:
        raise SnapshotError(f"{source}: checksum mismatch, the file is corrupt")
    try:
        snap = _snapshot_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"{source}: cannot be decoded ({exc})") from None
    if snap.format != fmt:
        raise SnapshotError(f"{source}: payload format {snap.format} differs from the header's {fmt}")
    return snap


def _max_version(group: Group) -> int:
    """Newest policy version of any token in the group (-1 for a group without tokens)."""
    versions = [int(np.frombuffer(x.versions, VERSION_DTYPE).max()) for x in group.samples if x.n_tokens]
    return max(versions, default=-1)
