"""Evaluate a run's checkpoint on a wider held-out set of the run's own generated task.

    python -m learner.evaluate_heldout RUN_DIR[/checkpoints/step_N] [--size 512] [--samples 0] [--out F.json]

A training run evaluates on `task.eval_size` held-out prompts to keep its evaluations short (64 on cpu-demo), and
at ~50% accuracy one such evaluation has a standard error of ~0.06: two checkpoints, or two runs of one
configuration, often differ by more than that by chance. This command scores a checkpoint on `--size` held-out
prompts of the same task instead (512: standard error ~0.022).

The wider set is the run's held-out draws continued: the held-out seed's draws without repeated questions, skipping
every question the run trained on (the run's own held-out set was drawn first and kept out of training; later draws
were not). Its first `task.eval_size` prompts are therefore exactly the run's held-out set, and the command prints
pass@1 on them too, which equals the run's own number for the same weights (up to batching in low precision).
Only generated tasks (reasoning_gym, procedural) can draw more prompts; a dataset's held-out split is what the
dataset holds, and `learner.evaluate_suite` evaluates benchmark suites.

Greedy pass@1 always; with `--samples k` (k >= 1) also pass@k and the mean reward of k answers sampled at the run's
actor.temperature. The model is the run's base model with the checkpoint's weights, in the run's actor dtype (the
precision its evaluations ran in), on the run's actor device. `--out` writes the numbers and each prompt's question,
answer, greedy response and results as JSON. Errors (no checkpoint, a dataset task, a size the task cannot fill)
exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from learner.evaluate_suite import EvaluateError, run_and_checkpoint, write_results

GENERATED_SOURCES = ("reasoning_gym", "procedural")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m learner.evaluate_heldout", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory (newest checkpoint) or one checkpoint")
    parser.add_argument("--size", type=int, default=512, help="held-out prompts (default 512)")
    parser.add_argument("--samples", type=int, default=0,
                        help="sampled answers per prompt for pass@k and mean reward@k (default 0: greedy only)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.size < 1:
        raise EvaluateError(f"--size must be >= 1, got {args.size}")
    if args.samples < 0:
        raise EvaluateError(f"--samples must be >= 0, got {args.samples}")
    return args


def wide_held_out(task: Any, size: int) -> list[Any]:
    """`size` held-out prompts of a generated task: its held-out draws without repeats, less the questions the run
    trained on. The first task.eval_size are the run's held-out set."""
    from common.tasks import TaskError, load_prompts

    if task.source not in GENERATED_SOURCES:
        raise EvaluateError(f"task.source = {task.source}: only generated tasks ({', '.join(GENERATED_SOURCES)}) "
                            f"draw more held-out prompts; evaluate a dataset with learner.evaluate_suite")
    trained = {p.question for p in load_prompts(task, "train")}
    try:
        # Every trained question may appear among the draws, so this many draws leave at least `size` others.
        draws = load_prompts(replace(task, eval_size=max(size, task.eval_size) + len(trained)), "eval")
    except TaskError as exc:
        raise EvaluateError(f"--size {size}: {task.name} has too few questions outside the run's "
                            f"{len(trained)} trained ones ({exc})") from None
    return [p for p in draws if p.question not in trained][:size]


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of a fraction p measured on n prompts."""
    return math.sqrt(p * (1.0 - p) / n)


def evaluate_heldout(run_dir: Path, checkpoint: Path, size: int, samples: int) -> dict[str, Any]:
    import torch

    from common.config import ConfigError, load_config
    from common.models import load_model, load_tokenizer, resolve_device
    from learner.checkpoint import CheckpointError, load_weights
    from learner.evaluate import aggregate, score_prompts

    try:
        cfg = load_config(run_dir / "config.json")
    except ConfigError as exc:
        raise EvaluateError(f"{run_dir}/config.json: {exc}") from None
    prompts = wide_held_out(cfg.task, size)
    # The checkpoint's float32 weights load into a float32 model and are copied into one built in the actor's dtype,
    # as an engine receives them: casting the whole model instead would also round buffers the engine keeps in
    # float32 (e.g. rotary frequencies), and change some greedy answers.
    device = resolve_device(cfg.actor.device)
    master = load_model(cfg.run.model, dtype=torch.float32, device=device)
    try:
        load_weights(checkpoint, master)
    except CheckpointError as exc:
        raise EvaluateError(f"cannot load {checkpoint} into base model {cfg.run.model}: {exc}") from None
    if cfg.actor.dtype == "float32":
        model = master
    else:
        model = load_model(cfg.run.model, dtype=getattr(torch, cfg.actor.dtype), device=device)
        model.load_state_dict(master.state_dict())
        del master
    start = time.perf_counter()
    results = score_prompts(model, load_tokenizer(cfg.run.model), prompts, cfg, samples)
    seconds = time.perf_counter() - start
    run_set = results[: cfg.task.eval_size]
    metrics = aggregate(results, samples)
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint), "task": cfg.task.name, "prompts": len(results), "dtype": cfg.actor.dtype,
        **metrics, "pass@1_standard_error": standard_error(metrics["pass@1"], len(results)),
        "run_held_out_prompts": len(run_set),
        "run_held_out_pass@1": aggregate(run_set, 0)["pass@1"] if run_set else 0.0, "seconds": seconds,
    }
    out["per_prompt"] = [{"prompt_id": p.prompt_id, "question": p.question, "answer": p.answer,
                          "greedy_response": r.greedy_text, "greedy_correct": r.greedy_correct,
                          "sampled_correct": sum(r.sampled_correct)} for p, r in zip(prompts, results)]
    return out


def summary_line(results: dict[str, Any]) -> str:
    line = (f"{results['checkpoint']}: held-out pass@1 {results['pass@1']:.4f} "
            f"(± {results['pass@1_standard_error']:.4f} standard error) on {results['prompts']} prompts; "
            f"on the run's {results['run_held_out_prompts']} held-out prompts {results['run_held_out_pass@1']:.4f}")
    extra = [f"{key} {results[key]:.4f}" for key in results if key.startswith(("pass@", "mean_reward@"))
             and key not in ("pass@1", "pass@1_standard_error")]
    return line + ("; " + ", ".join(extra) if extra else "") + f" ({results['seconds']:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    from common.tasks import TaskError

    try:
        args = parse_args(argv)
        run_dir, checkpoint = run_and_checkpoint(args.checkpoint)
        results = evaluate_heldout(run_dir, checkpoint, args.size, args.samples)
    except (EvaluateError, TaskError) as exc:
        print(f"evaluate_heldout: error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(results))
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
