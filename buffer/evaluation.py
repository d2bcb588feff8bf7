"""Held-out evaluation coordinated by the buffer and run on the actors' engines: `EvalJobs`.

A job evaluates policy version V: one item per held-out prompt and mode, greedy (n = 1, temperature 0) and sampled
(n = run.eval_samples at the actor's temperature). Jobs are posted at the start of the buffer (for its current
version when the schedule has it due), on every version report with V % run.eval_every == 0 and for
V == learner.total_steps, never for a version already finished. Items are handed out as evaluation leases (same id
space and deadline as training leases) in version order, ahead of training work but within `run.eval_share` of the
sequences granted since the job was posted (or whenever there is no training work). An expired or released
evaluation lease puts its items back. A job is finished when every item has a result; `aggregate` turns the results
into one `eval/*` record, which the server writes to metrics.jsonl with role `eval` and step V.

With run.eval_suite the items are the suite's benchmarks (common/suites.py; the first run.eval_suite_size prompts
of each) instead of the task's held-out split, loaded when the jobs are built (a benchmark that cannot be read
stops the buffer's start with an error naming it). Each item carries its benchmark (`WorkItem.benchmark`) so the
actor grades it with the math scorer; a result counts for the benchmark of the buffer's own prompt record of its
item id (checked against the lease), never a name the actor sends. The record then also holds `eval/<benchmark>/avg@k`,
`eval/<benchmark>/pass@k` and greedy `eval/<benchmark>/pass@1`, and their unweighted means `eval/suite/*`,
computed by common.suites' benchmark_metrics / suite_average as learner.evaluate_suite computes them offline.

The snapshot keeps the finished versions (a restored buffer never repeats one) and the pending ones (they start
over: results in flight at snapshot time are lost with their leases).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgspec

from buffer.prompts import PromptRecord
from buffer.rejection import Rejection
from common.schemas import EvalResult, WorkItem
from common.suites import benchmark_metrics, load_suite_benchmarks, suite_average

MODES = ("greedy", "sampled")


class EvalSnapshot(msgspec.Struct, kw_only=True):
    """What survives a restart: finished versions (their records are written) and pending ones (to start over)."""

    finished: list[int] = msgspec.field(default_factory=list)
    pending: list[int] = msgspec.field(default_factory=list)


@dataclass(frozen=True)
class ItemOutcome:
    """One item's result as aggregation sees it."""

    greedy: bool
    correct: tuple[bool, ...]
    rewards: tuple[float, ...]
    lengths: tuple[int, ...]
    versions: tuple[int, int]  # (min, max) of the weights that generated it
    benchmark: str = ""  # '' outside a suite


@dataclass
class Job:
    version: int
    posted: float
    pending: list[str]  # item ids not leased, in order
    results: dict[str, ItemOutcome] = field(default_factory=dict)
    eval_sequences: int = 0  # granted to evaluation since posting
    all_sequences: int = 0  # granted to anyone since posting


@dataclass
class EvalLease:
    lease_id: int
    version: int
    open: dict[str, None]  # item ids without a result, in grant order (they go back in that order)
    deadline: float
    actor_id: str = ""
    done: int = 0  # items with an accepted result


def item_id(mode: str, prompt_id: str) -> str:
    return f"eval:{mode}:{prompt_id}"


def suite_prompts(suite: str, size: int) -> list[PromptRecord]:
    """The evaluation prompts of run.eval_suite, `size` per benchmark (0: all), tagged with their benchmark; ids
    `<benchmark>:<prompt id>` (unique even when two benchmarks read the same dataset)."""
    loaded = load_suite_benchmarks(suite, size or None)
    return [PromptRecord(f"{name}:{p.prompt_id}", p.question, p.answer, json.dumps(p.metadata), benchmark=name)
            for name, data in loaded.items() for p in data.prompts]


def suite_metrics(outcomes: list[ItemOutcome], k: int) -> dict[str, float]:
    """Per benchmark `eval/<b>/avg@k`, `eval/<b>/pass@k` (sampled items, common.suites.benchmark_metrics) and
    `eval/<b>/pass@1` (greedy items correct / greedy items), and `eval/suite/*`, their unweighted means."""
    per: dict[str, dict[str, float]] = {}
    for bench in dict.fromkeys(o.benchmark for o in outcomes if o.benchmark):
        mine = [o for o in outcomes if o.benchmark == bench]
        sampled = [list(o.correct) for o in mine if not o.greedy]
        greedy = [o.correct[0] for o in mine if o.greedy]
        per[bench] = benchmark_metrics(sampled, k) if sampled else {}
        if greedy:
            per[bench]["pass@1"] = sum(greedy) / len(greedy)
    record = {f"eval/{bench}/{key}": value for bench, metrics in per.items() for key, value in metrics.items()}
    record.update({f"eval/suite/{key}": value for key, value in suite_average(per).items()})
    return record


def aggregate(outcomes: Iterable[ItemOutcome], k: int, version: int, seconds: float) -> dict[str, float]:
    """The `eval/*` record of a finished job (key names as the learner's former evaluation wrote them).

    pass@1: greedy items correct / greedy items; pass@k: sampled items with any correct sample / sampled items;
    mean_reward@k: mean reward over every sampled response; response_tokens/mean: mean greedy response length.
    Items of a suite add the per-benchmark and suite keys of `suite_metrics`."""
    outcomes = list(outcomes)
    greedy = [o for o in outcomes if o.greedy]
    sampled = [o for o in outcomes if not o.greedy]
    rewards = [r for o in sampled for r in o.rewards]
    lengths = [n for o in greedy for n in o.lengths]
    nan = float("nan")
    return {
        "eval/pass@1": sum(o.correct[0] for o in greedy) / len(greedy) if greedy else nan,
        f"eval/pass@{k}": sum(any(o.correct) for o in sampled) / len(sampled) if sampled else nan,
        f"eval/mean_reward@{k}": sum(rewards) / len(rewards) if rewards else nan,
        "eval/response_tokens/mean": sum(lengths) / len(lengths) if lengths else nan,
        "eval/seconds": seconds,
        "eval/weights_version_min": min((o.versions[0] for o in outcomes), default=-1),
        "eval/weights_version_max": max((o.versions[1] for o in outcomes), default=-1),
        "eval/learner_step": version,
        **suite_metrics(outcomes, k),
    }


class EvalJobs:
    """Evaluation jobs, their leases and results. Time (`now`, monotonic seconds) is passed in."""

    def __init__(self, cfg: Any, prompts: Iterable[PromptRecord] = ()):
        """`prompts`: the task's held-out prompts; with run.eval_suite the suite's prompts replace them."""
        self.cfg = cfg
        if cfg.run.eval_suite:
            prompts = suite_prompts(cfg.run.eval_suite, cfg.run.eval_suite_size)
        self.prompts: dict[str, PromptRecord] = {p.prompt_id: p for p in prompts}
        # item id -> (prompt, greedy); a result's benchmark is its item's prompt's, never one the actor names
        self.items: dict[str, tuple[PromptRecord, bool]] = {}
        for mode in MODES:
            for pid, p in self.prompts.items():
                self.items[item_id(mode, pid)] = (p, mode == "greedy")
        self.jobs: OrderedDict[int, Job] = OrderedDict()  # version -> job, in version order
        self.leases: OrderedDict[int, EvalLease] = OrderedDict()
        self.finished: set[int] = set()
        self.records: list[tuple[int, dict[str, float]]] = []  # finished, not yet written (the server drains)
        self.rejected: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ posting

    def due(self, version: int, at_start: bool = False) -> bool:
        run = self.cfg.run
        return (bool(self.items) and (version == 0 and at_start or version == self.cfg.learner.total_steps
                                      or (run.eval_every > 0 and version % run.eval_every == 0)))

    def post(self, version: int, now: float) -> bool:
        """Post the job for `version` unless it is finished or pending already; whether it was posted."""
        if not self.items or version in self.finished or version in self.jobs:
            return False
        self.jobs[version] = Job(version, now, list(self.items))
        self.jobs = OrderedDict(sorted(self.jobs.items()))
        return True

    def start(self, version: int, now: float) -> None:
        """At the buffer's start: the job for its version if due, and the jobs pending in a restored snapshot."""
        if self.due(version, at_start=True):
            self.post(version, now)

    def on_version(self, version: int, now: float) -> None:
        if self.due(version):
            self.post(version, now)

    # ------------------------------------------------------------------------------------------ leasing

    def has_work(self) -> bool:
        return any(job.pending for job in self.jobs.values())

    def wants_grant(self, training_waits: bool) -> bool:
        """Whether the next lease should be an evaluation lease (eval_share of sequences, or nothing else to do)."""
        head = next((job for job in self.jobs.values() if job.pending), None)
        if head is None:
            return False
        return training_waits or head.eval_sequences <= self.cfg.run.eval_share * head.all_sequences

    def grant(self, lease_id: int, max_prompts: int, now: float, actor_id: str = "") -> tuple[int, list[WorkItem]]:
        """(version, items) of a new evaluation lease from the oldest job with unleased items.

        The lease holds as many items as fit in the sequences of a typical training lease (max_prompts x
        algo.n_mean; at least one item): a greedy item is one sequence, so a job's greedy items go out in few
        leases, generated by few weight versions, instead of max_prompts at a time while training moves on."""
        job = next(job for job in self.jobs.values() if job.pending)
        budget = max_prompts * self.cfg.algo.n_mean
        count, sequences = 0, 0
        for iid in job.pending:
            n = self._n(iid)
            if count and sequences + n > budget:
                break
            count, sequences = count + 1, sequences + n
        taken, job.pending = job.pending[:count], job.pending[count:]
        self.leases[lease_id] = EvalLease(lease_id, job.version, dict.fromkeys(taken),
                                          now + self.cfg.buffer.lease_timeout_s, actor_id)
        items = [self._work_item(i) for i in taken]
        self.count_granted(sum(it.n for it in items), evaluation=True)
        return job.version, items

    def count_granted(self, sequences: int, evaluation: bool = False) -> None:
        for job in self.jobs.values():
            job.all_sequences += sequences
            if evaluation:
                job.eval_sequences += sequences

    def _n(self, iid: str) -> int:
        return 1 if self.items[iid][1] else self.cfg.run.eval_samples

    def _work_item(self, iid: str) -> WorkItem:
        prompt, greedy = self.items[iid]
        return WorkItem(prompt_id=iid, prompt=prompt.question, n=self._n(iid), answer=prompt.answer,
                        metadata_json=prompt.metadata_json, greedy=greedy,
                        benchmark=prompt.benchmark)

    def lease_rows(self, now: float) -> list[dict[str, Any]]:
        """Live evaluation leases as `inspect leases` rows (kind `eval`, the version they evaluate)."""
        return [{"lease_id": lease.lease_id, "kind": "eval", "actor_id": lease.actor_id, "open": len(lease.open),
                 "done": lease.done, "seconds_left": round(lease.deadline - now, 1), "policy_version": lease.version}
                for lease in self.leases.values()]

    def owns(self, lease_id: int) -> bool:
        return lease_id in self.leases

    def release(self, lease_id: int, item_ids: list[str]) -> str:
        lease = self.leases[lease_id]
        asked = set(item_ids)
        back = [i for i in lease.open if i in asked]  # grant order, each once
        self._put_back(lease, back)
        if not lease.open:
            del self.leases[lease_id]
        ignored = len(asked) - len(back)
        return f"returned {len(back)} evaluation items" + (f", ignored {ignored} not open in the lease"
                                                            if ignored else "")

    def expire(self, now: float) -> int:
        expired = [lease for lease in self.leases.values() if lease.deadline <= now]
        for lease in expired:
            self._put_back(lease, list(lease.open))
            del self.leases[lease.lease_id]
        return len(expired)

    def rollback(self, version: int) -> int:
        """The learner went back to `version` (resumed from an older checkpoint): pending jobs of later versions
        evaluate weights that no longer exist (an actor would wait for them while training starves); drop them and
        their leases (a late result is refused as an unknown lease). Each is posted again when the learner reaches
        its version. Finished versions stay finished. Returns the number of jobs dropped."""
        dropped = [v for v in self.jobs if v > version]
        for v in dropped:
            del self.jobs[v]
        for lease_id in [lid for lid, lease in self.leases.items() if lease.version > version]:
            del self.leases[lease_id]
        return len(dropped)

    def _put_back(self, lease: EvalLease, item_ids: list[str]) -> None:
        for iid in item_ids:
            lease.open.pop(iid, None)
        job = self.jobs.get(lease.version)
        if job is not None:
            job.pending[:0] = [i for i in item_ids if i not in job.results]

    # ------------------------------------------------------------------------------------------ results

    def submit(self, lease_id: int, result: EvalResult, max_version: int, now: float) -> None:
        """Record one item's result (Rejection naming the field, counted, if it is refused)."""
        try:
            lease, outcome = self._check(lease_id, result, max_version)
        except Rejection as rej:
            self.rejected[rej.code] = self.rejected.get(rej.code, 0) + 1
            raise
        lease.open.pop(result.item_id, None)
        lease.done += 1
        if not lease.open:
            del self.leases[lease_id]
        job = self.jobs[lease.version]
        job.results[result.item_id] = outcome
        if len(job.results) == len(self.items):
            del self.jobs[job.version]
            self.finished.add(job.version)
            self.records.append((job.version, aggregate(job.results.values(), self.cfg.run.eval_samples,
                                                        job.version, now - job.posted)))

    def _check(self, lease_id: int, result: EvalResult, max_version: int) -> tuple[EvalLease, ItemOutcome]:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise Rejection("unknown_lease", f"lease_id: {lease_id} is not a live evaluation lease")
        iid = result.item_id
        if iid not in lease.open:
            job = self.jobs.get(lease.version)
            if iid in self.items and job is not None and iid in job.results:
                raise Rejection("duplicate", f"result.item_id: {iid!r} of lease {lease_id} already has a result")
            raise Rejection("item_not_in_lease", f"result.item_id: {iid!r} is not open in lease {lease_id}")
        greedy = self.items[iid][1]
        n = self._n(iid)
        for name in ("correct", "rewards", "lengths"):
            if len(getattr(result, name)) != n:
                raise Rejection("wrong_n", f"result.{name}: has {len(getattr(result, name))} entries, the item "
                                               f"asked for {n}")
        if not all(math.isfinite(r) for r in result.rewards):
            raise Rejection("invalid_rewards", "result.rewards: not finite")
        limit = self.cfg.actor.max_new_tokens
        if not all(0 <= n_tok <= limit for n_tok in result.lengths):
            raise Rejection("invalid_lengths", f"result.lengths: must be in [0, {limit}] "
                                                   f"(actor.max_new_tokens), got {list(result.lengths)}")
        lo, hi = result.weights_version_min, result.weights_version_max
        if not lo <= hi <= max_version:
            raise Rejection("invalid_versions", f"result.weights_version_min/max: need min <= max <= "
                                                    f"{max_version}, got {lo}, {hi}")
        return lease, ItemOutcome(greedy, tuple(result.correct), tuple(result.rewards), tuple(result.lengths),
                                  (lo, hi), self.items[iid][0].benchmark)

    def take_records(self) -> list[tuple[int, dict[str, float]]]:
        records, self.records = self.records, []
        return records

    # ------------------------------------------------------------------------------------------ views

    def stats(self) -> dict[str, Any]:
        return {"eval_pending": list(self.jobs), "eval_done": len(self.finished),
                "eval_live_leases": len(self.leases), "eval_results_rejected": dict(self.rejected)}

    def to_snapshot(self) -> EvalSnapshot:
        return EvalSnapshot(finished=sorted(self.finished), pending=list(self.jobs))

    def restore(self, snap: EvalSnapshot | None, now: float) -> None:
        """Finished versions stay finished; pending jobs start over."""
        if snap is None:
            return
        self.finished = set(snap.finished)
        for version in snap.pending:
            self.post(version, now)
