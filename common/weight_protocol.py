"""The weight-sync protocol both sides share: bucket plans, the process group, store keys, control channel.

The learner's `learner.weight_sync.WeightSender` is rank 0 of a weight-update group; the actors' receivers
(`actor.weight_receiver`) are ranks 1..W-1. This module holds what both sides must agree on byte for byte:
- bucket plans (`plan_buckets`, `flat_offsets`) and dtype names on the wire;
- the process group (`new_process_group`), built on the store chain SGLang's `init_custom_process_group` uses;
- the TCPStore the learner serves at `learner.sync_address` (`connect_store`; the master listens only on that
  address) and its keys: `<base>/current` (the group receivers may join), `<base>/rejoin/<rank>` (a receiver
  asks for a rebuild), `<base>/<group>/joined/<rank>` (a member confirms it holds the group) and
  `<base>/<group>/ack/<version>/<rank>` (a member confirms it received and installed a version: 1, or 0 when it
  failed there);
- the announcement channel (`ControlSubscriber`, ZeroMQ SUB of the learner's PUB).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from typing import Any, Callable, Iterable, Mapping, MutableMapping

import msgspec
import torch
import zmq

from common.addresses import split_endpoint
from common.config import LearnerConfig
from common.schemas import SCHEMA_VERSION, TensorSpec, WeightAnnouncement, WireError

logger = logging.getLogger(__name__)

ALIGN = 64
"""Byte alignment of each tensor inside a flat bucket, so every dtype can be viewed in place."""
LAYOUTS = ("flat", "per_tensor")
REJOIN_CONNECT_TIMEOUT_S = 5.0
NCCL_ENVIRONMENT = {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}
"""cuMem/NVLS allocations break NCCL communicators shared with a separate inference server process. NCCL reads
these once per process, when its first communicator is created."""

GroupFactory = Callable[[torch.distributed.Store, str, int, int, float, torch.device], Any]
"""(store, group name, rank, world size, timeout_s, transport device) -> process group."""


# ---------------------------------------------------------------------------------------------- bucket plans


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WireError("bad_dtype", f"buckets.dtype: unknown dtype {name!r}")
    return dtype


def tensor_nbytes(spec: TensorSpec) -> int:
    numel = 1
    for dim in spec.shape:
        numel *= dim
    return numel * dtype_from_name(spec.dtype).itemsize


def flat_offsets(bucket: list[TensorSpec]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a flat bucket and the bucket's total bytes (both sides use this)."""
    offsets, cursor = [], 0
    for spec in bucket:
        offsets.append(cursor)
        cursor += -(-tensor_nbytes(spec) // ALIGN) * ALIGN
    return offsets, cursor


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into buckets of <= bucket_bytes (a larger tensor gets a bucket of its own)."""
    return bucket_specs([TensorSpec(name=name, dtype=dtype_name(tensor.dtype), shape=list(tensor.shape))
                         for name, tensor in named], bucket_bytes)


def bucket_specs(specs: list[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """`plan_buckets` from names, dtypes and shapes alone (no tensor data needed: every rank of a sharded learner
    computes the same plan)."""
    buckets: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
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


def flat_views(bucket: Iterable[TensorSpec], offsets: list[int], buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a received flat bucket as views of its buffer (no copy)."""
    out = {}
    for spec, offset in zip(bucket, offsets):
        dtype = dtype_from_name(spec.dtype)
        numel = tensor_nbytes(spec) // dtype.itemsize
        out[spec.name] = buf[offset:offset + numel * dtype.itemsize].view(dtype).view(spec.shape)
    return out


# ---------------------------------------------------------------------------------------------- process group


def prepare_nccl_environment(environ: MutableMapping[str, str], communicator_may_exist: bool) -> None:
    """Set NCCL_ENVIRONMENT before this process creates its first NCCL communicator, or check it was set.

    Once a communicator may exist (a torchrun learner has a WORLD group), NCCL has read its environment and a
    change here would be ignored: the variables are then a launch requirement and their absence is an error."""
    for key, value in NCCL_ENVIRONMENT.items():
        if key not in environ and not communicator_may_exist:
            environ[key] = value
        if environ.get(key) != value:
            raise RuntimeError(f"{key}={environ.get(key, '<unset>')}: the NCCL weight-sync group needs {key}={value} "
                               "in the environment of every process before its first NCCL communicator exists "
                               "(set it where the learner is launched, e.g. before torchrun)")


def new_process_group(store: torch.distributed.Store, group_name: str, rank: int, world_size: int,
                      timeout_s: float, device: torch.device) -> Any:
    """The weight-update process group, constructed directly on the store chain SGLang's helper uses.

    Gloo's constructor is a rendezvous of every rank; NCCL's returns at once and forms its communicator at the
    first collective. Neither tells a member that the others arrived: the join keys do (`confirm_joined`)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    device_key = "cuda" if device.type == "cuda" else "cpu"
    prefix = torch.distributed.PrefixStore(
        f"{device_key}/", torch.distributed.PrefixStore(f"{group_name}/",
                                                        torch.distributed.PrefixStore(group_name, store)))
    if device.type == "cuda":
        prepare_nccl_environment(os.environ, torch.distributed.is_initialized())
        options = torch.distributed.ProcessGroupNCCL.Options()
        # Twice the protocol's timeout: a missing acknowledgement (after sync_timeout_s) aborts the group before
        # torch's watchdog would take the whole process down for a collective that never completed.
        options._timeout = 2 * timeout
        return torch.distributed.ProcessGroupNCCL(prefix, rank, world_size, options)
    return torch.distributed.ProcessGroupGloo(prefix, rank, world_size, timeout)


def transport_device(layout: str, device: torch.device) -> torch.device:
    """Where a group's buffers live, which picks its backend: NCCL for the per-tensor layout between GPUs
    (SGLang engines run on GPUs of their own), gloo from CPU memory for flat buckets (HF engines), because an HF
    actor may share the learner's GPU and NCCL cannot place two ranks of one communicator on one device."""
    return device if (layout == "per_tensor" and device.type == "cuda") else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- store


def connect_store(sync_address: str, timeout_s: float, is_master: bool) -> torch.distributed.TCPStore:
    """The learner's TCPStore (is_master: serve it) at host:port. The master listens only on that host's address:
    torch's own server would listen on every interface, so it is handed a socket bound here."""
    _, host, port = split_endpoint(sync_address)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not is_master:
        return torch.distributed.TCPStore(host, port, None, False, timeout, wait_for_workers=False)
    listener = socket.create_server((host, port), backlog=512)
    try:
        return torch.distributed.TCPStore(host, listener.getsockname()[1], None, True, timeout,
                                          wait_for_workers=False, master_listen_fd=listener.detach())
    finally:
        listener.close()  # a no-op once detached; closes the socket if the store could not take it


def current_key(base: str) -> str:
    return f"{base}/current"


def rejoin_key(base: str, rank: int) -> str:
    return f"{base}/rejoin/{rank}"


def join_key(base: str, group_name: str, rank: int) -> str:
    return f"{base}/{group_name}/joined/{rank}"


def ack_key(base: str, group_name: str, version: int, rank: int) -> str:
    return f"{base}/{group_name}/ack/{version}/{rank}"


def confirm_joined(store: torch.distributed.Store, base: str, group_name: str, ranks: Iterable[int]) -> None:
    for rank in ranks:
        store.set(join_key(base, group_name, rank), "1")


ACK_OK, ACK_FAILED = b"1", b"0"


def acknowledge(store: torch.distributed.Store, base: str, group_name: str, version: int,
                ranks: Iterable[int], ok: bool = True) -> None:
    """Confirm a version (ok) or report at once that it failed here, so the sender need not wait it out."""
    for rank in ranks:
        store.set(ack_key(base, group_name, version, rank), ACK_OK if ok else ACK_FAILED)


def wait_for_keys(store: torch.distributed.Store, keys: list[str], timeout_s: float, poll_s: float = 0.01,
                  stop_on: bytes | None = None) -> list[str]:
    """Wait until every key exists or timeout_s passes; returns the keys still missing (empty: all there).
    With `stop_on`, a key holding that value ends the wait at once and counts as missing.

    Polls `check` instead of `Store.wait`: a TCPStore client holds its connection for the whole of a `wait`, so
    another thread's store calls would stall behind it, and c10d logs every timed-out wait as a warning."""
    deadline = time.monotonic() + timeout_s
    pending = list(keys)
    while True:
        arrived = [key for key in pending if store.check([key])]
        pending = [key for key in pending if key not in arrived]
        failed = [key for key in arrived if stop_on is not None and store.get(key) == stop_on]
        if failed or not pending or time.monotonic() > deadline:
            return failed + pending
        time.sleep(poll_s)


def is_current(store: torch.distributed.Store, base: str, group_name: str) -> bool:
    """Whether `group_name` is the group the sender is forming or holds (an invitation may be stale)."""
    key = current_key(base)
    return bool(store.check([key])) and store.get(key).decode() == group_name


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
        store = connect_store(learner_cfg.sync_address, min(learner_cfg.sync_timeout_s, REJOIN_CONNECT_TIMEOUT_S),
                              is_master=False)
        write_rejoin_flag(store, learner_cfg.sync_group_name, rank, wanted)
    except RuntimeError as exc:
        logger.debug("weight sync: rank %d rejoin flag not written (%s)", rank, exc)
        return False
    return True


def write_rejoin_flag(store: torch.distributed.Store, base: str, rank: int, wanted: bool) -> None:
    key = rejoin_key(base, rank)
    store.add(key, 1 if wanted else -int(store.add(key, 0)))


# ---------------------------------------------------------------------------------------------- control channel

MAX_WORLD_SIZE = 65536
MAX_TENSOR_BYTES = 1 << 40


def check_announcement(ann: WeightAnnouncement) -> None:
    """Range-check what a receiver will act on; WireError names the first bad field."""
    if ann.version < 0:
        raise WireError("bad_version", f"version: must be >= 0, got {ann.version}")
    if not 2 <= ann.world_size <= MAX_WORLD_SIZE:
        raise WireError("bad_world_size", f"world_size: must be in [2, {MAX_WORLD_SIZE}], got {ann.world_size}")
    if ann.layout not in LAYOUTS:
        raise WireError("bad_layout", f"layout: must be one of {LAYOUTS}, got {ann.layout!r}")
    if not ann.group_name or "/" in ann.group_name:
        raise WireError("bad_group_name", f"group_name: must be non-empty without '/', got {ann.group_name!r}")
    for bucket in ann.buckets:
        for spec in bucket:
            if any(dim < 0 for dim in spec.shape):
                raise WireError("bad_shape", f"buckets.shape: {spec.name!r} has a negative dimension {spec.shape}")
            if tensor_nbytes(spec) > MAX_TENSOR_BYTES:
                raise WireError("bad_shape", f"buckets.shape: {spec.name!r} {spec.shape} is larger than 1 TiB")



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
        check_announcement(ann)
        return ann

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
