"""The learner process: fetch a batch from the buffer, train one step, broadcast the weights, report the version.

    python -m learner.train --config-file runs/x/config.json --run-dir runs/x [--resume] [--section.field VALUE]

Loop: fetch exactly `learner.groups_per_step` groups (a long poll; the wait is the learner's idle time) ->
`learner.step.train_step` -> version += 1 -> broadcast weights V to the actors -> report V to the buffer (in
that order: docs/INTERFACES.md) -> metrics -> checkpoint every `learner.checkpoint_every` steps (with a buffer
snapshot). Held-out evaluation is not done here: the buffer posts it for the reported versions and the actors
run it on their engines (buffer/evaluation.py), so training never stops for it. After
`learner.total_steps` it checkpoints and exits 0; SIGTERM/SIGINT finish the current step, checkpoint, ask the
buffer to snapshot, and exit 0. A buffer that stops answering is met with a checkpoint first, then a wait for it
to come back (SIGTERM then exits 0); a restarted buffer is told the learner's version at once
(learner/buffer_link.py). `--resume` continues from <run_dir>/checkpoints with the same version numbering
and first re-broadcasts the resumed weights so actors catch up.

Data parallel under torchrun (WORLD_SIZE > 1; run on CPU gloo ranks only): every rank builds the model,
global rank 0 alone talks to the buffer, broadcasts each batch (msgpack bytes) to the other ranks, owns the
`WeightSender`, writes checkpoints and metrics; gradients are summed across ranks inside `learner.step`. With a
sharded (DTensor) model the other ranks take part in every weight broadcast, which gathers the model bucket by
bucket (`learner.weight_sync.ShardGatherer`; a re-send from the fetch wait reaches them through `share_batch`).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from common.config import Config, config_to_dict, parse_cli
from common.metrics import MetricsLogger
from common.schemas import Batch, decode_message, encode_message
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.step import LearnerState, build_state, train_step

logger = logging.getLogger("learner")

FETCH_WAIT_S = 1.0
"""Long poll: the buffer holds a fetch up to this long and answers the moment a step's groups are queued, so the
learner never sleeps past their arrival; between two holds it re-sends missed weights (`on_wait`)."""
FETCH_RETRY_PAUSE_S = 0.005
"""Pause after an empty reply (it only comes back early if the buffer could not hold the request)."""
RESEND_WEIGHTS = -1
"""`share_batch`'s control word for "join a weight re-send now" (a sharded model is gathered by every rank)."""


class StopRequested:
    """Set by SIGTERM/SIGINT; the loop checks it between steps and while waiting for a batch."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.event.set())

    def __bool__(self) -> bool:
        return self.event.is_set()


def parse_args(argv: list[str] | None) -> tuple[Config, Path, bool]:
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--run-dir", required=True)
    own.add_argument("--resume", action="store_true")
    args, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(rest, description="The learner (--run-dir DIR [--resume]).")
    return cfg, Path(args.run_dir), args.resume


def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed when launched by torchrun.

    Local rank r runs on GPU `learner.gpus[r]` (default r; common/layout.py refuses one an SGLang engine holds).
    Collectives time out after `learner.dist_timeout_s`: the other ranks wait in `share_batch` while rank 0 fetches,
    and a rank that died must not leave them waiting forever."""
    from common.layout import cuda_index, learner_gpu
    from common.models import resolve_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(resolve_device(cfg.learner.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", cuda_index(learner_gpu(cfg, local_rank)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.learner.dist_timeout_s))
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def build_learner(cfg: Config, run_dir: Path, resume: bool, device: torch.device) -> LearnerState:
    from common.models import load_model

    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(cfg.torch_threads("learner"))
    # float32 master weights whatever learner.dtype says: that is the autocast compute dtype (learner/step.py)
    model = load_model(cfg.run.model, dtype=torch.float32, device=device)
    sharded = dist.is_initialized() and dist.get_world_size() > 1 and cfg.learner.sharding == "fsdp"
    state = build_state(model, cfg.learner, sharded=sharded)  # FSDP2: learner/sharding.py
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        load_checkpoint(checkpoint, state, collective=state.sharded)
        logger.info("resumed from %s at version %d", checkpoint, state.version)
    elif resume:
        logger.warning("--resume: no checkpoint in %s; starting at version 0", run_dir)
    return state


def build_sender(cfg: Config, device: torch.device) -> Any:
    """The weight sender, sized for the configured actors (SGLang engines take one rank per TP shard)."""
    from learner.weight_sync import WeightSender

    from common.layout import plan_layout

    plan = plan_layout(cfg)
    world_size, layout = plan.world_size, plan.weight_layout
    return WeightSender(cfg.learner, world_size, device, layout, wire_dtype=wire_dtype(cfg))


def wire_dtype(cfg: Config) -> torch.dtype:
    """Weights ship in the engine's dtype: half the bytes for bf16 engines, and they would cast anyway. A sharded
    model's ranks gather in it too, so the sender and `build_follower` must use the same one."""
    return getattr(torch, cfg.actor.dtype)


def build_follower(cfg: Config, device: torch.device) -> Any:
    """A rank > 0 of a sharded model: its part (the gathers) of each weight broadcast rank 0 sends."""
    from learner.weight_sync import ShardGatherer

    return ShardGatherer(cfg.learner, device, wire_dtype=wire_dtype(cfg))


def is_sharded(model: torch.nn.Module, world: int) -> bool:
    """Whether the weights live as DTensor shards over the learner's ranks, so every rank joins each broadcast."""
    from learner.weight_sync import has_dtensors

    return world > 1 and has_dtensors(model)


def fetch_batch(client: Any, cfg: Config, stop: StopRequested,
                on_wait: Callable[[], None] = lambda: None) -> tuple[Batch | None, float]:
    """Exactly groups_per_step groups (None if stopped) and the seconds spent waiting for them.

    `on_wait` runs between polls (the learner re-sends weights that did not reach every actor)."""
    start = time.perf_counter()
    while not stop:
        batch = client.fetch("learner", cfg.learner.groups_per_step, wait_s=FETCH_WAIT_S)
        if batch.groups:
            return batch, time.perf_counter() - start
        on_wait()
        if time.perf_counter() - start > cfg.learner.fetch_timeout_s:
            raise TimeoutError(f"no batch from the buffer for {cfg.learner.fetch_timeout_s:.0f} s "
                               f"(learner.fetch_timeout_s); buffer stats: {client.stats()}")
        stop.event.wait(FETCH_RETRY_PAUSE_S)
    return None, time.perf_counter() - start


def share_batch(batch: Batch | None, world: int, device: torch.device,
                on_resend: Callable[[], Any] | None = None) -> Batch | None:
    """Data parallel: rank 0's batch (or None = stop) to every rank, as msgpack bytes in a uint8 tensor.

    The control word first: the batch's size, 0 to stop, or RESEND_WEIGHTS (`request_resend`: rank 0 re-sends the
    weights of a sharded model from its fetch wait), on which the other ranks run `on_resend`, their part of that
    broadcast, and wait for the next word."""
    if world == 1:
        return batch
    payload = encode_message(batch) if (dist.get_rank() == 0 and batch is not None) else b""
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    size = torch.tensor([len(payload)], dtype=torch.long, device=comm_device)
    dist.broadcast(size, 0)
    while int(size) == RESEND_WEIGHTS:
        if on_resend is None:
            raise RuntimeError("share_batch: rank 0 asked for a weight re-send, but this rank has no sharded model")
        on_resend()
        dist.broadcast(size, 0)
    if int(size) < 0:
        raise RuntimeError(f"share_batch: control word {int(size)} from rank 0 is neither a size, 0 nor a re-send")
    if int(size) == 0:
        return None
    data = torch.empty(int(size), dtype=torch.uint8, device=comm_device)
    if dist.get_rank() == 0:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(data, 0)
    return decode_message(data.cpu().numpy().tobytes(), "reply")


def request_resend(device: torch.device) -> None:
    """Rank 0, in its fetch wait: wake the other ranks (waiting in `share_batch`) for a weight re-send."""
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    dist.broadcast(torch.tensor([RESEND_WEIGHTS], dtype=torch.long, device=comm_device), 0)


def connect_buffer(cfg: Config, run_dir: Path, state: LearnerState, stop: StopRequested) -> Any:
    """The lead's buffer connection: a buffer that stops answering is met with a checkpoint first, then a wait
    for it (or a clean stop on SIGTERM), and a restarted one is told the learner's version at once."""
    from buffer.client import BufferClient
    from learner.buffer_link import BufferLink

    client = BufferClient.from_config(cfg.buffer, timeout_s=cfg.learner.buffer_timeout_s, secret=cfg.run.secret)
    return BufferLink(client, cfg, stop.event, version=lambda: state.version,
                      on_lost=lambda: checkpoint_on_loss(run_dir, state))


def checkpoint_on_loss(run_dir: Path, state: LearnerState) -> None:
    """Rank 0 alone, when the buffer is lost. A sharded model's other ranks wait in `share_batch` and cannot join
    a save; they checkpoint with rank 0 when the stop or the next step reaches them."""
    if state.sharded:
        logger.warning("buffer lost: a sharded learner checkpoints with all ranks at its next save, not now")
        return
    save_checkpoint(run_dir, state)


def checkpoint(state: LearnerState, run_dir: Path, client: Any) -> dict[str, float]:
    """Every rank of a sharded learner calls this (each writes its shards); rank 0 (`client`) asks for a snapshot."""
    start = time.perf_counter()
    path = save_checkpoint(run_dir, state, collective=state.sharded)
    if client is not None:
        note = client.snapshot()
        logger.info("checkpoint %s; buffer snapshot: %s", path, note)
    return {"time/checkpoint_s": time.perf_counter() - start}


class Publisher:
    """Broadcasts each new version, then reports it to the buffer (the order docs/INTERFACES.md fixes).

    A broadcast that did not reach every actor (a receiver died or has not joined yet, or a restarted receiver
    asked to rejoin) is retried from the fetch wait with a short join wait: actors only generate with weights at
    least as new as the reported version, so without the retry a missed version would leave them waiting while the
    learner waits for their groups. A version counts as delivered (`perf/sync_ok` = 1) only when every member of
    the weight group acknowledged it; a re-send of a version the actors already hold is taken part in like any
    other, so the retry after a rebuild completes. With a sharded model every rank joins a broadcast: after a step
    they are all in `run_step`; for a retry `wake_followers` (`request_resend`) calls them out of `share_batch`."""

    RETRY_EVERY_S = 2.0
    RETRY_JOIN_WAIT_S = 1.0

    def __init__(self, sender: Any, client: Any, wake_followers: Callable[[], None] | None = None):
        self.sender = sender
        self.client = client
        self.wake_followers = wake_followers
        self.synced_version = -1
        self._last_try = 0.0

    def publish(self, model: torch.nn.Module, version: int, rollback: bool = False) -> dict[str, float]:
        """rollback=True after resuming: the buffer may have seen newer versions than the checkpoint's."""
        metrics = self.sender.broadcast(model, version)
        self._record(metrics, version)
        self.client.report_version(version, rollback=rollback)
        return metrics

    def retry_if_behind(self, model: torch.nn.Module, version: int) -> None:
        """Re-send `version` if a broadcast missed an actor or a receiver asked to rejoin (at most every 2 s)."""
        if time.monotonic() - self._last_try < self.RETRY_EVERY_S:
            return
        self._last_try = time.monotonic()
        if self.synced_version >= version and not self.sender.rejoin_requested():
            return
        if self.wake_followers is not None:
            self.wake_followers()
        self._record(self.sender.broadcast(model, version, join_wait_s=self.RETRY_JOIN_WAIT_S), version)

    def _record(self, metrics: dict[str, float], version: int) -> None:
        self._last_try = time.monotonic()
        # A failed attempt marks `version` as not delivered, even if an earlier attempt had delivered it: a rebuild
        # started for a rejoin request has to be followed by a send once the group is complete, and by then the
        # receiver has taken its request back.
        self.synced_version = version if metrics.get("perf/sync_ok") else min(self.synced_version, version - 1)


def return_freed_heap() -> None:
    """Give the step's freed tensors back to the system (glibc's malloc_trim; a no-op on other C libraries).

    glibc raises its mmap threshold after the first large free, so a step's activations come from the heap and
    stay resident once freed: the cpu-demo learner held ~2.7 GB of them between steps. Trimming once per step
    costs ~1 s of page faults in the next step; a fixed low mmap threshold (MALLOC_MMAP_THRESHOLD_) would also
    lower the peak within a step by ~0.6 GB, but faults on every allocation (+4-6 s per ~21 s step)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # no glibc here
        pass


def run_step(state: LearnerState, batch: Batch, cfg: Config, publisher: Publisher | None,
             fetch_wait_s: float, follower: Any = None) -> dict[str, float]:
    """Train on one batch, broadcast version V, then report V; returns the step's metrics. A rank > 0 of a sharded
    model (`follower`) joins the broadcast's gathers."""
    start = time.perf_counter()
    metrics = train_step(state, batch, cfg)
    return_freed_heap()
    if publisher is not None:
        metrics.update(publisher.publish(state.model, state.version))
    elif follower is not None:
        follower.follow(state.model)
    step_s = time.perf_counter() - start
    metrics.update({"time/fetch_wait_s": fetch_wait_s, "time/step_s": step_s,
                    "time/idle_fraction": fetch_wait_s / (fetch_wait_s + step_s)})
    return metrics


def train_loop(cfg: Config, run_dir: Path, state: LearnerState, rank: int, world: int,
               device: torch.device, stop: StopRequested) -> None:
    lead = rank == 0
    client = connect_buffer(cfg, run_dir, state, stop) if lead else None
    sender = build_sender(cfg, device) if lead else None
    sharded = is_sharded(state.model, world)
    publisher = Publisher(sender, client, (lambda: request_resend(device)) if sharded else None) if lead else None
    follower = build_follower(cfg, device) if sharded and not lead else None
    on_resend = (lambda: follower.follow(state.model)) if follower is not None else None
    metrics_log = MetricsLogger(run_dir, "learner", cfg.run.wandb_mode, cfg.run.wandb_project,
                                config_to_dict(cfg)) if lead else None
    try:
        if follower is not None and state.version > 0:  # rank 0's re-broadcast of the resumed weights, below
            follower.follow(state.model)
        if lead:
            client.register("learner", "learner")
            if state.version > 0:  # resumed: actors may hold other weights, the buffer a newer version
                metrics_log.log(state.version, publisher.publish(state.model, state.version, rollback=True))
            else:  # actors start from the same initial weights
                publisher.synced_version = 0
        while state.version < cfg.learner.total_steps:  # a stop reaches every rank as rank 0's None batch
            batch, waited = (fetch_batch(client, cfg, stop, lambda: publisher.retry_if_behind(
                state.model, state.version)) if lead else (None, 0.0))
            batch = share_batch(batch, world, device, on_resend)
            if batch is None:
                break
            metrics = run_step(state, batch, cfg, publisher, waited, follower)
            every = cfg.learner.checkpoint_every
            due = bool(every) and state.version % every == 0 and (lead or state.sharded)
            saved = checkpoint(state, run_dir, client) if due else {}
            if not lead:
                continue
            metrics.update(client.take_metrics())
            metrics.update(saved)
            metrics_log.log(state.version, metrics)
            logger.info("step %d: loss %.4f reward %.3f (%.1f s, idle %.0f%%)", state.version,
                        metrics.get("loss/policy", float("nan")), metrics.get("reward/mean", float("nan")),
                        metrics["time/step_s"], 100 * metrics["time/idle_fraction"])
        if lead or state.sharded:
            checkpoint(state, run_dir, client)
    finally:
        for closable in (sender, client, metrics_log):
            if closable is not None:
                closable.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(levelname)s %(message)s")
    cfg, run_dir, resume = parse_args(argv)
    stop = StopRequested()
    rank, world, device = init_distributed(cfg)
    state = build_learner(cfg, run_dir, resume or bool(cfg.run.resume), device)
    train_loop(cfg, run_dir, state, rank, world, device, stop)
    logger.info("stopped at version %d (%s)", state.version, "signal" if stop else "total_steps reached")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
