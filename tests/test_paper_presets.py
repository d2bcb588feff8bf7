"""The paper presets: `--help` and `--dry-run` work without a GPU; a missing model is refused before any role."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import PRESETS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "data" / "hf"


def _run(*args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, "run_async.py", *args, "--run.runs-dir", str(tmp_path / "runs")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.unit
@pytest.mark.parametrize("name, model", [("paper-1.5b", "Qwen/Qwen2.5-Math-1.5B"),
                                         ("paper-7b", "Qwen/Qwen2.5-Math-7B")])
def test_paper_presets_carry_the_released_settings(name, model):
    cfg = PRESETS[name]()
    assert cfg.run.model == model
    assert (cfg.learner.groups_per_step, cfg.learner.mini_batches, cfg.learner.lr, cfg.learner.warmup_steps,
            cfg.learner.weight_decay, cfg.learner.grad_clip) == (512, 16, 1e-6, 10, 0.1, 1.0)
    assert (cfg.algo.n_mean, cfg.algo.n_min, cfg.algo.n_max, cfg.algo.allocation_mode, cfg.algo.modulation) == \
        (16, 8, 24, "reference", True)
    assert (cfg.algo.clip_eps_low, cfg.algo.clip_eps_high, cfg.algo.dual_clip_c, cfg.algo.kl_coef,
            cfg.algo.loss_aggregation) == (0.2, 0.28, 10.0, 0.0, "token-mean")
    assert (cfg.actor.temperature, cfg.actor.top_p, cfg.actor.max_new_tokens, cfg.actor.engine) == \
        (1.0, 1.0, 3072, "sglang")
    assert (cfg.task.name, cfg.task.scorer, cfg.task.reward_correct, cfg.task.reward_wrong) == \
        ("BytedTsinghua-SIA/DAPO-Math-17k", "math", 1.0, -1.0)
    assert set(cfg.learner.gpus) | set(cfg.actor.gpus) == set(range(8))  # one 8-GPU node, nothing shared


@pytest.mark.parametrize("name", ["paper-1.5b", "paper-7b"])
def test_paper_preset_help_works_without_a_gpu(name, tmp_path):
    result = _run("--preset", name, "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--task.reward-wrong" in result.stdout and "--dry-run" in result.stdout


def test_dry_run_checks_model_and_data_prints_the_plan_and_starts_nothing(tmp_path):
    result = _run("--preset", "paper-1.5b", "--dry-run", "--run.model", "tiny",
                  "--task.name", str(HF / "BytedTsinghua-SIA" / "DAPO-Math-17k"),
                  "--task.eval-name", str(HF / "HuggingFaceH4" / "MATH-500"), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("dry run: nothing is started\nmodel tiny: llama")
    assert "data train: 6 prompts" in out
    # the preset evaluates the math6 suite (offline here: a warning), not the task's held-out split
    assert "data eval: the math6 suite (below), not the task's held-out split" in out
    assert "eval suite math6: 32 samples + 1 greedy answer per prompt, 64 prompts per benchmark" in out
    assert "reward 1 correct / -1 wrong" in out
    assert "actor 3: sglang engine launched, tp 1, GPUs [7], weight-sync rank 4" in out
    assert "steps: 300 x 512 prompts" in out and "16 optimizer mini-batch(es)" in out
    assert "warning: actor.max_new_tokens 3072 leaves no room" in out  # the tiny model's context is 512
    assert not (tmp_path / "runs").exists()


def test_dry_run_names_a_missing_dataset_column(tmp_path):
    result = _run("--preset", "paper-1.5b", "--dry-run", "--run.model", "tiny",
                  "--task.name", str(HF / "DigitalLearningGmbH" / "MATH-lighteval"), "--task.field-map", "dapo-math",
                  tmp_path=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: task: dataset ")
    assert "no column 'prompt'" in result.stderr


def test_a_model_that_cannot_be_found_is_refused_before_any_role_starts(tmp_path):
    result = _run("--preset", "paper-1.5b", tmp_path=tmp_path)  # offline, empty HF_HOME: Qwen is not cached
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: run.model: model 'Qwen/Qwen2.5-Math-1.5B'"), last
    assert not (tmp_path / "runs").exists()
