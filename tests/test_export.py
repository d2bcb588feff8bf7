"""learner.export: a checkpoint becomes a Hugging Face model directory that transformers loads as it is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.config import Config, save_config, with_overrides
from common.models import load_model, resolve_model_path
from learner import checkpoint as ckpt
from learner import export
from learner.step import build_state

REPO = Path(__file__).resolve().parents[1]
TEXT = "what is 12 + 30? the answer is 42."


def trained_run(run_dir: Path, versions=(3,)) -> dict[int, torch.nn.Module]:
    """A run directory on the tiny model with checkpoints whose weights differ from the base model's."""
    save_config(with_overrides(Config(), run={"model": "tiny"}), run_dir / "config.json")
    state = build_state(load_model("tiny", dtype=torch.float32, device="cpu"), Config().learner)
    models = {}
    generator = torch.Generator().manual_seed(7)
    for version in versions:
        with torch.no_grad():
            for param in state.model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        state.version = version
        ckpt.save_checkpoint(run_dir, state, keep=len(versions))
        models[version] = {k: v.clone() for k, v in state.model.state_dict().items()}
    return models


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def learner_model(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    model.load_state_dict(weights)
    return model


@pytest.mark.integration
def test_export_loads_with_from_pretrained_with_the_learners_logits(tmp_path):
    torch.set_num_threads(1)
    weights = trained_run(tmp_path / "run", versions=(3, 5))
    out = tmp_path / "hf"
    assert export.export_checkpoint(tmp_path / "run", out, step=3) == ckpt.checkpoint_dir(tmp_path / "run") / \
        "step_00000003"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    base_tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny"), local_files_only=True)
    assert model.dtype == torch.float32
    expected = logits_of(learner_model(weights[3]), base_tokenizer)
    assert torch.equal(logits_of(model, tokenizer), expected)  # fp32 weights unchanged bit for bit
    assert not torch.equal(logits_of(learner_model(weights[5]), base_tokenizer), expected)  # --step chose step 3
    assert tokenizer(TEXT).input_ids == base_tokenizer(TEXT).input_ids
    assert tokenizer.decode(tokenizer(TEXT).input_ids) == base_tokenizer.decode(base_tokenizer(TEXT).input_ids)
    chat = [{"role": "user", "content": "2+2?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        base_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.integration
def test_export_of_a_previous_format_checkpoint_in_bfloat16(tmp_path):
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    save_config(with_overrides(Config(), run={"model": "tiny"}), run_dir / "config.json")
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    old = ckpt.checkpoint_dir(run_dir) / "step_00000004"
    old.mkdir(parents=True)
    save_model(model, str(old / "model.safetensors"))  # the previous format: weights in safetensors
    export.export_checkpoint(run_dir, tmp_path / "hf", dtype="bfloat16")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert exported.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor.to(torch.bfloat16)), name


@pytest.mark.unit
def test_export_errors_name_what_is_wrong(tmp_path, capsys):
    save_config(with_overrides(Config(), run={"model": "tiny"}), tmp_path / "config.json")
    assert export.main([str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert export.main([str(tmp_path / "missing"), "--out", str(tmp_path / "hf")]) == 2
    assert "config.json" in capsys.readouterr().err
    (ckpt.checkpoint_dir(tmp_path) / "step_00000002").mkdir(parents=True)
    assert export.main([str(tmp_path), "--out", str(tmp_path / "hf"), "--step", "7"]) == 2
    assert "step 7 not found (have: 2)" in capsys.readouterr().err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    assert export.main([str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"
    assert export.main([str(tmp_path), "--out", str(tmp_path / "hf2")]) == 2  # step_00000002 is an empty directory
    assert "neither trainer/ nor model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


@pytest.mark.unit
def test_a_checkpoint_of_another_model_is_refused_naming_the_tensor(tmp_path, capsys):
    from test_learner_step import tiny_model  # vocabulary 64, hidden 32: not the `tiny` run model's shapes

    save_config(with_overrides(Config(), run={"model": "tiny"}), tmp_path / "config.json")
    state = build_state(tiny_model(), Config().learner)
    state.version = 1
    ckpt.save_checkpoint(tmp_path, state)
    assert export.main([str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "model.model.embed_tokens.weight" in err and "Size mismatch" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.integration
def test_cli_writes_the_newest_checkpoint_and_replaces_with_force(tmp_path):
    weights = trained_run(tmp_path / "run", versions=(1, 2))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "learner.export", str(tmp_path / "run"), "--out", str(out)]
    refused = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--force" in refused.stderr
    done = subprocess.run(cmd + ["--force"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step_00000002" in done.stderr  # the progress lines name the checkpoint
    assert not (out / "stale.txt").exists()
    base_config = json.loads((resolve_model_path("tiny") / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["vocab_size"] == base_config["vocab_size"]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    for name, tensor in weights[2].items():
        assert torch.equal(model.state_dict()[name], tensor), name
