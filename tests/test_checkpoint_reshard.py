"""Checkpoints written by N ranks resume at M ranks (torch.distributed.checkpoint over real gloo process groups).

The learner is replicated data-parallel: every rank holds the whole model and AdamW state. A collective save
(`collective=True`, every rank calls it) lets each rank write its share of the tensors; the checkpoint must then
resume on any number of ranks with bit-identical weights and optimizer state, so the next optimizer step is the
same as the one the saving job would have taken. With the tests' batches every mini-batch is one micro-batch, so a
two-rank step is rank 0's gradient plus rank 1's zeros and equals the single-process step bit for bit. A checkpoint
of an FSDP2-sharded model (DTensor shards, the learner's planned sharded form) resumes on one plain process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.processes import free_port
from learner import checkpoint as ckpt
from learner.step import build_state, train_step
from test_learner_checkpoint import batches, config
from test_learner_step import tiny_model

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

RANK_SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from test_checkpoint_reshard import rank_main
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=int(sys.argv[3]), world_size=2, init_method=f"tcp://127.0.0.1:{sys.argv[4]}")
rank_main(sys.argv[2], sys.argv[5])
"""


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor; an FSDP2 shard (DTensor) is gathered from every rank (a collective)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def trainer_state(state) -> dict[str, torch.Tensor]:
    """Weights and AdamW moments/step counts, by name."""
    out = {f"param/{k}": whole(v) for k, v in state.model.state_dict().items()}
    names = {id(p): n for n, p in state.model.named_parameters()}
    for param, moments in state.optimizer.state.items():
        out.update({f"optim/{names[id(param)]}/{k}": whole(v) for k, v in sorted(moments.items())})
    return out


def sharded_main(run_dir: str) -> None:
    """One rank of an FSDP2-sharded learner (each rank holds half of every tensor): one AdamW step on a squared-logit
    loss, a collective save, and rank 0 keeps the gathered weights and moments as the reference."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = tiny_model(seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    state = build_state(model, config().learner)
    tokens = torch.arange(16).reshape(2, 8) * 3 % 64
    model(input_ids=tokens).logits.pow(2).mean().backward()
    state.optimizer.step()
    state.scheduler.step()
    state.version = 1
    ckpt.save_checkpoint(run_dir, state, collective=True)
    reference = trainer_state(state)
    if dist.get_rank() == 0:
        torch.save(reference, Path(run_dir) / "reference.pt")
    dist.destroy_process_group()


def rank_main(run_dir: str, mode: str) -> None:
    """One rank of a two-rank job. `save`: two DP steps, collective save, then (rank 0, group gone) the third step
    alone as the reference. `resume`: collective load, the third step on two ranks, each rank's state saved.
    `sharded`: `sharded_main`."""
    import torch.distributed as dist

    cfg, data, rank = config(), batches(), dist.get_rank()
    if mode == "sharded":
        return sharded_main(run_dir)
    if mode == "save":
        state = build_state(tiny_model(seed=0), cfg.learner)
        for batch in data[:2]:
            train_step(state, batch, cfg)
        written = ckpt.save_checkpoint(run_dir, state, collective=True)
        alone = build_state(tiny_model(seed=99), cfg.learner)
        ckpt.load_checkpoint(written, alone)  # each rank reading alone while the group lives (the DP learner's way)
        assert_same_state(trainer_state(alone), trainer_state(state))
        dist.destroy_process_group()
        if rank == 0:
            train_step(state, data[2], cfg)
            torch.save(trainer_state(state), Path(run_dir) / "reference.pt")
        return
    state = build_state(tiny_model(seed=99), cfg.learner)  # other initial weights: everything must come from disk
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), state, collective=True)
    assert state.version == 2, state.version
    train_step(state, data[2], cfg)
    torch.save(trainer_state(state), Path(run_dir) / f"resumed_rank{rank}.pt")
    if rank == 0:  # rank 0 writing alone while the group lives: how the replicated learner checkpoints
        ckpt.save_checkpoint(run_dir, state)
    dist.destroy_process_group()


def run_two_ranks(run_dir: Path, mode: str) -> None:
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(Path(__file__).parent), str(run_dir),
                               str(rank), port, mode], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        codes = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [p.stderr.read()[-2000:] for p in procs]


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # fp32, tolerance 0: the same arithmetic on the same bits


def test_saved_on_two_ranks_resumes_on_one(tmp_path):
    torch.set_num_threads(1)
    run_two_ranks(tmp_path, "save")
    written = ckpt.latest_checkpoint(tmp_path)
    assert written.name == "step_00000002"
    assert json.loads((written / "meta.json").read_text())["writers"] == 2
    assert len(list((written / ckpt.TRAINER_DIR).glob("*.distcp"))) == 2  # one file per rank
    assert not any(p.name.startswith(".tmp-") for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    cfg = config()
    state = build_state(tiny_model(seed=99), cfg.learner)
    ckpt.load_checkpoint(written, state)
    assert state.version == 2
    train_step(state, batches()[2], cfg)
    assert_same_state(trainer_state(state), torch.load(tmp_path / "reference.pt", weights_only=True))


def test_saved_on_one_rank_resumes_on_two(tmp_path):
    torch.set_num_threads(1)
    cfg, data = config(), batches()
    state = build_state(tiny_model(seed=0), cfg.learner)
    for batch in data[:2]:
        train_step(state, batch, cfg)
    ckpt.save_checkpoint(tmp_path, state)
    train_step(state, data[2], cfg)
    reference = trainer_state(state)
    run_two_ranks(tmp_path, "resume")
    for rank in range(2):
        assert_same_state(torch.load(tmp_path / f"resumed_rank{rank}.pt", weights_only=True), reference)
    alone = build_state(tiny_model(seed=99), cfg.learner)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), alone)
    assert alone.version == 3
    assert_same_state(trainer_state(alone), reference)


def test_saved_by_a_sharded_learner_resumes_replicated_on_one(tmp_path):
    """FSDP2 on two gloo ranks writes DTensor shards; one plain process reads back the whole weights and moments."""
    torch.set_num_threads(1)
    run_two_ranks(tmp_path, "sharded")
    state = build_state(tiny_model(seed=99), config().learner)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), state)
    assert state.version == 1
    assert_same_state(trainer_state(state), torch.load(tmp_path / "reference.pt", weights_only=True))
