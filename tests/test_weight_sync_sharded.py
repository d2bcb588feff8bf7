"""Weight broadcast from an FSDP2-sharded learner: two learner ranks on a real gloo group (`fully_shard` per decoder
layer + root on a CPU mesh, the real tiny model), rank 0 sending to a real `WeightReceiver` in the test process,
rank 1 joining every gather (`ShardGatherer`); and (slow) `python -m learner.train` on two sharded ranks end to end.

The learner ranks are forked from the test process after its imports (no second import of torch and transformers
per rank); the receiver starts after the fork, so no receiver thread is copied into a rank.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from actor.weight_receiver import WeightReceiver
from common.models import load_model
from common.processes import free_port
from common.weight_protocol import unique_named_tensors
from learner import weight_sync
from learner.weight_sync import WeightSender
from test_learner_train import REPO, FakeActor, _config, _start
from test_weight_sync import _assert_bitwise_equal, _cfg

pytestmark = pytest.mark.integration
RANK_TIMEOUT_S = 120.0


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 the way the sharded learner lays a model out: each decoder layer, then the root, on a CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tiny() -> torch.nn.Module:
    return load_model("tiny", dtype=torch.float32, device="cpu")


def wider(seed: int = 0) -> torch.nn.Module:
    """A random Llama of ~16 MB fp32 (tensors of 1 KB - 1 MB): with 1 MB buckets the whole model is ~16 buckets, so a
    bound of two buckets says something (the tiny model is about one bucket)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


class LiveBytes:
    """Counts the bytes of whole tensors gathered from DTensor shards that are alive at once (each is counted until
    its last view is gone), by wrapping `learner.weight_sync.whole_tensor` in a rank process."""

    def __init__(self) -> None:
        self.live = self.peak = self.gathered = 0
        self._real = weight_sync.whole_tensor
        weight_sync.whole_tensor = self._counted

    def _counted(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tensor = self._real(source, dtype)
        if isinstance(source, DTensor):
            nbytes = tensor.numel() * tensor.element_size()
            self.live += nbytes
            self.gathered += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, nbytes)
        return tensor

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


# ---------------------------------------------------------------------------------------------- rank processes


def _init_rank(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")


def _finish_rank(out: Path, rank: int, result: dict) -> None:
    dist.barrier()  # both ranks got here: no gather is left unmatched
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _broadcast_rank(rank, port, cfg, layout, model_name, wire, out, errors):
    """Rank 0 sends version 1 of the sharded model in dtype `wire` to one receiver (counting the gathered bytes for
    the `wider` model); rank 1 follows."""
    try:
        _init_rank(rank, port)
        model = shard(tiny() if model_name == "tiny" else wider())
        if rank == 0:
            counter = LiveBytes() if model_name == "wider" else None
            sender = WeightSender(cfg, world_size=2, device="cpu", layout=layout, wire_dtype=getattr(torch, wire))
            metrics = sender.broadcast(model, version=1)
            sender.close()
            result = {"sync_ok": metrics["perf/sync_ok"], "sync_bytes": metrics["perf/sync_bytes"]}
            if counter is not None:
                result.update(peak=counter.peak, gathered=counter.gathered)
        else:
            from learner.weight_sync import ShardGatherer

            result = {"followed": ShardGatherer(cfg, "cpu", wire_dtype=getattr(torch, wire)).follow(model)}
        _finish_rank(out, rank, result)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()[-1500:]}")
        raise


def _resend_rank(rank, port, cfg, out, errors):
    """The fetch wait of a sharded learner: rank 0 retries version 1 (as `fetch_batch`'s on_wait does) until it is
    delivered, then stops; rank 1 waits in `share_batch` and joins each re-send. Rank 1 writes `first_follow` after
    its first one, so the test starts the receiver only then: that first attempt has no group and must be a skip."""
    from learner.train import Publisher, request_resend, share_batch
    from learner.weight_sync import ShardGatherer

    try:
        _init_rank(rank, port)
        model = shard(tiny())
        device = torch.device("cpu")
        if rank == 0:
            sender = WeightSender(cfg, world_size=2, device=device)
            publisher = Publisher(sender, client=None, wake_followers=lambda: request_resend(device))
            publisher.synced_version = 0  # version 1 has not reached the actors
            attempts = 0
            deadline = time.monotonic() + 60
            while publisher.synced_version < 1 and time.monotonic() < deadline:
                publisher._last_try = 0.0  # the fetch loop's 2 s pacing, skipped
                publisher.retry_if_behind(model, 1)
                attempts += 1
            assert share_batch(None, 2, device) is None  # stop
            sender.close()
            result = {"synced_version": publisher.synced_version, "attempts": attempts}
        else:
            gatherer, followed = ShardGatherer(cfg, device), []

            def on_resend() -> None:
                followed.append(gatherer.follow(model))
                if len(followed) == 1:
                    (out / "first_follow").write_text(json.dumps(followed[0]))

            assert share_batch(None, 2, device, on_resend=on_resend) is None
            result = {"followed": followed}
        _finish_rank(out, rank, result)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()[-1500:]}")
        raise


class FailingGroup:
    """Test double around the real gloo weight group: its `fail_at`-th broadcast raises the RuntimeError a gloo
    collective raises when a member's connection drops (a real receiver's death cannot be timed to a bucket)."""

    def __init__(self, group, fail_at: int):
        self._group, self._left = group, fail_at

    def broadcast(self, tensor, root, timeout=None):
        self._left -= 1
        if self._left == 0:
            raise RuntimeError("[gloo] Connection closed by peer (injected)")
        return self._group.broadcast(tensor, root, timeout)


def _failed_send_rank(rank, port, cfg, out, errors):
    """Rank 0's third bucket fails on the wire; both ranks must still run every gather and then meet in step."""
    from common.weight_protocol import new_process_group
    from learner.weight_sync import ShardGatherer

    def failing_factory(store, name, group_rank, world_size, timeout_s, device):
        return FailingGroup(new_process_group(store, name, group_rank, world_size, timeout_s, device), fail_at=3)

    try:
        _init_rank(rank, port)
        model = shard(wider())
        counter = LiveBytes()
        if rank == 0:
            sender = WeightSender(cfg, world_size=2, device="cpu", group_factory=failing_factory)
            result = {"sync_ok": sender.broadcast(model, version=1)["perf/sync_ok"]}
            sender.close()
        else:
            result = {"followed": ShardGatherer(cfg, "cpu").follow(model)}
        in_step = torch.tensor([rank + 1.0])
        dist.all_reduce(in_step)  # a rank still inside the gathers would meet this with an all_gather
        result.update(gathered=counter.gathered, in_step=float(in_step))
        _finish_rank(out, rank, result)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()[-1500:]}")
        raise


def _fork_ranks(target, args):
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    port = free_port()  # the learner ranks' rendezvous
    procs = [ctx.Process(target=target, args=(rank, port, *args, errors), daemon=True) for rank in range(2)]
    for proc in procs:
        proc.start()
    return procs, errors


def _errors(errors, grace_s: float = 2.0) -> str:
    """Every rank's error (the other rank's usually follows within a moment: its peer is gone)."""
    time.sleep(grace_s)
    found = []
    while not errors.empty():
        found.append(errors.get())
    return "\n".join(found)


def _join_ranks(procs, errors, out: Path, timeout_s: float = RANK_TIMEOUT_S) -> list[dict]:
    """Both ranks' results; fails (killing both) on a rank's error or when the ranks hang past timeout_s."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.exitcode is None for p in procs):
            assert errors.empty(), _errors(errors)
            assert time.monotonic() < deadline, f"the learner ranks hung for {timeout_s:.0f} s"
            time.sleep(0.1)
        assert errors.empty(), _errors(errors)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
            proc.join()
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def _wait_version(receiver: WeightReceiver, version: int, procs, errors) -> tuple[int, dict]:
    """The receiver's copy of `version`; fails as soon as a rank failed instead of waiting out the timeout."""
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while True:
        got = receiver.wait_for_version(version, timeout_s=0.5)
        if got is not None:
            return got
        assert errors.empty(), _errors(errors)
        assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
        assert time.monotonic() < deadline, f"version {version} never reached the receiver"


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layout, wire", [("flat", "float32"), ("per_tensor", "float32"), ("flat", "bfloat16")])
def test_sharded_learner_sends_the_whole_model_bitwise(tmp_path, layout, wire):
    """The receiver holds exactly the single-process model's weights, in fp32 on an fp32 wire, and on a bf16 wire
    exactly their bf16 cast (each shard is cast before the gather; the cast is elementwise, so this is the same).
    The tiny model's 61-row embedding is split 31/30 over the ranks, and its LM head is tied: sent once."""
    torch.set_num_threads(1)
    cfg = _cfg()
    reference = {k: t.to(getattr(torch, wire)) for k, t in unique_named_tensors(tiny())}
    procs, errors = _fork_ranks(_broadcast_rank, (cfg, layout, "tiny", wire, tmp_path))
    receiver = WeightReceiver(cfg, 1, reference, "cpu").start()
    try:
        got = _wait_version(receiver, 1, procs, errors)
        sender, follower = _join_ranks(procs, errors, tmp_path)
    finally:
        receiver.close()
    assert sender["sync_ok"] == 1.0 and follower["followed"] == 1
    assert got is not None and got[0] == 1
    _assert_bitwise_equal(got[1], reference)
    assert "lm_head.weight" not in got[1]
    assert sender["sync_bytes"] == sum(t.numel() * t.element_size() for t in reference.values())


@pytest.mark.parametrize("layout", ["flat", "per_tensor"])
def test_whole_tensors_alive_on_rank_0_stay_within_two_buckets(tmp_path, layout):
    """The eager form held every whole tensor at once (the whole model, ~16 MB here); gathered bucket by bucket,
    rank 0 holds at most 2 x bucket + the largest tensor (3 MB here) of gathered tensors at any moment (`flat`
    packs one tensor at a time into its staging buffer; `per_tensor` keeps the bucket on the wire and the next)."""
    torch.set_num_threads(1)
    cfg = _cfg(sync_bucket_mb=1)
    reference = dict(unique_named_tensors(wider()))
    model_bytes = sum(t.numel() * t.element_size() for t in reference.values())
    largest = max(t.numel() * t.element_size() for t in reference.values())
    procs, errors = _fork_ranks(_broadcast_rank, (cfg, layout, "wider", "float32", tmp_path))
    receiver = WeightReceiver(cfg, 1, reference, "cpu").start()
    try:
        got = _wait_version(receiver, 1, procs, errors)
        sender, _ = _join_ranks(procs, errors, tmp_path)
    finally:
        receiver.close()
    assert got is not None
    _assert_bitwise_equal(got[1], reference)
    assert sender["gathered"] == len(reference)  # every tensor went through the counter
    print(f"{layout}: rank 0 peak of gathered whole tensors {sender['peak']} B; the model (eager peak) "
          f"{model_bytes} B; bucket {cfg.sync_bucket_mb} MiB, largest tensor {largest} B")
    assert largest <= sender["peak"] <= 2 * cfg.sync_bucket_mb * 1024 * 1024 + largest
    assert sender["peak"] < model_bytes / 4


def test_resend_from_the_fetch_wait_reaches_the_receiver_with_every_rank(tmp_path):
    """The retry of a sharded learner: rank 0 wakes the other rank in `share_batch`, both agree on skip (no group
    yet: no gathers) or on the version (both gather), and the receiver gets version 1; nothing hangs."""
    torch.set_num_threads(1)
    cfg = _cfg()
    reference = dict(unique_named_tensors(tiny()))
    procs, errors = _fork_ranks(_resend_rank, (cfg, tmp_path))
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while not (tmp_path / "first_follow").exists():
        assert time.monotonic() < deadline and errors.empty() and all(p.exitcode is None for p in procs), \
            _errors(errors) if not errors.empty() else "rank 1 never joined a re-send"
        time.sleep(0.05)
    receiver = WeightReceiver(cfg, 1, reference, "cpu").start()
    try:
        got = _wait_version(receiver, 1, procs, errors)
        lead, follower = _join_ranks(procs, errors, tmp_path)
    finally:
        receiver.close()
    assert got is not None and got[0] == 1
    _assert_bitwise_equal(got[1], reference)
    assert lead["synced_version"] == 1
    # One follow per attempt, the first a skip (the receiver was not up), the last the delivered version.
    assert len(follower["followed"]) == lead["attempts"] >= 2
    assert follower["followed"][0] is None and follower["followed"][-1] == 1


def test_a_send_failing_on_the_wire_still_finishes_the_gathers_on_every_rank(tmp_path):
    """A bucket that fails on the weight group drops that group (sync_ok 0), but rank 1 is already gathering the
    whole plan: rank 0 must finish the gather sequence with it, or their next collective would be mismatched."""
    torch.set_num_threads(1)
    cfg = _cfg(sync_bucket_mb=1)
    reference = dict(unique_named_tensors(wider()))
    procs, errors = _fork_ranks(_failed_send_rank, (cfg, tmp_path))
    receiver = WeightReceiver(cfg, 1, reference, "cpu").start()
    try:
        lead, follower = _join_ranks(procs, errors, tmp_path)
    finally:
        receiver.close()
    assert lead["sync_ok"] == 0.0 and follower["followed"] == 1
    assert lead["gathered"] == follower["gathered"] == len(reference)
    assert lead["in_step"] == follower["in_step"] == 3.0  # 1 + 2


@pytest.mark.slow
def test_two_rank_sharded_learner_delivers_every_step_and_the_resumed_version(tmp_path):
    """`python -m learner.train` on two FSDP2 ranks (torchrun, gloo) with a real buffer and a fake actor whose
    WeightReceiver follows the weights: every step's broadcast (both ranks gathering) is confirmed, and a resumed
    learner's first re-broadcast (the other rank joining before the loop) reaches the receiver too."""
    from common.config import save_config, with_overrides
    from common.metrics import read_metrics

    cfg = with_overrides(_config(), learner={"total_steps": 2, "checkpoint_every": 2, "sharding": "fsdp"})
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.json")
    log = open(tmp_path / "roles.log", "w")

    def learner(*extra: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                 "--master-port", str(free_port()), "-m", "learner.train", "--config-file",
                                 str(run_dir / "config.json"), "--run-dir", str(run_dir), *extra],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    buffer = _start("buffer.server", run_dir, log)
    actor, proc = None, None
    try:
        actor = FakeActor(cfg)
        actor.thread.start()
        proc = learner()
        assert proc.wait(RANK_TIMEOUT_S) == 0, (tmp_path / "roles.log").read_text()[-3000:]
        first = actor.receiver.wait_for_version(2, timeout_s=30)
        assert first is not None and first[0] == 2
        proc = learner("--resume")  # version 2 again (total_steps reached): the resumed re-broadcast only
        assert proc.wait(RANK_TIMEOUT_S) == 0, (tmp_path / "roles.log").read_text()[-3000:]
    finally:
        if actor is not None:
            actor.close()
        for child in (proc, buffer):
            if child is not None and child.poll() is None:
                child.terminate()
                child.wait(30)
        log.close()
    records = read_metrics(run_dir / "metrics.jsonl", role="learner")
    steps = [r for r in records if "loss/policy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["perf/sync_ok"] == 1.0 for r in steps), [r["perf/sync_ok"] for r in steps]
    resumed = [r for r in records if "loss/policy" not in r and "perf/sync_ok" in r]
    assert resumed and resumed[-1]["perf/sync_ok"] == 1.0 and resumed[-1]["step"] == 2
