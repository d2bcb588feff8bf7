"""The learner's side of weight sync: `WeightSender` is rank 0 of the weight-update group.

    sender = WeightSender(cfg.learner, world_size, device, layout)      # learner/train.py: build_sender
    metrics = sender.broadcast(model, version)                          # perf/sync_ok: every member confirmed
    ShardGatherer(cfg.learner, device).follow(model)                    # learner ranks > 0 of a sharded model

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
5. A sharded learner (FSDP2: parameters are DTensors sharded over the learner's ranks). The tensors are produced
   lazily, bucket by bucket in plan order, and a DTensor is gathered with `full_tensor()`, a collective of every
   learner rank; so rank 0 never holds more than one bucket of whole tensors beyond the one on the wire (`flat`:
   one tensor; `per_tensor`: two buckets), instead of the whole model. After formation rank 0 broadcasts one word
   over the learner's default group (`agree`): the version about to be sent, or SKIP when there is no group, so
   the other ranks (`ShardGatherer.follow`) run the same gather sequence, from the same plan, or none. A failed
   send still finishes the gather sequence, so the ranks stay in step.

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
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import zmq

from common.config import LearnerConfig
from common.schemas import TensorSpec, WeightAnnouncement, encode_message
from common.weight_protocol import (ACK_FAILED, LAYOUTS, GroupFactory, ack_key, bucket_specs, connect_store,
                                    current_key, dtype_from_name, dtype_name, flat_offsets, join_key,
                                    new_process_group, prepare_nccl_environment, rejoin_key, tensor_nbytes,
                                    transport_device, wait_for_keys)

logger = logging.getLogger(__name__)

INVITE_PERIOD_S = 0.5
SKIP = -1
"""The agreement's word for "no data send this time" (any other value is the version about to be sent)."""


class ShardGatherError(Exception):
    """A learner rank failed while gathering a sharded tensor: the learner's own process group is broken (not the
    weight-update group), so this is not a failed delivery to retry but a learner failure."""


@dataclass
class BroadcastPlan:
    """What one broadcast sends: the buckets as announced (wire dtype, global shapes) and where each tensor comes
    from (a plain tensor, or a DTensor shard that must be gathered). Computed from names, shapes and dtypes only,
    so every learner rank of a sharded model computes the same plan and the same gather order."""

    buckets: list[list[TensorSpec]]
    sources: dict[str, torch.Tensor]
    sharded: bool

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(spec) for bucket in self.buckets for spec in bucket)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def has_dtensors(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> bool:
    """Whether any tensor is a DTensor shard: its broadcast is then a collective of every learner rank."""
    tensors = weights.parameters() if isinstance(weights, torch.nn.Module) else weights.values()
    return any(_is_dtensor(tensor) for tensor in tensors)


def plan_broadcast(weights: torch.nn.Module | Mapping[str, torch.Tensor], wire_dtype: torch.dtype | None,
                   bucket_bytes: int) -> BroadcastPlan:
    """Each unique tensor in state-dict order (tied weights under their first name), floating-point ones in
    `wire_dtype`. A DTensor's `.shape` is its global shape; DTensors are told apart by identity (a module's tied
    parameter is one object), plain tensors by storage, so no rank reads data it does not hold."""
    state = weights.state_dict(keep_vars=True) if isinstance(weights, torch.nn.Module) else weights
    seen: set[tuple[Any, ...]] = set()
    specs, sources, sharded = [], {}, False
    for name, tensor in state.items():
        if _is_dtensor(tensor):
            key: tuple[Any, ...] = ("dtensor", id(tensor))
            sharded = True
        else:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        dtype = wire_dtype if (wire_dtype is not None and tensor.is_floating_point()) else tensor.dtype
        specs.append(TensorSpec(name=name, dtype=dtype_name(dtype), shape=list(tensor.shape)))
        sources[name] = tensor
    return BroadcastPlan(bucket_specs(specs, bucket_bytes), sources, sharded)


def whole_tensor(source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor in `dtype`: a plain tensor as it is (cast if needed); a DTensor shard is cast first (half the
    bytes gathered for a bf16 wire, and the cast is elementwise, so the result is the same) and then gathered with
    `full_tensor()`, a collective every rank of its mesh must join, on the mesh's device (a shard that FSDP's
    CPU offload keeps in host memory is moved there first: NCCL gathers only GPU tensors)."""
    with torch.no_grad():
        tensor = source.detach()
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if not _is_dtensor(tensor):
            return tensor
        if tensor.device.type != tensor.device_mesh.device_type:
            tensor = tensor.to(tensor.device_mesh.device_type)
        return tensor.full_tensor()


def whole_tensors(plan: BroadcastPlan) -> Iterator[torch.Tensor]:
    """The plan's tensors one at a time in bucket order (the gather sequence every learner rank runs)."""
    for bucket in plan.buckets:
        for spec in bucket:
            try:
                yield whole_tensor(plan.sources[spec.name], dtype_from_name(spec.dtype))
            except RuntimeError as exc:
                raise ShardGatherError(f"gathering {spec.name}: {exc}") from exc


def _control_device(device: torch.device) -> torch.device:
    """Where the default group's collectives take their tensors: NCCL needs the GPU, gloo the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


def agree(word: int, device: torch.device) -> int:
    """Rank 0's `word` (a version about to be sent, or SKIP) on every rank of the learner's default group."""
    control = torch.tensor([word], dtype=torch.long, device=_control_device(device))
    torch.distributed.broadcast(control, 0)
    return int(control)


class ShardGatherer:
    """A learner rank > 0 of a sharded model: takes part in rank 0's broadcasts by running the same gather
    sequence and discarding what it gathers (only rank 0 sends). `follow` must be called exactly where rank 0 calls
    `WeightSender.broadcast` with the same model."""

    def __init__(self, learner_cfg: LearnerConfig, device: torch.device | str,
                 wire_dtype: torch.dtype | None = None):
        self.bucket_bytes = learner_cfg.sync_bucket_mb * 1024 * 1024
        self.device = torch.device(device)
        self.wire_dtype = wire_dtype

    def follow(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> int | None:
        """Rank 0's decision, then (unless it skips) the gather sequence; the version gathered, or None."""
        word = agree(SKIP, self.device)
        if word == SKIP:
            return None
        for _ in whole_tensors(plan_broadcast(weights, self.wire_dtype, self.bucket_bytes)):
            pass
        return word


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
        (a short wait suits retries from an idle loop). Tensors are produced bucket by bucket as they are sent; a
        model with DTensor (FSDP2) parameters is gathered one tensor at a time, which every learner rank joins:
        the others call `ShardGatherer.follow` at the same point."""
        start = time.perf_counter()
        self.last_version = version
        plan = plan_broadcast(weights, self.wire_dtype, self.cfg.sync_bucket_mb * 1024 * 1024)
        group = self._ensure_group(version, self.join_wait_s if join_wait_s is None else join_wait_s)
        if plan.sharded:  # every learner rank gathers, so every rank must know whether a send happens now
            agree(SKIP if group is None else version, self.device)
        ok = group is not None and self._send_version(group, plan, version)
        nbytes = plan.nbytes
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

    def _send_version(self, group: Any, plan: BroadcastPlan, version: int) -> bool:
        name = self.group_name
        acks = [ack_key(self.base, name, version, rank) for rank in self.members]
        for key in acks:  # a version re-sent on the same group needs fresh confirmations
            self._store.delete_key(key)
        self._publish(WeightAnnouncement(version=version, group_name=name, generation=self.generation,
                                         world_size=self.world_size, layout=self.layout, buckets=plan.buckets))
        deadline = time.monotonic() + self.cfg.sync_timeout_s
        wholes = whole_tensors(plan)
        try:
            if self.layout == "flat":
                self._send_flat(group, wholes, plan.buckets)
            else:
                self._send_per_tensor(group, wholes, plan.buckets)
        except RuntimeError as exc:  # a member died or timed out: the collective failed
            logger.warning("weight sync: version %d on %s failed (%s); rebuilding the group", version, name, exc)
            self.abandon_group()
            for _ in wholes:  # the other learner ranks run the whole gather sequence: finish it with them
                pass
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

    def _send_flat(self, group: Any, wholes: Iterator[torch.Tensor], buckets: list[list[TensorSpec]]) -> None:
        # Two staging buffers: bucket i+1 is gathered and packed, one tensor at a time, while bucket i is on the wire.
        works: list[Any] = [None, None]
        timeout = datetime.timedelta(seconds=self.cfg.sync_timeout_s)
        for i, bucket in enumerate(buckets):
            offsets, total = flat_offsets(bucket)
            slot = i % 2
            if works[slot] is not None:
                works[slot].wait(timeout)
            buf = self._staging_buffer(slot, total)
            for offset in offsets:
                src = next(wholes).reshape(-1)
                buf[offset:offset + src.numel() * src.element_size()].view(src.dtype).copy_(src)
                del src  # before the next gather: one whole tensor alive at a time
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

    def _send_per_tensor(self, group: Any, wholes: Iterator[torch.Tensor],
                         buckets: list[list[TensorSpec]]) -> None:
        # Bucket i+1 is gathered while bucket i is on the wire: at most two buckets of whole tensors alive.
        timeout = datetime.timedelta(seconds=self.cfg.sync_timeout_s)
        works: list[Any] = []
        for bucket in buckets:
            tensors = [next(wholes).to(self.transport).contiguous() for _ in bucket]
            for work in works:
                work.wait(timeout)
            works = [group.broadcast(tensor, 0, timeout) for tensor in tensors]
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


