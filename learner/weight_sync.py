"""Weight broadcast from the learner (rank 0) to the actors (ranks 1..K): both sides of one protocol.

The learner owns a `WeightSender`; each HF actor runs a `WeightReceiver` in a background thread; SGLang actors
follow the announcements with a `ControlSubscriber` and let SGLang join the same group over HTTP.

Transport. A dedicated process group, never the learner's WORLD, built the way SGLang's
`init_custom_process_group` builds its weight-update group, so SGLang engines can join it unchanged: a TCPStore
rendezvous at `learner.sync_address` (the learner is the store master), the store chain
PrefixStore(name) -> PrefixStore(name + "/") -> PrefixStore(device + "/") that torch's group helper creates, and
a process-group object constructed directly: ProcessGroupNCCL (with NCCL_CUMEM_ENABLE=0 and NCCL_NVLS_ENABLE=0)
for the per-tensor layout between GPUs (SGLang), ProcessGroupGloo over CPU memory otherwise — flat buckets for HF
engines always go over gloo, since an HF actor may share the learner's GPU and NCCL cannot put two ranks of one
communicator on one device (`transport_device`); GPU-resident weights are packed into CPU staging buffers. `init_process_group`/`new_group` are not used: they need every
process in one WORLD and hang when a member is missing. ZeroMQ carries only the control messages
(`common.schemas.WeightAnnouncement`, MessagePack) on a PUB socket at `learner.sync_control_address`.

Group names and generations. The group is named `<sync_group_name>_<session>_g<generation>`; `session` is random
per sender, so a restarted learner never matches a group of its previous life. The sender writes the current name
into its TCPStore under `<sync_group_name>/current`; receivers ignore invitations for any other name, so a queue
of stale invitations cannot send them into a dead group.

Protocol, per `WeightSender.broadcast(weights, version)`:
1. No complete group: start forming generation g in a background thread (constructor timeout =
   `sync_timeout_s`) and publish an *invitation* — an announcement with `buckets=[]` — every 0.5 s while it forms,
   so a receiver that subscribes late still sees one. Each receiver that sees an invitation for the current name
   (re)joins at its fixed rank. The sender waits at most `join_wait_s` (default `sync_timeout_s`) in this call;
   if the group is still incomplete it returns `perf/sync_ok = 0` and the learner keeps training; the formation
   goes on in the background and the next version retries. A formation that fails (timeout) bumps g.
2. Complete group: publish the data announcement (version, name, generation, world size, layout, buckets of
   <= `sync_bucket_mb`), then broadcast the buckets in order. `flat`: each bucket is one uint8 tensor holding the
   bucket's tensors back to back (64-byte aligned), packed into one of two reused staging buffers while the
   previous bucket is on the wire. `per_tensor`: each tensor of a bucket is broadcast on its own, in order, in its
   own dtype (what SGLang's `update_weights_from_distributed` expects).
3. Any collective error or timeout (a receiver died or hung): the sender drops the group, g += 1, returns
   `perf/sync_ok = 0`; step 1 rebuilds at the next version. Live receivers of the dropped group see their receive
   fail (connection closed, or their own `sync_timeout_s`), leave it, and follow the next invitation; a restarted
   actor joins the same way. So the learner never blocks longer than `sync_timeout_s` per attempt, and a receiver
   that joins late gets the next version after it joined.
4. Rejoin requests: a receiver that (re)starts or loses its group raises the store counter
   `<sync_group_name>/rejoin/<rank>` (`request_rejoin`) and takes it back once it has joined a group. A sender that
   holds a complete group while some rank's counter is non-zero drops that group at its next broadcast, and the
   learner checks the counters while it waits for a batch (`rejoin_requested`), so the current version is
   re-sent. Without it a receiver killed right after a broadcast that still completed on the sender's side leaves
   the sender holding a group it believes whole: the restarted actor waits for weights, the learner for its
   groups, and no new version ever comes.

Receivers stage every version in pooled receive buffers (never the live model; the staged tensors are views of
the flat buckets, so there is no unpacking copy); `take_latest()` hands the newest complete version to the engine,
which copies it in at a batch boundary. A taken version stays valid until the next take. Tied weights are sent once (the first name of a
shared storage); the receiver's model re-ties them.

Not run here (CPU-only machine): the NCCL path and SGLang engines joining the group; the code builds them the
same way as gloo. One GPU cannot show NCCL (it needs two devices); `tests/test_weight_sync.py` has a `gpu` test
of GPU-resident learner weights reaching a GPU receiver through the gloo path.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import msgspec
import torch
import zmq

from common.addresses import split_endpoint
from common.config import LearnerConfig
from common.schemas import SCHEMA_VERSION, TensorSpec, WeightAnnouncement, WireError, encode_message

logger = logging.getLogger(__name__)

_ALIGN = 64
"""Byte alignment of each tensor inside a flat bucket, so every dtype can be viewed in place."""
_INVITE_PERIOD_S = 0.5
_LAYOUTS = ("flat", "per_tensor")


# ---------------------------------------------------------------------------------------------- shared helpers


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WireError("bad_dtype", f"buckets.dtype: unknown dtype {name!r}")
    return dtype


def _nbytes(spec: TensorSpec) -> int:
    numel = 1
    for dim in spec.shape:
        numel *= dim
    return numel * dtype_from_name(spec.dtype).itemsize


def flat_offsets(bucket: list[TensorSpec]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a flat bucket and the bucket's total bytes (both sides use this)."""
    offsets, cursor = [], 0
    for spec in bucket:
        offsets.append(cursor)
        cursor += -(-_nbytes(spec) // _ALIGN) * _ALIGN
    return offsets, cursor


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into buckets of <= bucket_bytes (a larger tensor gets a bucket of its own)."""
    buckets: list[list[TensorSpec]] = [[]]
    used = 0
    for name, tensor in named:
        spec = TensorSpec(name=name, dtype=dtype_name(tensor.dtype), shape=list(tensor.shape))
        size = flat_offsets([spec])[1]
        if buckets[-1] and used + size > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(spec)
        used += size
    return [b for b in buckets if b]


def unique_named_tensors(weights: torch.nn.Module | Mapping[str, torch.Tensor],
                         wire_dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, detached tensor) in state-dict order, each storage once (tied weights go under their first name)."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    out = []
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        tensor = tensor.detach()
        if wire_dtype is not None and tensor.is_floating_point() and tensor.dtype != wire_dtype:
            tensor = tensor.to(wire_dtype)
        out.append((name, tensor))
    return out


def new_process_group(store: torch.distributed.Store, group_name: str, rank: int, world_size: int,
                      timeout_s: float, device: torch.device) -> Any:
    """The weight-update process group, constructed directly on the store chain SGLang's helper uses."""
    timeout = datetime.timedelta(seconds=timeout_s)
    device_key = "cuda" if device.type == "cuda" else "cpu"
    prefix = torch.distributed.PrefixStore(
        f"{device_key}/", torch.distributed.PrefixStore(f"{group_name}/",
                                                        torch.distributed.PrefixStore(group_name, store)))
    if device.type == "cuda":
        # cuMem/NVLS allocations break NCCL communicators shared with a separate inference server process.
        os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        options = torch.distributed.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return torch.distributed.ProcessGroupNCCL(prefix, rank, world_size, options)
    return torch.distributed.ProcessGroupGloo(prefix, rank, world_size, timeout)


def transport_device(layout: str, device: torch.device) -> torch.device:
    """Where a group's buffers live, which picks its backend: NCCL for the per-tensor layout between GPUs
    (SGLang engines run on GPUs of their own), gloo from CPU memory for flat buckets (HF engines), because an HF
    actor may share the learner's GPU and NCCL cannot place two ranks of one communicator on one device."""
    return device if (layout == "per_tensor" and device.type == "cuda") else torch.device("cpu")


def _connect_store(sync_address: str, timeout_s: float, is_master: bool) -> torch.distributed.TCPStore:
    _, host, port = split_endpoint(sync_address)
    return torch.distributed.TCPStore(host, port, None, is_master, datetime.timedelta(seconds=timeout_s),
                                      wait_for_workers=False)


def _current_key(base_name: str) -> str:
    return f"{base_name}/current"


def _rejoin_key(base_name: str, rank: int) -> str:
    return f"{base_name}/rejoin/{rank}"


REJOIN_CONNECT_TIMEOUT_S = 5.0


def request_rejoin(learner_cfg: LearnerConfig, rank: int, wanted: bool = True) -> bool:
    """Ask the sender to rebuild its group and re-send its current version, or (wanted=False, once joined) take
    the request back. False: the store did not answer (the learner is not up yet, or has gone).

    A receiver that (re)starts, or whose receive failed, asks: a sender whose last broadcast completed into the
    socket buffers of a receiver that then died still holds a group it believes whole, and while the learner
    waits for groups no new version would ever reveal it.
    """
    _, host, port = split_endpoint(learner_cfg.sync_address)
    try:
        # A plain TCP probe first: while the learner is not up, TCPStore's own connect retries would fill the
        # actor's log with c10d errors and stack traces every few seconds.
        socket.create_connection((host, port), timeout=REJOIN_CONNECT_TIMEOUT_S).close()
    except OSError:
        return False
    try:
        store = _connect_store(learner_cfg.sync_address, min(learner_cfg.sync_timeout_s, REJOIN_CONNECT_TIMEOUT_S),
                               is_master=False)
        _write_rejoin_flag(store, learner_cfg.sync_group_name, rank, wanted)
    except RuntimeError as exc:
        logger.debug("weight sync: rank %d rejoin flag not written (%s)", rank, exc)
        return False
    return True


def _write_rejoin_flag(store: torch.distributed.Store, base_name: str, rank: int, wanted: bool) -> None:
    key = _rejoin_key(base_name, rank)
    store.add(key, 1 if wanted else -int(store.add(key, 0)))


# ---------------------------------------------------------------------------------------------- control channel


class ControlSubscriber:
    """SUB side of the announcement channel; `recv` returns the next WeightAnnouncement or None on timeout."""

    def __init__(self, address: str):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(address)
        self._decoder = msgspec.msgpack.Decoder(WeightAnnouncement)

    def recv(self, timeout_s: float) -> WeightAnnouncement | None:
        if not self._sock.poll(int(timeout_s * 1000)):
            return None
        data = self._sock.recv()
        try:
            ann = self._decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise WireError("invalid", f"weight announcement: {exc}") from None
        if ann.schema != SCHEMA_VERSION:
            raise WireError("schema_version", f"schema: version {ann.schema} is not supported")
        return ann

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


# ---------------------------------------------------------------------------------------------- sender


class _Formation:
    """One attempt to build a group generation in a background thread (bounded by the group timeout)."""

    def __init__(self, build: Any, invite: Any):
        self.done = threading.Event()
        self.group: Any = None
        self.error: BaseException | None = None
        self._build, self._invite = build, invite
        threading.Thread(target=self._run, name="weight-sync-form", daemon=True).start()
        threading.Thread(target=self._keep_inviting, name="weight-sync-invite", daemon=True).start()

    def _run(self) -> None:
        try:
            self.group = self._build()
        except RuntimeError as exc:  # gloo/NCCL/store timeouts and connection errors are RuntimeErrors
            self.error = exc
        finally:
            self.done.set()

    def _keep_inviting(self) -> None:
        while not self.done.is_set():
            self._invite()
            self.done.wait(_INVITE_PERIOD_S)


class WeightSender:
    """Rank 0 of the weight-update group; `broadcast(model_or_state_dict, version) -> metrics`."""

    def __init__(self, learner_cfg: LearnerConfig, world_size: int, device: torch.device | str,
                 layout: str = "flat", *, wire_dtype: torch.dtype | None = None, join_wait_s: float | None = None):
        if layout not in _LAYOUTS:
            raise ValueError(f"layout: must be one of {_LAYOUTS}, got {layout!r}")
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        self.cfg = learner_cfg
        self.world_size = world_size
        self.device = torch.device(device)
        self.layout = layout
        self.transport = transport_device(layout, self.device)
        self.wire_dtype = wire_dtype
        self.join_wait_s = learner_cfg.sync_timeout_s if join_wait_s is None else join_wait_s
        self.generation = 0
        self.last_version = -1
        self._session = secrets.token_hex(4)
        self._store = _connect_store(learner_cfg.sync_address, learner_cfg.sync_timeout_s, is_master=True)
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.bind(learner_cfg.sync_control_address)
        self._pub_lock = threading.Lock()
        self._group: Any = None
        self._formation: _Formation | None = None
        self._staging: list[torch.Tensor] = []

    @property
    def group_name(self) -> str:
        return f"{self.cfg.sync_group_name}_{self._session}_g{self.generation}"

    def broadcast(self, weights: torch.nn.Module | Mapping[str, torch.Tensor], version: int,
                  join_wait_s: float | None = None) -> dict[str, float]:
        """Send `weights` as `version` to every receiver; never blocks longer than sync_timeout_s.

        `join_wait_s` overrides how long to wait for an incomplete group to form (a short wait suits retries
        from an idle loop)."""
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
        base = self.cfg.sync_group_name
        return any(int(self._store.add(_rejoin_key(base, rank), 0)) > 0 for rank in range(1, self.world_size))

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
        self._store.set(_current_key(self.cfg.sync_group_name), name)
        invitation = WeightAnnouncement(version=version, group_name=name, generation=self.generation,
                                        world_size=self.world_size, layout=self.layout, buckets=[])
        return _Formation(
            build=lambda: new_process_group(self._store, name, 0, self.world_size, self.cfg.sync_timeout_s,
                                            self.transport),
            invite=lambda: self._publish(invitation))

    def _publish(self, announcement: WeightAnnouncement) -> None:
        with self._pub_lock:
            if not self._pub.closed:  # an invitation thread may outlive close()
                self._pub.send(encode_message(announcement))

    def _send_version(self, group: Any, named: list[tuple[str, torch.Tensor]], buckets: list[list[TensorSpec]],
                      version: int) -> bool:
        self._publish(WeightAnnouncement(version=version, group_name=self.group_name, generation=self.generation,
                                         world_size=self.world_size, layout=self.layout, buckets=buckets))
        tensors = dict(named)
        try:
            if self.layout == "flat":
                self._send_flat(group, tensors, buckets)
            else:
                self._send_per_tensor(group, tensors, buckets)
        except RuntimeError as exc:  # a receiver died or timed out: the collective failed
            logger.warning("weight sync: version %d on %s failed (%s); rebuilding the group", version,
                           self.group_name, exc)
            self.abandon_group()
            return False
        return True

    def _send_flat(self, group: Any, tensors: dict[str, torch.Tensor], buckets: list[list[TensorSpec]]) -> None:
        # Two staging buffers: bucket i+1 is packed while bucket i is on the wire.
        works: list[Any] = [None, None]
        timeout = datetime.timedelta(seconds=self.cfg.sync_timeout_s)
        for i, bucket in enumerate(buckets):
            offsets, total = flat_offsets(bucket)
            slot = i % 2
            if works[slot] is not None:
                works[slot].wait()
            buf = self._staging_buffer(slot, total)
            for spec, offset in zip(bucket, offsets):
                src = tensors[spec.name].reshape(-1)
                buf[offset:offset + src.numel() * src.element_size()].view(src.dtype).copy_(src)
            works[slot] = group.broadcast(buf, 0, timeout)
        for work in works:
            if work is not None:
                work.wait()

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
                work.wait()

    def abandon_group(self) -> None:
        """Drop the current group (its sockets close, so live receivers fail fast) and move to a new generation."""
        if self._group is not None:
            self._group = None
            self.generation += 1

    def close(self) -> None:
        self._group = None
        with self._pub_lock:
            self._pub.close(linger=0)
        self._ctx.term()
        self._store = None


# ---------------------------------------------------------------------------------------------- receiver


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


@dataclass
class _Membership:
    name: str
    group: Any
    store: torch.distributed.TCPStore
    transport: torch.device


class WeightReceiver:
    """Rank `rank` of the weight-update group: receives versions in a background thread into staging copies."""

    def __init__(self, learner_cfg: LearnerConfig, rank: int, template: Mapping[str, torch.Tensor],
                 device: torch.device | str):
        if rank < 1:
            raise ValueError(f"rank: receivers are ranks 1..K, got {rank}")
        self.cfg = learner_cfg
        self.rank = rank
        self.device = torch.device(device)
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
                announcement = subscriber.recv(timeout_s=0.2)
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
        except RuntimeError as exc:  # sender dropped the group or timed out: wait for the next invitation
            logger.warning("weight receiver %d: version %d on %s failed (%s)", self.rank, ann.version,
                           ann.group_name, exc)
            self._member = None
            self._rejoin_sent = False
            with self._cond:
                self._pool.release(bufs)
            return
        with self._cond:
            if ann.version > self._newest_version:
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
            store = _connect_store(self.cfg.sync_address, self.cfg.sync_timeout_s, is_master=False)
            key = _current_key(self.cfg.sync_group_name)
            if not store.check([key]) or store.get(key).decode() != ann.group_name:
                return  # a stale invitation: the sender has moved on to another generation
            transport = transport_device(ann.layout, self.device)
            group = new_process_group(store, ann.group_name, self.rank, ann.world_size, self.cfg.sync_timeout_s,
                                      transport)
        except RuntimeError as exc:  # the group did not complete in time; the sender will invite again
            logger.warning("weight receiver %d: joining %s failed (%s)", self.rank, ann.group_name, exc)
            return
        self._member = _Membership(ann.group_name, group, store, transport)
        try:  # joined: the rejoin request is answered (on the store connection the group already uses)
            _write_rejoin_flag(store, self.cfg.sync_group_name, self.rank, wanted=False)
        except RuntimeError as exc:  # the learner has gone; the next sender starts with no flags
            logger.debug("weight receiver %d: rejoin flag not cleared (%s)", self.rank, exc)
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
                received.update(_views(bucket, offsets, buf))
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


def _views(bucket: Iterable[TensorSpec], offsets: list[int], buf: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for spec, offset in zip(bucket, offsets):
        dtype = dtype_from_name(spec.dtype)
        numel = _nbytes(spec) // dtype.itemsize
        out[spec.name] = buf[offset:offset + numel * dtype.itemsize].view(dtype).view(spec.shape)
    return out
