"""The learner's side of weight sync: `WeightSender` is rank 0 of the weight-update group.

    sender = WeightSender(cfg.learner, world_size, device, layout)      # learner/train.py: build_sender
    metrics = sender.broadcast(model, version)                          # perf/sync_ok: every member confirmed

The protocol both sides share (bucket plans, the process group, store keys, announcements) is in
`common.weight_protocol`; the receivers are in `actor.weight_receiver`; docs/ARCHITECTURE.md ("Weight sync")
describes the whole exchange and the SGLang contract it relies on. Per `broadcast(weights, version)`:

1. Formation. Without a group, a background thread constructs rank 0 of `<sync_group_name>_<session>_g<gen>`
   (`session` is random per sender, so a restarted learner never matches a group of its previous life), writes
   the name to `<base>/current`, and publishes an *invitation* (an announcement with `buckets=[]`) at once and
   every 0.5 s. The group counts as formed only when every member rank 1..W-1 has written its join key
   (`<base>/<group>/joined/<rank>`), within `sync_timeout_s`: NCCL (and SGLang's servers) create the
   communicator lazily, so a constructor that returned says nothing about the others. The call waits at most
   `join_wait_s`; an incomplete group gives `perf/sync_ok = 0` and the formation goes on in the background (a
   failed one bumps the generation).
2. Delivery. Publish the data announcement, broadcast the buckets (`flat`: one uint8 tensor per bucket from two
   reused staging buffers; `per_tensor`: each tensor in its own dtype, what SGLang expects), then wait up to
   `sync_timeout_s` for every member's acknowledgement `<base>/<group>/ack/<version>/<rank>`, written only after
   it received (and, for SGLang, installed) every bucket. On NCCL a finished `work.wait()` only orders the
   stream, so the acknowledgements are what confirm delivery. Every member takes part in every broadcast on its
   group, also when it already holds that version (a re-send after a rebuild).
3. Failure. A collective error, or a missing acknowledgement: the group is dropped (an NCCL group is aborted),
   the generation bumped, `perf/sync_ok = 0`; the next version (or `Publisher.retry_if_behind`) forms a new one.
4. Rejoin requests: a receiver that (re)starts or loses its group raises `<base>/rejoin/<rank>` and takes it back
   once joined; a sender holding a complete group while a flag is raised rebuilds at its next broadcast.

The store serves on `learner.sync_address` only (not every interface); see docs/CLUSTER.md for what that leaves
exposed. NCCL needs NCCL_CUMEM_ENABLE=0 and NCCL_NVLS_ENABLE=0 before the process's first communicator
(`common.weight_protocol.prepare_nccl_environment`, checked when the sender is built).
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import threading
import time
from typing import Any, Mapping

import torch
import zmq

from common.config import LearnerConfig
from common.schemas import TensorSpec, WeightAnnouncement, encode_message
from common.weight_protocol import (ACK_FAILED, LAYOUTS, GroupFactory, ack_key, connect_store, current_key,
                                    flat_offsets, join_key, new_process_group, plan_buckets,
                                    prepare_nccl_environment, rejoin_key, transport_device, unique_named_tensors,
                                    wait_for_keys)

logger = logging.getLogger(__name__)

INVITE_PERIOD_S = 0.5


class _Formation:
    """One attempt to build a group generation in a background thread: construct rank 0, then wait (within the
    group timeout) until every member confirmed it joined. Invitations repeat until the attempt ends."""

    def __init__(self, build: Any, confirm: Any, invite: Any):
        self.done = threading.Event()
        self.group: Any = None
        self.error: BaseException | None = None
        self._build, self._confirm, self._invite = build, confirm, invite
        self._invite()  # at least once, even if construction returns at once (lazy NCCL)
        threading.Thread(target=self._run, name="weight-sync-form", daemon=True).start()
        threading.Thread(target=self._keep_inviting, name="weight-sync-invite", daemon=True).start()

    def _run(self) -> None:
        try:
            group = self._build()
            self._confirm()
            self.group = group
        except RuntimeError as exc:  # gloo/NCCL/store timeouts and connection errors are RuntimeErrors
            self.error = exc
        finally:
            self.done.set()

    def _keep_inviting(self) -> None:
        while not self.done.wait(INVITE_PERIOD_S):
            self._invite()


class WeightSender:
    """Rank 0 of the weight-update group; `broadcast(model_or_state_dict, version) -> metrics`."""

    def __init__(self, learner_cfg: LearnerConfig, world_size: int, device: torch.device | str,
                 layout: str = "flat", *, wire_dtype: torch.dtype | None = None, join_wait_s: float | None = None,
                 group_factory: GroupFactory = new_process_group):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        self.cfg = learner_cfg
        self.base = learner_cfg.sync_group_name
        self.world_size = world_size
        self.device = torch.device(device)
        self.layout = layout
        self.transport = transport_device(layout, self.device)
        if self.transport.type == "cuda":  # before any NCCL communicator of ours: checked at start-up, not later
            prepare_nccl_environment(os.environ, torch.distributed.is_initialized())
        self.wire_dtype = wire_dtype
        self.join_wait_s = learner_cfg.sync_timeout_s if join_wait_s is None else join_wait_s
        self.generation = 0
        self.last_version = -1
        self._group_factory = group_factory
        self._session = secrets.token_hex(4)
        self._store = connect_store(learner_cfg.sync_address, learner_cfg.sync_timeout_s, is_master=True)
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.bind(learner_cfg.sync_control_address)
        self._pub_lock = threading.Lock()
        self._group: Any = None
        self._formation: _Formation | None = None
        self._staging: list[torch.Tensor] = []

    @property
    def group_name(self) -> str:
        return f"{self.base}_{self._session}_g{self.generation}"

    @property
    def members(self) -> range:
        return range(1, self.world_size)

    def broadcast(self, weights: torch.nn.Module | Mapping[str, torch.Tensor], version: int,
                  join_wait_s: float | None = None) -> dict[str, float]:
        """Send `weights` as `version` to every member; `perf/sync_ok` is 1 only when every member confirmed it.

        Blocks at most join_wait_s (forming) + sync_timeout_s (delivery); `join_wait_s` overrides the first
        (a short wait suits retries from an idle loop)."""
        start = time.perf_counter()
        self.last_version = version
        named = unique_named_tensors(weights, self.wire_dtype)
        buckets = plan_buckets(named, self.cfg.sync_bucket_mb * 1024 * 1024)
        group = self._ensure_group(version, self.join_wait_s if join_wait_s is None else join_wait_s)
        ok = group is not None and self._send_version(group, named, buckets, version)
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        elapsed = time.perf_counter() - start
        return {"time/sync_s": elapsed, "perf/sync_ok": float(ok), "perf/sync_generation": self.generation,
                "perf/sync_bytes": nbytes, "perf/sync_gb_per_s": nbytes / 1e9 / elapsed if ok else 0.0}

    def rejoin_requested(self) -> bool:
        """Whether a receiver rank has asked to (re)join and not joined since (`request_rejoin`)."""
        return any(int(self._store.add(rejoin_key(self.base, rank), 0)) > 0 for rank in self.members)

    def _ensure_group(self, version: int, join_wait_s: float) -> Any:
        if self._group is not None and self.rejoin_requested():
            logger.info("weight sync: a receiver asked to rejoin; rebuilding %s", self.group_name)
            self.abandon_group()
        if self._group is not None:
            return self._group
        if self._formation is None:
            self._formation = self._start_formation(version)
        if not self._formation.done.wait(join_wait_s):
            logger.warning("weight sync: group %s incomplete after %.1f s; training on, retrying later",
                           self.group_name, join_wait_s)
            return None
        formation, self._formation = self._formation, None
        if formation.error is not None:
            logger.warning("weight sync: forming %s failed (%s); next version uses a new generation",
                           self.group_name, formation.error)
            self.generation += 1
            return None
        self._group = formation.group
        return self._group

    def _start_formation(self, version: int) -> _Formation:
        name = self.group_name
        self._store.set(current_key(self.base), name)
        invitation = WeightAnnouncement(version=version, group_name=name, generation=self.generation,
                                        world_size=self.world_size, layout=self.layout, buckets=[])
        timeout_s = self.cfg.sync_timeout_s
        # A connection of the formation's own: a blocking store call in its thread (gloo's rendezvous) would stall
        # the learner's calls on the sender's connection.
        store = connect_store(self.cfg.sync_address, timeout_s, is_master=False)

        def confirm() -> None:  # within the group timeout, counted from the start of the formation
            keys = [join_key(self.base, name, rank) for rank in self.members]
            missing = wait_for_keys(store, keys, max(deadline - time.monotonic(), 0.0))
            if missing:
                raise RuntimeError(f"members did not join {name} within {timeout_s:.1f} s: {missing}")
            for key in keys:
                store.delete_key(key)

        deadline = time.monotonic() + timeout_s
        return _Formation(
            build=lambda: self._group_factory(store, name, 0, self.world_size, timeout_s, self.transport),
            confirm=confirm, invite=lambda: self._publish(invitation))

    def _publish(self, announcement: WeightAnnouncement) -> None:
        with self._pub_lock:
            if not self._pub.closed:  # an invitation thread may outlive close()
                self._pub.send(encode_message(announcement))

    def _send_version(self, group: Any, named: list[tuple[str, torch.Tensor]], buckets: list[list[TensorSpec]],
                      version: int) -> bool:
        name = self.group_name
        acks = [ack_key(self.base, name, version, rank) for rank in self.members]
        for key in acks:  # a version re-sent on the same group needs fresh confirmations
            self._store.delete_key(key)
        self._publish(WeightAnnouncement(version=version, group_name=name, generation=self.generation,
                                         world_size=self.world_size, layout=self.layout, buckets=buckets))
        deadline = time.monotonic() + self.cfg.sync_timeout_s
        tensors = dict(named)
        try:
            if self.layout == "flat":
                self._send_flat(group, tensors, buckets)
            else:
                self._send_per_tensor(group, tensors, buckets)
        except RuntimeError as exc:  # a member died or timed out: the collective failed
            logger.warning("weight sync: version %d on %s failed (%s); rebuilding the group", version, name, exc)
            self.abandon_group()
            return False
        missing = wait_for_keys(self._store, acks, max(deadline - time.monotonic(), 0.0), stop_on=ACK_FAILED)
        if missing:  # alive or not, these members did not receive (or install) the version
            logger.warning("weight sync: version %d on %s not confirmed (within %.1f s) by %s; rebuilding the group",
                           version, name, self.cfg.sync_timeout_s, missing)
            self.abandon_group()
            return False
        for key in acks:
            self._store.delete_key(key)
        return True

    def _send_flat(self, group: Any, tensors: dict[str, torch.Tensor], buckets: list[list[TensorSpec]]) -> None:
        # Two staging buffers: bucket i+1 is packed while bucket i is on the wire.
        works: list[Any] = [None, None]
        timeout = datetime.timedelta(seconds=self.cfg.sync_timeout_s)
        for i, bucket in enumerate(buckets):
            offsets, total = flat_offsets(bucket)
            slot = i % 2
            if works[slot] is not None:
                works[slot].wait(timeout)
            buf = self._staging_buffer(slot, total)
            for spec, offset in zip(bucket, offsets):
                src = tensors[spec.name].reshape(-1)
                buf[offset:offset + src.numel() * src.element_size()].view(src.dtype).copy_(src)
            works[slot] = group.broadcast(buf, 0, timeout)
        for work in works:
            if work is not None:
                work.wait(timeout)

    def _staging_buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        while len(self._staging) <= slot:
            self._staging.append(torch.empty(0, dtype=torch.uint8, device=self.transport))
        if self._staging[slot].numel() < nbytes:
            self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.transport)
        return self._staging[slot][:nbytes]

    def _send_per_tensor(self, group: Any, tensors: dict[str, torch.Tensor],
                         buckets: list[list[TensorSpec]]) -> None:
        timeout = datetime.timedelta(seconds=self.cfg.sync_timeout_s)
        for bucket in buckets:
            works = [group.broadcast(tensors[spec.name].to(self.transport).contiguous(), 0, timeout)
                     for spec in bucket]
            for work in works:
                work.wait(timeout)

    def abandon_group(self) -> None:
        """Drop the current group (its sockets close, so live receivers fail fast) and move to a new generation."""
        if self._group is not None:
            group, self._group = self._group, None
            self.generation += 1
            if self.transport.type == "cuda":  # a hung NCCL collective would block the stream forever
                group.abort()

    def close(self) -> None:
        self._group = None
        with self._pub_lock:
            self._pub.close(linger=0)
        self._ctx.term()
        self._store = None


