"""Weight broadcast over real gloo process groups on 127.0.0.1: bucketing, bitwise delivery, dead receivers.

Receivers run as separate processes (the script below) and write what they received to safetensors files.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import LearnerConfig
from common.processes import free_port
from actor.weight_receiver import WeightReceiver
from common.weight_protocol import (ControlSubscriber, flat_offsets, new_process_group, plan_buckets,
                                    unique_named_tensors)
from learner.weight_sync import WeightSender

REPO = Path(__file__).resolve().parents[1]

RECEIVER_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import save_file
from common.config import LearnerConfig
from actor.weight_receiver import WeightReceiver
torch.set_num_threads(1)
args = json.loads(sys.argv[1])
template = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, (dtype, shape) in args["template"].items()}
receiver = WeightReceiver(LearnerConfig(**args["cfg"]), args["rank"], template, "cpu").start()
for version in args["versions"]:
    got = receiver.wait_for_version(version, args["timeout"])
    if got is None:
        sys.exit(3)
    save_file({k: t.contiguous() for k, t in got[1].items()}, f"{args['out']}.v{got[0]}.safetensors")
    print("got", got[0], flush=True)
receiver.close()
"""


def _cfg(**overrides) -> LearnerConfig:
    fields = dict(sync_address=f"127.0.0.1:{free_port()}", sync_control_address=f"tcp://127.0.0.1:{free_port()}",
                  sync_bucket_mb=1, sync_timeout_s=20.0)
    fields.update(overrides)
    return LearnerConfig(**fields)


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(300, 512, generator=gen),  # 600 KB: with 1 MB buckets, layers split buckets
        "layer.0.w": torch.randn(256, 512, generator=gen),
        "layer.0.b": torch.randn(7, generator=gen),  # odd size: the next tensor must start aligned
        "layer.1.w": torch.randn(600, 512, generator=gen),  # > 1 MB: a bucket of its own
        "norm.weight": torch.randn(512, generator=gen).to(torch.bfloat16),
    }


def _start_receiver(cfg: LearnerConfig, rank: int, state, versions, out: Path) -> subprocess.Popen:
    args = {"cfg": {"sync_address": cfg.sync_address, "sync_control_address": cfg.sync_control_address,
                    "sync_timeout_s": cfg.sync_timeout_s, "sync_group_name": cfg.sync_group_name},
            "rank": rank, "versions": versions, "timeout": 40, "out": str(out),
            "template": {k: [str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in state.items()}}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", RECEIVER_SCRIPT, json.dumps(args)], cwd=REPO, env=env)


def _wait_started(sender: WeightSender, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until the receiver process is up: it asks to join when it starts (importing torch can take 20 s on a
    loaded machine, longer than a test's join wait)."""
    deadline = time.monotonic() + timeout_s
    while not sender.rejoin_requested():
        assert time.monotonic() < deadline and proc.poll() is None, "the receiver process never started"
        time.sleep(0.05)


def _wait_file(path: Path, timeout_s: float = 30.0) -> dict[str, torch.Tensor]:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"receiver never wrote {path}"
        time.sleep(0.05)
    time.sleep(0.1)  # the file is written by save_file in one go; give it a moment to close
    return load_file(path)


def _assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


@pytest.mark.unit
def test_plan_buckets_respects_size_and_order():
    state = _state(0)
    buckets = plan_buckets(list(state.items()), 1024 * 1024)
    names = [[s.name for s in b] for b in buckets]
    # embed 614400 B + layer.0.w 524288 B > 1 MiB -> split; layer.1.w (1228800 B) alone; the small ones share.
    assert names == [["embed.weight"], ["layer.0.w", "layer.0.b"], ["layer.1.w"], ["norm.weight"]]
    offsets, total = flat_offsets(buckets[1])
    assert offsets == [0, 524288] and total == 524288 + 64  # 7 floats = 28 B padded to 64


@pytest.mark.unit
def test_tied_weights_are_sent_once_and_wire_dtype_casts():
    shared = torch.randn(4, 3)
    named = unique_named_tensors({"embed": shared, "lm_head": shared, "bias": torch.ones(3)}, torch.bfloat16)
    assert [n for n, _ in named] == ["embed", "bias"]
    assert all(t.dtype == torch.bfloat16 for _, t in named)


@pytest.mark.integration
def test_receiver_gets_bitwise_equal_weights(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg()
    state = _state(1)
    sender = WeightSender(cfg, world_size=2, device="cpu")
    proc = _start_receiver(cfg, 1, state, [1, 2], tmp_path / "rx")
    try:
        _wait_started(sender, proc)
        metrics = sender.broadcast(state, version=1)
        assert metrics["perf/sync_ok"] == 1.0
        _assert_bitwise_equal(_wait_file(tmp_path / "rx.v1.safetensors"), state)
        state2 = _state(2)  # a second version over the same (already complete) group
        assert sender.broadcast(state2, version=2)["perf/sync_ok"] == 1.0
        _assert_bitwise_equal(_wait_file(tmp_path / "rx.v2.safetensors"), state2)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        sender.close()


@pytest.mark.integration
def test_per_tensor_layout_in_process_receiver():
    """The SGLang layout, with a receiver thread in this process: also checks take_latest / announcements."""
    torch.set_num_threads(1)
    cfg = _cfg()
    state = _state(3)
    sender = WeightSender(cfg, world_size=2, device="cpu", layout="per_tensor")
    receiver = WeightReceiver(cfg, 1, state, "cpu").start()
    subscriber = ControlSubscriber(cfg.sync_control_address)
    try:
        assert receiver.take_latest() is None
        assert sender.broadcast(state, version=5)["perf/sync_ok"] == 1.0
        version, got = receiver.wait_for_version(5, timeout_s=20)
        assert version == 5
        _assert_bitwise_equal(got, state)
        assert receiver.take_latest() is None  # taken once
        seen = subscriber.recv(timeout_s=5)
        assert seen is not None and seen.layout == "per_tensor"
    finally:
        subscriber.close()
        receiver.close()
        sender.close()


@pytest.mark.integration
def test_flat_receive_buffers_are_reused_only_after_the_next_take():
    torch.set_num_threads(1)
    cfg = _cfg()
    states = [_state(20 + v) for v in range(3)]
    sender = WeightSender(cfg, world_size=2, device="cpu")
    receiver = WeightReceiver(cfg, 1, states[0], "cpu").start()
    try:
        taken = []
        for version, state in enumerate(states):
            assert sender.broadcast(state, version=version)["perf/sync_ok"] == 1.0
            got = receiver.wait_for_version(version, timeout_s=20)
            assert got is not None and got[0] == version
            if taken:  # the previous take is intact while this version was received and taken
                _assert_bitwise_equal(taken[-1], states[version - 1])
            _assert_bitwise_equal(got[1], state)
            taken.append(got[1])
        # version 2 went into version 0's buffers (released when version 1 was taken): no fresh allocation
        assert taken[2]["layer.0.w"].data_ptr() == taken[0]["layer.0.w"].data_ptr()
    finally:
        receiver.close()
        sender.close()


@pytest.mark.integration
def test_dead_receiver_does_not_hang_sender_and_a_new_one_joins(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg()
    state = _state(4)
    sender = WeightSender(cfg, world_size=2, device="cpu")
    first = _start_receiver(cfg, 1, state, [1, 99], tmp_path / "a")
    second = None
    try:
        _wait_started(sender, first)
        assert sender.broadcast(state, version=1)["perf/sync_ok"] == 1.0
        _wait_file(tmp_path / "a.v1.safetensors")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        start = time.monotonic()
        metrics = sender.broadcast(_state(5), version=2)
        assert time.monotonic() - start < cfg.sync_timeout_s + 2.0
        assert metrics["perf/sync_ok"] == 0.0 and sender.generation == 1
        second = _start_receiver(cfg, 1, state, [3], tmp_path / "b")  # a restarted actor at the same rank
        # The learner retries at each version; the new process may need a few seconds to import torch.
        for version in range(3, 10):
            new_state = _state(version)
            if sender.broadcast(new_state, version=version)["perf/sync_ok"] == 1.0:
                break
        else:
            pytest.fail("the restarted receiver never joined the rebuilt group")
        assert sender.generation >= 1
        _assert_bitwise_equal(_wait_file(tmp_path / f"b.v{version}.safetensors"), new_state)
        assert second.wait(30) == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
        sender.close()


@pytest.mark.integration
def test_restarted_receiver_asks_to_rejoin_and_gets_the_current_version_resent():
    """The receiver dies right after a broadcast that completed on the sender's side: the sender still holds a
    group it believes whole. The restarted receiver's rejoin request makes the idle learner re-send the version
    it already "delivered" (without it the actor would wait for weights and the learner for groups, forever)."""
    from learner.train import Publisher

    torch.set_num_threads(1)
    cfg = _cfg()
    state = _state(9)
    sender = WeightSender(cfg, world_size=2, device="cpu")
    first = WeightReceiver(cfg, 1, state, "cpu").start()
    second = None
    try:
        assert sender.broadcast(state, version=1)["perf/sync_ok"] == 1.0
        assert first.wait_for_version(1, timeout_s=20)[0] == 1
        assert not sender.rejoin_requested()  # the first receiver's start-up request was answered by g0
        first.close()
        publisher = Publisher(sender, client=None)
        publisher.synced_version = 1  # as the learner sees it: version 1 reached everyone
        second = WeightReceiver(cfg, 1, state, "cpu").start()
        deadline = time.monotonic() + 20
        while not sender.rejoin_requested():
            assert time.monotonic() < deadline, "the restarted receiver never asked to rejoin"
            time.sleep(0.05)
        # The first retry drops the group and returns before the new one has formed (no join wait) ...
        publisher.RETRY_JOIN_WAIT_S = 0.0
        publisher._last_try = 0.0  # skip the 2 s pacing of the fetch-wait loop
        publisher.retry_if_behind(state, 1)
        while second.joins < 1:  # ... then the receiver joins it and takes its rejoin request back
            assert time.monotonic() < deadline, "the restarted receiver never joined the rebuilt group"
            time.sleep(0.05)
        assert not sender.rejoin_requested()
        got = None
        while got is None and time.monotonic() < deadline:  # later retries must still send version 1
            publisher._last_try = 0.0
            publisher.retry_if_behind(state, 1)
            got = second.wait_for_version(1, timeout_s=0.5)
        assert got is not None and got[0] == 1, "version 1 was never re-sent to the restarted receiver"
        _assert_bitwise_equal(got[1], state)
        assert sender.generation >= 1 and not sender.rejoin_requested()
    finally:
        first.close()
        if second is not None:
            second.close()
        sender.close()


@pytest.mark.integration
def test_missing_receiver_bounds_the_wait_and_training_goes_on():
    torch.set_num_threads(1)
    cfg = _cfg(sync_timeout_s=2.0)
    sender = WeightSender(cfg, world_size=2, device="cpu", join_wait_s=0.5)
    try:
        start = time.monotonic()
        assert sender.broadcast(_state(7), version=1)["perf/sync_ok"] == 0.0
        assert time.monotonic() - start < 1.5  # join_wait_s, not the group timeout
        time.sleep(2.5)  # the background formation times out ...
        assert sender.broadcast(_state(7), version=2)["perf/sync_ok"] == 0.0
        assert sender.generation == 1  # ... and the next attempt moves to a new generation
    finally:
        sender.close()


@pytest.mark.unit
def test_flat_buckets_always_travel_over_gloo_and_per_tensor_over_nccl_between_gpus():
    from common.weight_protocol import transport_device

    assert transport_device("flat", torch.device("cuda", 0)).type == "cpu"  # HF actors may share the GPU
    assert transport_device("per_tensor", torch.device("cuda", 0)).type == "cuda"  # SGLang: NCCL
    assert transport_device("per_tensor", torch.device("cpu")).type == "cpu"


@pytest.mark.gpu
def test_gpu_learner_weights_reach_a_gpu_receiver_bitwise():
    """What one GPU can show: GPU-resident weights packed through CPU staging (gloo), staged back on the GPU.
    NCCL itself needs two GPUs (one communicator cannot hold two ranks on one device)."""
    cfg = _cfg()
    state = {k: v.cuda() for k, v in _state(8).items()}
    sender = WeightSender(cfg, world_size=2, device="cuda")
    receiver = WeightReceiver(cfg, 1, state, "cuda").start()
    try:
        assert sender.broadcast(state, version=1)["perf/sync_ok"] == 1.0
        version, got = receiver.wait_for_version(1, timeout_s=60)
        assert all(t.is_cuda for t in got.values())
        _assert_bitwise_equal({k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in state.items()})
    finally:
        receiver.close()
        sender.close()


# ---------------------------------------------------------------------------------------------- protocol defects


def _small_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=gen), "b": torch.randn(8, generator=gen)}


class LazyGroup:
    """A process group that joins its gloo rendezvous only at the first collective, the way ProcessGroupNCCL
    creates its communicator lazily when no `device_id` is bound (the constructor returns at once)."""

    def __init__(self, build):
        self._build, self._group = build, None

    def broadcast(self, tensor, root, timeout=None):
        if self._group is None:
            self._group = self._build()
        return self._group.broadcast(tensor, root, timeout)


def lazy_group_factory(store, group_name, rank, world_size, timeout_s, device):
    return LazyGroup(lambda: new_process_group(store, group_name, rank, world_size, timeout_s, device))


@pytest.mark.integration
def test_lazy_group_counts_as_formed_only_after_every_member_joined():
    torch.set_num_threads(1)
    cfg = _cfg(sync_timeout_s=4.0)
    state = _small_state(30)
    sender = WeightSender(cfg, world_size=2, device="cpu", group_factory=lazy_group_factory)
    receiver = WeightReceiver(cfg, 1, state, "cpu", group_factory=lazy_group_factory).start()
    try:
        time.sleep(0.5)  # the receiver is subscribed
        assert sender.broadcast(state, version=1)["perf/sync_ok"] == 1.0
        got = receiver.wait_for_version(1, timeout_s=5)
        assert got is not None and got[0] == 1
        _assert_bitwise_equal(got[1], state)
    finally:
        receiver.close()
        sender.close()


@pytest.mark.unit
def test_store_listens_only_on_the_configured_address():
    import socket

    port = free_port()
    sender = WeightSender(_cfg(sync_address=f"127.0.0.2:{port}"), world_size=2, device="cpu")
    try:
        socket.create_connection(("127.0.0.2", port), timeout=2).close()  # the configured address answers
        with pytest.raises(ConnectionRefusedError):  # another local address does not
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        sender.close()


@pytest.mark.unit
def test_nccl_environment_is_set_before_the_first_communicator_and_required_after():
    from common.weight_protocol import prepare_nccl_environment

    fresh: dict[str, str] = {}
    prepare_nccl_environment(fresh, communicator_may_exist=False)  # no communicator yet: set here, in time
    assert fresh == {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}
    prepare_nccl_environment(dict(fresh), communicator_may_exist=True)  # set at launch: fine under torchrun
    with pytest.raises(RuntimeError, match="NCCL_CUMEM_ENABLE=<unset>"):  # too late to set: NCCL read it already
        prepare_nccl_environment({}, communicator_may_exist=True)
    with pytest.raises(RuntimeError, match="NCCL_NVLS_ENABLE=1"):  # set otherwise by the user
        prepare_nccl_environment({"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "1"}, communicator_may_exist=False)


@pytest.mark.unit
def test_malformed_announcements_are_rejected_with_the_field_named():
    from common.schemas import TensorSpec, WeightAnnouncement, WireError
    from common.weight_protocol import check_announcement

    good = dict(version=1, group_name="w_ab_g0", generation=0, world_size=2, layout="flat", buckets=[])
    check_announcement(WeightAnnouncement(**good))
    bad = [({"version": -1}, "version"), ({"world_size": 1}, "world_size"), ({"layout": "x"}, "layout"),
           ({"group_name": "a/b"}, "group_name"),
           ({"buckets": [[TensorSpec(name="w", dtype="float32", shape=[2, -3])]]}, "buckets.shape"),
           ({"buckets": [[TensorSpec(name="w", dtype="float32", shape=[1 << 20, 1 << 20])]]}, "buckets.shape"),
           ({"buckets": [[TensorSpec(name="w", dtype="nope", shape=[2])]]}, "buckets.dtype")]
    for change, field in bad:
        with pytest.raises(WireError, match=field):
            check_announcement(WeightAnnouncement(**{**good, **change}))


@pytest.mark.integration
def test_a_resumed_learner_rolls_the_receiver_back_to_its_older_version():
    """A learner resumed from checkpoint 1 after it had already sent version 3 broadcasts version 1 again: the
    receiver must stage it, or the actor would keep generating with the discarded version 3 (whose tokens the
    rolled-back buffer refuses) while the learner waits for groups."""
    torch.set_num_threads(1)
    cfg = _cfg()
    newer, resumed = _state(30), _state(31)
    sender = WeightSender(cfg, world_size=2, device="cpu")
    receiver = WeightReceiver(cfg, 1, newer, "cpu").start()
    try:
        assert sender.broadcast(newer, version=3)["perf/sync_ok"] == 1.0
        assert receiver.wait_for_version(3, timeout_s=20)[0] == 3
        sender.close()
        sender = WeightSender(cfg, world_size=2, device="cpu")  # the resumed learner: a new session
        deadline = time.monotonic() + 60
        while sender.broadcast(resumed, version=1, join_wait_s=5.0)["perf/sync_ok"] != 1.0:
            assert time.monotonic() < deadline, "the receiver never joined the resumed learner's group"
        got = None
        while got is None and time.monotonic() < deadline:
            got = receiver.take_latest()
            time.sleep(0.05)
        assert got is not None and got[0] == 1, "the resumed learner's older version was never staged"
        _assert_bitwise_equal(got[1], resumed)
    finally:
        receiver.close()
        sender.close()
