"""Checkpoints: atomic writes survive a crash mid-write; a fresh process resumes with identical next steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import with_overrides
from learner import checkpoint as ckpt
from learner.step import build_state, train_step
from test_learner_step import example_groups, make_batch, make_cfg, tiny_model

REPO = Path(__file__).resolve().parents[1]

RESUME_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from test_learner_checkpoint import batches, config
from test_learner_step import tiny_model
from learner.checkpoint import latest_checkpoint, load_checkpoint
from learner.step import build_state, train_step
torch.set_num_threads(1)
cfg = config()
state = build_state(tiny_model(seed=99), cfg.learner)  # different initial weights: all must come from disk
load_checkpoint(latest_checkpoint(sys.argv[1]), state)
resumed_at = state.version
losses = [train_step(state, b, cfg)["loss/policy"] for b in batches()[resumed_at:]]
print(json.dumps({"version": resumed_at, "losses": losses,
                  "param_sum": float(sum(p.detach().double().sum() for p in state.model.parameters()))}))
"""


def config():
    return with_overrides(make_cfg(), learner={"warmup_steps": 4, "lr": 5e-3})  # lr still rising at steps 3-4


def batches():
    return [make_batch(example_groups(seed=10 + i)) for i in range(4)]


@pytest.mark.integration
def test_resume_in_a_fresh_process_reproduces_the_next_steps(tmp_path):
    torch.set_num_threads(1)
    cfg = config()
    state = build_state(tiny_model(seed=0), cfg.learner)
    data = batches()
    for batch in data[:2]:
        train_step(state, batch, cfg)
    ckpt.save_checkpoint(tmp_path, state)
    losses = [train_step(state, b, cfg)["loss/policy"] for b in data[2:]]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert resumed["version"] == 2
    # step 3's loss checks the weights; step 4's loss and the final weights check Adam's moments and the lr schedule
    assert resumed["losses"] == pytest.approx(losses, abs=1e-6)
    assert resumed["param_sum"] == pytest.approx(float(sum(p.detach().double().sum() for p in state.model.parameters())),
                                                 abs=1e-6)


@pytest.mark.unit
def test_crash_mid_write_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = config()
    state = build_state(tiny_model(), cfg.learner)
    train_step(state, batches()[0], cfg)
    first = ckpt.save_checkpoint(tmp_path, state)
    saved = {k: v.clone() for k, v in state.model.state_dict().items()}
    train_step(state, batches()[1], cfg)

    def crash(path, _state):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full (simulated crash mid-write)")

    monkeypatch.setattr(ckpt, "write_trainer_state", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, state)
    assert ckpt.latest_checkpoint(tmp_path) == first  # the half-written one is not a checkpoint
    assert any(p.name.startswith(".tmp-") for p in ckpt.checkpoint_dir(tmp_path).iterdir())
    fresh = build_state(tiny_model(seed=5), cfg.learner)
    ckpt.load_checkpoint(first, fresh)
    assert fresh.version == 1
    for name, tensor in fresh.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    monkeypatch.undo()
    second = ckpt.save_checkpoint(tmp_path, state)  # the next save cleans the leftovers up
    assert ckpt.latest_checkpoint(tmp_path) == second
    assert not any(p.name.startswith(".tmp-") for p in ckpt.checkpoint_dir(tmp_path).iterdir())


@pytest.mark.unit
def test_keeps_the_newest_checkpoints_and_restores_rng(tmp_path):
    cfg = config()
    state = build_state(tiny_model(), cfg.learner)
    for version in range(1, 4):
        state.version = version
        ckpt.save_checkpoint(tmp_path, state, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    expected = torch.rand(3)  # the draw right after the checkpoint was written
    state.version = 7
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), state)
    assert state.version == 3
    assert torch.equal(torch.rand(3), expected)  # the RNG is back at the save point


def write_previous_format(path: Path, state) -> None:
    """A checkpoint as the previous format wrote it: model.safetensors + trainer.pt with the optimizer inside."""
    from safetensors.torch import save_model

    path.mkdir(parents=True)
    save_model(state.model, str(path / "model.safetensors"))
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "version": state.version, "rng": ckpt.rng_state()}, path / "trainer.pt")
    (path / "meta.json").write_text(json.dumps({"version": state.version, "time": 0.0}) + "\n")


@pytest.mark.unit
def test_a_checkpoint_of_the_previous_format_still_resumes(tmp_path):
    torch.set_num_threads(1)
    cfg, data = config(), batches()
    state = build_state(tiny_model(seed=0), cfg.learner)
    for batch in data[:2]:
        train_step(state, batch, cfg)
    write_previous_format(ckpt.checkpoint_dir(tmp_path) / "step_00000002", state)
    expected = torch.rand(2)
    train_step(state, data[2], cfg)
    fresh = build_state(tiny_model(seed=99), cfg.learner)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh)
    assert fresh.version == 2
    assert torch.equal(torch.rand(2), expected)
    train_step(fresh, data[2], cfg)
    for (name, got), want in zip(fresh.model.named_parameters(), state.model.parameters()):
        assert torch.equal(got, want), name  # weights, Adam moments and the lr schedule all came back


@pytest.mark.unit
def test_a_checkpoint_before_the_first_step_changes_no_later_step(tmp_path):
    """Saving and loading an optimizer that has taken no step must not give it state: AdamW's first step would then
    count as its second (bias correction 1 - beta^2 instead of 1 - beta) and the run would take another path."""
    torch.set_num_threads(1)
    cfg, data = config(), batches()
    state = build_state(tiny_model(seed=0), cfg.learner)
    ckpt.save_checkpoint(tmp_path, state)
    assert state.optimizer.state == {}  # saving does not touch the live optimizer
    fresh = build_state(tiny_model(seed=99), cfg.learner)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh)
    assert fresh.optimizer.state == {}
    train_step(state, data[0], cfg)
    train_step(fresh, data[0], cfg)
    for (name, got), want in zip(fresh.model.named_parameters(), state.model.parameters()):
        assert torch.equal(got, want), name


@pytest.mark.unit
def test_a_tied_embedding_is_stored_once_and_restored_to_both_names(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from common.models import load_model

    cfg = config()
    state = build_state(load_model("tiny", dtype=torch.float32, device="cpu"), cfg.learner)  # lm_head = embeddings
    with torch.no_grad():
        state.model.get_input_embeddings().weight.mul_(3.0)
    written = ckpt.save_checkpoint(tmp_path, state)
    stored = FileSystemReader(written / ckpt.TRAINER_DIR).read_metadata().state_dict_metadata
    assert "model.model.embed_tokens.weight" in stored and "model.lm_head.weight" not in stored
    fresh = build_state(load_model("tiny", dtype=torch.float32, device="cpu"), cfg.learner)
    ckpt.load_checkpoint(written, fresh)
    assert fresh.model.lm_head.weight is fresh.model.get_input_embeddings().weight  # still tied
    assert torch.equal(fresh.model.lm_head.weight, state.model.lm_head.weight)
