"""The lead learner's connection to the buffer, made to survive the buffer's death and restart.

`BufferLink` offers the buffer calls the learner makes (register, fetch, report_version, snapshot, stats) on top of
a `BufferClient`. A buffer that stops answering (`BufferTimeout` after the client's retries) is *lost*:

1. the learner checkpoints at once (`on_lost`), so no trained step depends on the buffer coming back;
2. it probes the buffer every PROBE_EVERY_S until it answers again (run_async.py restarts a dead buffer from its
   snapshot), until SIGTERM/SIGINT (then the call returns an empty answer and the training loop stops cleanly; its
   final checkpoint is the one just written), or until `learner.fetch_timeout_s` has passed (`BufferTimeout`);
3. it re-registers and reports its version at once, then repeats the call.

Every fetch names the newest group arrival the learner has consumed, so the restored buffer does not serve again
the groups it had served between its snapshot and its death.

A buffer restored from a snapshot is behind the learner: it would refuse the actors' groups made with newer
weights and keep no admission room until the learner's next report, which needs a batch first. So whenever a reply
shows the buffer's policy_version behind the learner's — after an outage, or after the client's own retries
reached a restarted buffer without the learner noticing — the learner reports its version again before going on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from buffer.client import BufferClient, BufferTimeout
from common.config import Config
from common.schemas import Batch

logger = logging.getLogger("learner")

PROBE_EVERY_S = 1.0
"""Pause between probes of a lost buffer (each probe waits PROBE_TIMEOUT_S for its answer)."""
PROBE_TIMEOUT_S = 1.0


class BufferLink:
    """Buffer calls of the lead learner that ride out a dead or restarted buffer (see the module docstring)."""

    def __init__(self, client: BufferClient, cfg: Config, stop: threading.Event, version: Callable[[], int],
                 on_lost: Callable[[], None], learner_id: str = "learner"):
        """`version()`: the learner's version now; `on_lost()`: checkpoint (called once per outage)."""
        self.client = client
        self.cfg = cfg
        self.stop = stop
        self.version = version
        self.on_lost = on_lost
        self.learner_id = learner_id
        self.lost = False
        """True while the buffer is lost and after a stop during the wait (no snapshot can be asked for then)."""
        self.outage_s = 0.0
        """Seconds spent waiting for a lost buffer since the last `take_metrics`."""
        self.reannounced = 0
        """Times the learner reported its version again to a buffer that was behind (cumulative)."""
        self.consumed_arrival = -1
        """Newest arrival id of a group this learner was served; sent with every fetch, so a buffer restored from a
        snapshot taken before it served that group does not serve it (or anything older) a second time."""

    # ------------------------------------------------------------------------------------------- buffer calls

    def register(self, role: str, client_id: str) -> int:
        return self._call(lambda: self.client.register(role, client_id), stopped=-1)

    def fetch(self, learner_id: str, n_groups: int, wait_s: float = 0.0) -> Batch:
        empty = Batch(groups=[], policy_version=-1)
        batch = self._call(lambda: self.client.fetch(learner_id, n_groups, wait_s=wait_s,
                                                     after_arrival=self.consumed_arrival), stopped=empty)
        self.consumed_arrival = max([self.consumed_arrival, *(g.arrival for g in batch.groups)])
        if 0 <= batch.policy_version < self.version():
            why = f"its version {batch.policy_version} is behind the learner's: restored from a snapshot"
            self._call(lambda: self.reannounce(why), stopped=None)
        return batch

    def report_version(self, version: int, rollback: bool = False) -> None:
        self._call(lambda: self.client.report_version(version, rollback=rollback), stopped=None)

    def snapshot(self) -> str:
        if self.lost:
            return "not asked: the buffer is lost"
        return self._call(self.client.snapshot, stopped="not asked: stopped while the buffer was lost")

    def stats(self) -> dict[str, Any]:
        return self._call(self.client.stats, stopped={})

    def close(self) -> None:
        self.client.close()

    def take_metrics(self) -> dict[str, float]:
        """`time/buffer_outage_s` since the last call and the cumulative re-announcement count."""
        metrics = {"time/buffer_outage_s": self.outage_s, "buffer/learner_reannounced": float(self.reannounced)}
        self.outage_s = 0.0
        return metrics

    # ------------------------------------------------------------------------------------------- recovery

    def reannounce(self, why: str) -> None:
        """Register again and report the learner's version (with rollback if the buffer is somehow ahead)."""
        version = self.version()
        buffer_version = reported = self.client.register("learner", self.learner_id)
        if reported > version:
            self.client.report_version(version, rollback=True)
        while reported < version:  # the buffer accepts at most buffer.max_version_jump per report
            reported = min(version, reported + self.cfg.buffer.max_version_jump)
            self.client.report_version(reported)
        self.reannounced += 1
        logger.warning("reported version %d to the buffer again (%s; the buffer was at %d)", version, why,
                       buffer_version)

    def _call(self, request: Callable[[], Any], stopped: Any) -> Any:
        """request(); if the buffer is lost, recover (checkpoint, wait, re-announce) and repeat it; `stopped`
        is the answer when a stop is requested while the buffer is lost."""
        while True:
            try:
                return request()
            except BufferTimeout as exc:
                if not self._recover(exc):
                    return stopped

    def _recover(self, exc: BufferTimeout) -> bool:
        """Checkpoint, wait for the buffer and re-announce; False if stopped while waiting."""
        if not self.lost:
            self.lost = True
            logger.warning("buffer lost (%s); checkpointing version %d before waiting for it", exc, self.version())
            self.on_lost()
            logger.warning("buffer lost: checkpointed version %d; waiting for the buffer to come back "
                           "(SIGTERM stops the learner cleanly)", self.version())
        start = time.monotonic()
        try:
            while True:
                if not self._wait_until_answering(start):
                    return False
                try:
                    self.reannounce("the buffer answers again after being lost")
                except BufferTimeout:
                    continue  # it died again at once: keep waiting
                self.lost = False
                return True
        finally:
            self.outage_s += time.monotonic() - start

    def _wait_until_answering(self, start: float) -> bool:
        """Probe until the buffer answers (True) or a stop is requested (False); BufferTimeout past the limit."""
        probe = BufferClient.from_config(self.cfg.buffer, timeout_s=PROBE_TIMEOUT_S)
        probe.retries = 0  # one short attempt per probe, so a stop request is seen within about a second
        try:
            while not self.stop.is_set():
                waited = time.monotonic() - start
                if waited > self.cfg.learner.fetch_timeout_s:
                    raise BufferTimeout(f"the buffer has not answered for {waited:.0f} s (learner.fetch_timeout_s); "
                                        f"the learner's checkpoint at version {self.version()} is written")
                try:
                    probe.stats()
                    logger.info("buffer answers again after %.1f s", waited)
                    return True
                except BufferTimeout:
                    self.stop.wait(PROBE_EVERY_S)
            logger.info("stop requested while waiting for the lost buffer (checkpoint at version %d is written)",
                        self.version())
            return False
        finally:
            probe.close()
