"""The actors' side of weight sync: `WeightReceiver` (HF engines) and `SGLangFollower` (SGLang engines).

Both follow the learner's announcements (`common.weight_protocol.ControlSubscriber`) and answer through the
learner's TCPStore: a member writes its join key once it holds the invited group and its acknowledgement once it
received a version, which is what the learner's `perf/sync_ok` counts. Rules both keep (the sender relies on
them; docs/ARCHITECTURE.md, "Weight sync"):
- join only an invitation whose group is `<base>/current`, and never re-join the group already held (SGLang
  refuses a second group of the same name);
- take part in every data announcement on the held group, also one whose version the engine already has (the
  learner re-sends its version after a rebuild, a rejoin, a retry and a resume);
- acknowledge only what was received (HF) or installed after every bucket's reply came back OK (SGLang);
- the newest announcement is the policy, also when its version is older than the engine's (a learner resumed from
  an older checkpoint): the HF receiver stages every version that differs from the last one it received, and the
  actor swaps in whatever staged version differs from its engine's;
- a failed receive or update drops the membership and raises the rejoin flag; it is logged and counted, and the
  thread goes on. A malformed announcement is counted and skipped.

    receiver = WeightReceiver(cfg.learner, 1 + actor_index, engine.state_dict_template(), engine.device).start()
    follower = SGLangFollower(cfg, sglang_engine).start()
"""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from common.config import LearnerConfig
from common.schemas import WeightAnnouncement, WireError
from common.weight_protocol import (ControlSubscriber, GroupFactory, acknowledge, confirm_joined, connect_store,
                                    dtype_from_name, flat_offsets, flat_views, is_current, new_process_group,
                                    request_rejoin, transport_device, write_rejoin_flag)

logger = logging.getLogger(__name__)


class _BufferPool:
    """Reusable flat receive buffers: writing into fresh memory page-faults inside gloo's receive and made it
    3-4x slower than receiving into memory that was touched before (measured here, 512 MB)."""

    def __init__(self, max_free: int = 2):
        self._free: list[list[torch.Tensor]] = []
        self._max_free = max_free

    def acquire(self, sizes: list[int], device: torch.device) -> list[torch.Tensor]:
        for i, bufs in enumerate(self._free):
            if [b.numel() for b in bufs] == sizes:
                return self._free.pop(i)
        return [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]

    def release(self, bufs: list[torch.Tensor] | None) -> None:
        if bufs:
            self._free.append(bufs)
            del self._free[:-self._max_free]


def _report_failure(store: torch.distributed.Store, base: str, ann: WeightAnnouncement, ranks: Any) -> None:
    """Tell the sender at once that this member will not confirm `ann.version` (best effort: the store may be
    what failed), so it rebuilds without waiting out sync_timeout_s."""
    try:
        acknowledge(store, base, ann.group_name, ann.version, ranks, ok=False)
    except RuntimeError as exc:
        logger.debug("weight sync: failure of version %d not reported (%s)", ann.version, exc)


@dataclass
class _Membership:
    name: str
    group: Any
    store: torch.distributed.TCPStore
    transport: torch.device


class WeightReceiver:
    """Rank `rank` of the weight-update group: receives versions in a background thread into staging copies."""

    def __init__(self, learner_cfg: LearnerConfig, rank: int, template: Mapping[str, torch.Tensor],
                 device: torch.device | str, group_factory: GroupFactory = new_process_group):
        if rank < 1:
            raise ValueError(f"rank: receivers are ranks 1..K, got {rank}")
        self.cfg = learner_cfg
        self.rank = rank
        self.device = torch.device(device)
        self._group_factory = group_factory
        self._template = {name: (t.dtype, tuple(t.shape)) for name, t in template.items()}
        self._member: _Membership | None = None
        self._latest: tuple[int, dict[str, torch.Tensor]] | None = None
        self._newest_version = -1
        # Flat buffers behind the staged version (`latest`) and behind the one the caller took last (`handed`):
        # both stay untouched until superseded, so a taken state dict is valid until the next take.
        self._pool = _BufferPool()
        self._latest_bufs: list[torch.Tensor] | None = None
        self._handed_bufs: list[torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rejoin_sent = False
        """Whether the sender was asked to (re)build its group since this receiver last lost its membership."""
        self.joins = 0
        """How many groups this receiver has joined (a test and metrics hook)."""
        self.failures = 0
        """Versions whose receive failed (the membership was dropped and a rejoin requested)."""
        self.rejected = 0
        """Malformed announcements skipped."""

    def start(self) -> "WeightReceiver":
        self._thread = threading.Thread(target=self._run, name=f"weight-receiver-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def take_latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The newest fully received (version, state dict) not yet taken, or None. Never blocks.

        The tensors may be views of receive buffers that are reused once the *next* version is taken: copy them
        into the model (as `engine.load_weights` does) before calling take_latest/wait_for_version again.
        """
        self.check()
        with self._cond:
            return self._hand_over()

    def _hand_over(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        latest, self._latest = self._latest, None
        if latest is not None:
            self._pool.release(self._handed_bufs)
            self._handed_bufs, self._latest_bufs = self._latest_bufs, None
        return latest

    def wait_for_version(self, version: int, timeout_s: float) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Block until a version >= `version` is staged (then take it) or the timeout passes (None)."""
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None
                                or (self._latest is not None and self._latest[0] >= version), timeout_s)
        self.check()
        with self._cond:
            if self._latest is None or self._latest[0] < version:
                return None
            return self._hand_over()

    def check(self) -> None:
        """Re-raise, in the caller's thread, an exception that stopped the background thread."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._member = None

    def _run(self) -> None:
        subscriber = ControlSubscriber(self.cfg.sync_control_address)
        try:
            while not self._stop.is_set():
                if self._member is None and not self._rejoin_sent:
                    self._rejoin_sent = request_rejoin(self.cfg, self.rank)
                try:
                    announcement = subscriber.recv(timeout_s=0.2)
                except WireError as exc:  # a malformed announcement is skipped, never fatal
                    self.rejected += 1
                    logger.warning("weight receiver %d: announcement rejected (%s)", self.rank, exc)
                    continue
                if announcement is not None:
                    self._handle(announcement)
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread by check(), not swallowed
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            subscriber.close()

    def _handle(self, ann: WeightAnnouncement) -> None:
        member = self._member.name if self._member is not None else None
        if ann.group_name != member:
            if not ann.buckets:
                self._join(ann)
            return
        if not ann.buckets:
            return  # a repeated invitation of the group we are already in
        with self._cond:
            bufs = self._pool.acquire(self._flat_sizes(ann), self._member.transport)
        try:
            state = self._receive(ann, bufs)
            # Every version received is confirmed, a re-sent one too: the sender counts members, not versions.
            acknowledge(self._member.store, self.cfg.sync_group_name, ann.group_name, ann.version, [self.rank])
        except RuntimeError as exc:  # sender dropped the group, timed out, or has gone: wait for an invitation
            logger.warning("weight receiver %d: version %d on %s failed (%s)", self.rank, ann.version,
                           ann.group_name, exc)
            _report_failure(self._member.store, self.cfg.sync_group_name, ann, [self.rank])
            self.failures += 1
            self._member = None
            self._rejoin_sent = False
            with self._cond:
                self._pool.release(bufs)
            return
        with self._cond:
            # The learner sends its current version, which only goes down when it resumed from an older
            # checkpoint: then the older weights are the policy again and must be staged too.
            if ann.version != self._newest_version:
                self._newest_version = ann.version
                self._pool.release(self._latest_bufs)  # a staged version nobody took is superseded
                self._latest, self._latest_bufs = (ann.version, state), bufs
                self._cond.notify_all()
            else:
                self._pool.release(bufs)

    @staticmethod
    def _flat_sizes(ann: WeightAnnouncement) -> list[int]:
        return [flat_offsets(bucket)[1] for bucket in ann.buckets] if ann.layout == "flat" else []

    def _join(self, ann: WeightAnnouncement) -> None:
        if self.rank >= ann.world_size:
            raise ValueError(f"weight receiver rank {self.rank} is outside the group's world size {ann.world_size}")
        self._member = None
        try:
            store = connect_store(self.cfg.sync_address, self.cfg.sync_timeout_s, is_master=False)
            if not is_current(store, self.cfg.sync_group_name, ann.group_name):
                return  # a stale invitation: the sender has moved on to another generation
            transport = transport_device(ann.layout, self.device)
            group = self._group_factory(store, ann.group_name, self.rank, ann.world_size, self.cfg.sync_timeout_s,
                                        transport)
            # The rejoin request is answered before the join is confirmed: a sender that sees a raised flag on
            # a formed group would rebuild it.
            write_rejoin_flag(store, self.cfg.sync_group_name, self.rank, wanted=False)
            confirm_joined(store, self.cfg.sync_group_name, ann.group_name, [self.rank])
        except RuntimeError as exc:  # the group did not complete in time, or the learner has gone
            logger.warning("weight receiver %d: joining %s failed (%s)", self.rank, ann.group_name, exc)
            return
        self._member = _Membership(ann.group_name, group, store, transport)
        self.joins += 1

    def _receive(self, ann: WeightAnnouncement, bufs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        specs = [spec for bucket in ann.buckets for spec in bucket]
        for spec in specs:
            expected = self._template.get(spec.name)
            if expected is None or tuple(spec.shape) != expected[1]:
                raise ValueError(f"weight announcement: tensor {spec.name!r} {spec.shape} does not match the "
                                 f"receiver's model ({expected[1] if expected else 'absent'})")
        timeout = datetime.timedelta(seconds=self.cfg.sync_timeout_s)
        group = self._member.group
        received: dict[str, torch.Tensor] = {}
        works = []
        for i, bucket in enumerate(ann.buckets):
            if ann.layout == "flat":
                offsets, _ = flat_offsets(bucket)
                buf = bufs[i]
                works.append(group.broadcast(buf, 0, timeout))
                received.update(flat_views(bucket, offsets, buf))
            else:
                for spec in bucket:
                    tensor = torch.empty(spec.shape, dtype=dtype_from_name(spec.dtype),
                                         device=self._member.transport)
                    works.append(group.broadcast(tensor, 0, timeout))
                    received[spec.name] = tensor
        for work in works:
            work.wait()
        # No-ops (views stay views) when the wire dtype and the transport device already match the model's.
        return {name: t.to(device=self.device, dtype=self._template[name][0]) for name, t in received.items()}


class SGLangFollower:
    """Drives an SGLang engine from the learner's announcements; quacks like a WeightReceiver for the actor loop.

    The engine owns ranks rank_offset .. rank_offset + servers x tp - 1 of the group. Its
    `update_from_announcement(ann)` joins on an invitation (`/init_weights_update_group` on every server) and
    installs a version otherwise (`/update_weights_from_distributed` per bucket); it returns only when every
    server replied OK and raises (SGLangError) on any failure. SGLang installs weights itself, so
    take_latest/wait_for_version never hand back tensors: they return None and the loop reads
    engine.policy_version, which a successful update advances.
    """

    def __init__(self, cfg: Any, engine: Any):
        self.cfg = cfg.learner
        self.engine = engine
        first = engine.rank_offset
        self.ranks = range(first, first + len(engine.servers) * engine.tp_size)
        self._group: str | None = None
        self._store: torch.distributed.TCPStore | None = None
        self._rejoin_sent = False
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._updated = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sglang-weights", daemon=True)
        self.joins = 0
        """Groups the engine joined."""
        self.failures = 0
        """Joins or updates that failed (the membership was dropped and a rejoin requested)."""
        self.rejected = 0
        """Malformed announcements skipped."""

    def start(self) -> "SGLangFollower":
        self._thread.start()
        return self

    def _run(self) -> None:
        subscriber = ControlSubscriber(self.cfg.sync_control_address)
        try:
            while not self._stop.is_set():
                if self._group is None and not self._rejoin_sent:  # a (re)started engine holds no group
                    self._rejoin_sent = request_rejoin(self.cfg, self.ranks[0])
                try:
                    ann = subscriber.recv(timeout_s=0.2)
                except WireError as exc:
                    self.rejected += 1
                    logger.warning("sglang follower: announcement rejected (%s)", exc)
                    continue
                if ann is None:
                    continue
                if ann.buckets:
                    self._update(ann)
                else:
                    self._join(ann)
                with self._updated:
                    self._updated.notify_all()
        except Exception as exc:  # noqa: BLE001 - re-raised in the actor's main thread by check()
            self._error = exc
        finally:
            subscriber.close()

    def _join(self, ann: WeightAnnouncement) -> None:
        if ann.group_name == self._group:
            return  # the invitation repeats until every member joined; SGLang refuses a second init of a name
        if self.ranks[-1] >= ann.world_size:
            raise ValueError(f"sglang follower ranks {self.ranks.start}..{self.ranks[-1]} are outside the group's "
                             f"world size {ann.world_size}")
        self._group = None
        base = self.cfg.sync_group_name
        try:
            store = connect_store(self.cfg.sync_address, self.cfg.sync_timeout_s, is_master=False)
            if not is_current(store, base, ann.group_name):
                return  # a stale invitation: the sender has moved on to another generation
            self.engine.update_from_announcement(ann)
            write_rejoin_flag(store, base, self.ranks[0], wanted=False)  # a raised flag would rebuild the group
            confirm_joined(store, base, ann.group_name, self.ranks)
        except RuntimeError as exc:  # SGLangError (a server's reply was not OK) and store errors
            self._fail("joining", ann, exc)
            return
        self._group, self._store = ann.group_name, store
        self.joins += 1

    def _update(self, ann: WeightAnnouncement) -> None:
        if ann.group_name != self._group:
            return  # not a member: the sender misses this engine's acknowledgement and invites again
        try:  # also when the engine already has ann.version: every member takes part in every broadcast
            self.engine.update_from_announcement(ann)
            acknowledge(self._store, self.cfg.sync_group_name, ann.group_name, ann.version, self.ranks)
        except RuntimeError as exc:
            _report_failure(self._store, self.cfg.sync_group_name, ann, self.ranks)
            self._fail(f"version {ann.version} on", ann, exc)

    def _fail(self, what: str, ann: WeightAnnouncement, exc: BaseException) -> None:
        logger.warning("sglang follower: %s %s failed (%s); waiting for the next invitation", what, ann.group_name,
                       exc)
        self.failures += 1
        self._group, self._store = None, None
        self._rejoin_sent = False

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def take_latest(self) -> None:
        self.check()
        return None

    def wait_for_version(self, version: int, timeout_s: float) -> None:
        with self._updated:
            self._updated.wait_for(lambda: self.engine.policy_version >= version or self._error is not None,
                                   timeout_s)
        self.check()
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
