"""The SGLang side of weight sync on CPU: a real WeightSender (per_tensor layout, real gloo group on 127.0.0.1)
drives the real `SGLangFollower`, whose engine is a double of SGLangEngine + SGLang 0.5.23's weight updater.
"""

import datetime
import time

import pytest
import torch

from actor.engines.sglang import SGLangError
from actor.weight_receiver import SGLangFollower
from common.config import Config, LearnerConfig
from common.processes import free_port
from common.weight_protocol import new_process_group
from learner.weight_sync import WeightSender


class SGLangEngineDouble:
    """Test double (no sglang or GPU here) of `SGLangEngine.update_from_announcement` over one server at tp 1,
    copying what SGLang 0.5.23 does where our protocol depends on it:

    - invitation -> `/init_weights_update_group`: the server builds its group with `init_custom_process_group`
      (srt/utils/common.py:2859): a TCPStore client at master_address:master_port, PrefixStore(group_name), then
      torch's group helper (the same store chain `new_process_group` builds), at rank `rank_offset + tp_rank`
      (srt/model_executor/model_runner_components/weight_updater.py:100-140). A second init of a group name that
      exists fails (torch's `_new_process_group_helper` refuses a duplicate name): HTTP 400, SGLangError.
    - data -> per bucket `/update_weights_from_distributed`: for a group the server does not hold the reply is an
      error (weight_updater.py:270); otherwise one `torch.empty` per tensor, each broadcast from src 0, all
      waited (weight_updater.py:280-296), then the weights are loaded; a name the model lacks fails the load
      after the transfer completed: `success: false`, HTTP 400 (srt/entrypoints/http_server.py:1490-1505).
    - `policy_version` advances only after every bucket's reply came back OK; any failure raises SGLangError.
    """

    def __init__(self, sync_address: str, model_names: set[str], rank_offset: int = 1, timeout_s: float = 10.0):
        self.host, port = sync_address.rsplit(":", 1)
        self.port = int(port)
        self.model_names = model_names
        self.rank_offset = rank_offset
        self.tp_size = 1
        self.servers = ["server0"]
        self.timeout_s = timeout_s
        self.policy_version = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.updates: list[int] = []
        self.joined: list[str] = []
        self._groups: dict[str, object] = {}

    def update_from_announcement(self, ann) -> dict[str, float]:
        if not ann.buckets:
            self._init_group(ann)
            return {}
        group = self._groups.get(ann.group_name)
        if group is None:
            raise SGLangError(f"Group {ann.group_name} not in {list(self._groups)}", 400)
        for bucket in ann.buckets:
            self._update_bucket(group, bucket)
        self.policy_version = int(ann.version)
        self.updates.append(int(ann.version))
        return {}

    def _init_group(self, ann) -> None:
        if ann.group_name in self._groups:
            raise SGLangError("Failed to initialize custom process group: The specified group name has already "
                              "been created, please use a different group name.", 400)
        store = torch.distributed.TCPStore(self.host, self.port, None, False,
                                           datetime.timedelta(seconds=self.timeout_s))
        group = new_process_group(store, ann.group_name, self.rank_offset, ann.world_size, self.timeout_s,
                                  torch.device("cpu"))
        self._groups = {ann.group_name: group}  # the engine destroys the servers' old group before joining
        self.joined.append(ann.group_name)

    def _update_bucket(self, group, bucket) -> None:
        received = {}
        works = []
        for spec in bucket:
            tensor = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
            works.append(group.broadcast(tensor, 0))
            received[spec.name] = tensor
        for work in works:
            work.wait()
        unknown = sorted(set(received) - self.model_names)
        if unknown:
            raise SGLangError(f"Failed to update parameter online: {unknown} not in the model", 400)
        self.weights.update(received)


def _cfg(**learner) -> Config:
    fields = dict(sync_address=f"127.0.0.1:{free_port()}", sync_control_address=f"tcp://127.0.0.1:{free_port()}",
                  sync_timeout_s=3.0)
    fields.update(learner)
    return Config(learner=LearnerConfig(**fields))


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=gen), "b": torch.randn(8, generator=gen).to(torch.bfloat16)}


def _wait_subscribed(sender: WeightSender, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not sender.rejoin_requested():  # a starting follower asks to join
        assert time.monotonic() < deadline, "the follower never started"
        time.sleep(0.02)
    time.sleep(0.3)  # its SUB socket has connected


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


@pytest.mark.integration
def test_follower_takes_part_in_a_version_resent_after_a_rebuild():
    torch.set_num_threads(1)
    cfg = _cfg()
    engine = SGLangEngineDouble(cfg.learner.sync_address, {"w", "b"})
    sender = WeightSender(cfg.learner, world_size=2, device="cpu", layout="per_tensor")
    follower = SGLangFollower(cfg, engine).start()
    try:
        _wait_subscribed(sender)
        first = _state(1)
        assert sender.broadcast(first, version=1)["perf/sync_ok"] == 1.0
        _wait_for(lambda: engine.updates == [1])
        assert torch.equal(engine.weights["w"], first["w"])
        # A rebuilt group (rejoin, retry, resume) re-sends the version the engine already holds.
        sender.abandon_group()
        again = _state(2)
        assert sender.broadcast(again, version=1)["perf/sync_ok"] == 1.0
        assert engine.updates == [1, 1] and len(engine.joined) == 2  # confirmed before sync_ok: no wait
        assert torch.equal(engine.weights["w"], again["w"]) and torch.equal(engine.weights["b"], again["b"])
        follower.check()
    finally:
        follower.close()
        sender.close()


@pytest.mark.integration
def test_sync_ok_needs_every_engine_to_confirm_a_transfer_without_a_load_is_not_delivered():
    torch.set_num_threads(1)
    cfg = _cfg()
    engine = SGLangEngineDouble(cfg.learner.sync_address, {"w"})  # the transfer completes, loading "b" fails
    sender = WeightSender(cfg.learner, world_size=2, device="cpu", layout="per_tensor")
    follower = SGLangFollower(cfg, engine).start()
    try:
        _wait_subscribed(sender)
        metrics = sender.broadcast(_state(3), version=1)
        assert metrics["perf/sync_ok"] == 0.0, "a version no engine installed was reported delivered"
        # The follower reports the refusal: the learner does not wait out sync_timeout_s (3 s) for its ack.
        assert metrics["time/sync_s"] < 2.0
        assert engine.policy_version == 0 and sender.generation == 1  # group abandoned, re-formed next time
        engine.model_names.add("b")  # the follower survived the failed update and follows the next attempt
        ok = any(sender.broadcast(_state(4), version=2, join_wait_s=5.0)["perf/sync_ok"] for _ in range(3))
        assert ok and engine.policy_version == 2
        follower.check()
    finally:
        follower.close()
        sender.close()
