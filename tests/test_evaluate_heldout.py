"""`python -m learner.evaluate_heldout`: a checkpoint scored on a wider held-out set of its run's generated task,
whose first task.eval_size prompts are the run's own held-out set."""

import json

import pytest
import torch

from common.config import PRESETS, Config, TaskConfig, save_config, with_overrides
from common.models import load_model, load_tokenizer
from common.tasks import load_prompts
from learner import checkpoint as ckpt
from learner import evaluate_heldout
from learner.evaluate import evaluate, score_prompts
from learner.evaluate_suite import EvaluateError
from learner.step import build_state


@pytest.mark.integration  # reasoning-gym draws ~1,000 prompts
def test_the_wider_set_continues_the_runs_held_out_set_without_trained_questions():
    task = Config().task  # 2-term 1-digit arithmetic: ~1,900 questions, 256 training prompts
    wide = evaluate_heldout.wide_held_out(task, 300)
    trained = {p.question for p in load_prompts(task, "train")}
    run_set = load_prompts(task, "eval")
    assert len(wide) == 300 and len({p.question for p in wide}) == 300
    assert not {p.question for p in wide} & trained
    assert [(p.prompt_id, p.question, p.answer) for p in wide[: task.eval_size]] == \
        [(p.prompt_id, p.question, p.answer) for p in run_set]


@pytest.mark.unit
def test_a_dataset_task_or_a_size_the_task_cannot_fill_is_refused_naming_why():
    with pytest.raises(EvaluateError, match="task.source = jsonl"):
        evaluate_heldout.wide_held_out(TaskConfig(source="jsonl", path="x.jsonl"), 10)
    # larger_digit has 100 questions; training draws 32 prompts of the 92 outside its 8 held-out ones.
    small = TaskConfig(source="procedural", name="larger_digit", params_json="{}", size=32, eval_size=8)
    assert len(evaluate_heldout.wide_held_out(small, 40)) == 40
    with pytest.raises(EvaluateError, match="--size 100: larger_digit has too few questions"):
        evaluate_heldout.wide_held_out(small, 100)


@pytest.mark.unit
def test_standard_error_hand_worked():
    assert evaluate_heldout.standard_error(0.5, 64) == pytest.approx(0.0625)  # sqrt(0.25 / 64)
    assert evaluate_heldout.standard_error(0.5, 512) == pytest.approx(0.02209709)  # sqrt(0.25 / 512)
    assert evaluate_heldout.standard_error(0.0, 10) == 0.0


def tiny_run(run_dir, cfg):
    """A run directory of `cfg` with one checkpoint (version 3) whose weights differ from the base model's."""
    save_config(cfg, run_dir / "config.json")
    state = build_state(load_model("tiny", dtype=torch.float32, device="cpu"), cfg.learner)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in state.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    state.version = 3
    ckpt.save_checkpoint(run_dir, state)
    return {k: v.clone() for k, v in state.model.state_dict().items()}


@pytest.mark.integration
def test_cli_scores_the_checkpoint_and_reproduces_the_runs_own_held_out_number(tmp_path, capsys):
    torch.set_num_threads(1)
    cfg = with_overrides(PRESETS["tiny"](), task={"eval_size": 24})  # larger_digit: one-token answers
    weights = tiny_run(tmp_path / "run", cfg)
    out = tmp_path / "r.json"
    assert evaluate_heldout.main([str(tmp_path / "run"), "--size", "60", "--samples", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["prompts"] == 60 and results["run_held_out_prompts"] == 24
    assert results["checkpoint"].endswith("step_00000003") and results["dtype"] == cfg.actor.dtype
    greedy = [p["greedy_correct"] for p in results["per_prompt"]]
    assert results["pass@1"] == pytest.approx(sum(greedy) / 60)
    assert results["pass@1_standard_error"] == pytest.approx((sum(greedy) / 60 * (1 - sum(greedy) / 60) / 60) ** 0.5)
    assert results["pass@2"] == pytest.approx(sum(p["sampled_correct"] > 0 for p in results["per_prompt"]) / 60)
    # The run's own evaluation of the same weights on its held-out set gives the same greedy answers and pass@1.
    tokenizer, run_set = load_tokenizer("tiny"), load_prompts(cfg.task, "eval")
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    base = [score_prompts(model, tokenizer, run_set, cfg, 0)[i].greedy_text for i in range(24)]
    model.load_state_dict(weights)
    assert [p["greedy_response"] for p in results["per_prompt"][:24]] == \
        [r.greedy_text for r in score_prompts(model, tokenizer, run_set, cfg, 0)]
    assert results["run_held_out_pass@1"] == evaluate(model, tokenizer, run_set, cfg)["eval/pass@1"]
    # ... and those are the checkpoint's answers, not the base model's.
    assert base != [p["greedy_response"] for p in results["per_prompt"][:24]]
    assert "held-out pass@1" in capsys.readouterr().out


@pytest.mark.integration
def test_cli_refuses_bad_arguments_with_status_2(tmp_path, capsys):
    tiny_run(tmp_path / "run", PRESETS["tiny"]())
    assert evaluate_heldout.main([str(tmp_path / "nowhere")]) == 2
    assert evaluate_heldout.main([str(tmp_path / "run"), "--size", "0"]) == 2
    assert evaluate_heldout.main([str(tmp_path / "run"), "--samples", "-1"]) == 2
    assert evaluate_heldout.main([str(tmp_path / "run"), "--size", "1000"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "--size must be >= 1" in err and "--samples must be >= 0" in err
    assert "--size 1000: larger_digit has too few questions" in err


@pytest.mark.integration
def test_a_bfloat16_actor_is_scored_as_its_engine_holds_the_weights(tmp_path):
    """The checkpoint's weights are copied into a model built in bfloat16 (as an engine receives them), whose rotary
    frequencies stay float32: the answers equal that model's, not a float32 model's cast afterwards."""
    torch.set_num_threads(1)
    cfg = with_overrides(PRESETS["tiny"](), actor={"dtype": "bfloat16"})
    weights = tiny_run(tmp_path / "run", cfg)
    out = tmp_path / "r.json"
    assert evaluate_heldout.main([str(tmp_path / "run"), "--size", "32", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    model = load_model("tiny", dtype=torch.bfloat16, device="cpu")
    model.load_state_dict(weights)
    expected = score_prompts(model, load_tokenizer("tiny"), load_prompts(cfg.task, "eval"), cfg, 0)
    assert results["dtype"] == "bfloat16"
    assert [p["greedy_response"] for p in results["per_prompt"]] == [r.greedy_text for r in expected]
