"""Evaluate a run checkpoint or a Hugging Face model on a benchmark suite (default: the paper's six math sets).

    python -m learner.evaluate_suite (--checkpoint RUN_DIR[/checkpoints/step_N] | --model HF_DIR_OR_NAME)
        [--suite math6|SUITE.json] [--k 32] [--max-new-tokens 4096] [--limit N] [--out results.json]

Draws k samples per prompt at temperature 1.0 (top-p 1, no top-k), grades each with the math scorer, and prints per
benchmark `avg@k` (mean accuracy over the samples: the paper's P@1) and `pass@k`, then their unweighted average over
benchmarks; `--out` writes the same numbers, and each prompt's count of correct samples, as JSON. A checkpoint is
read through its run's config.json (base model, system prompt, chat template) and learner.checkpoint (either
format); `--model` takes an exported directory (learner.export), a hub id or `tiny`. Generation is transformers'
`generate`, batched as the learner's held-out evaluation does it: this module needs the learner's checkpoint reader,
and the actor's engines are not reachable from learner/. One progress line per benchmark goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class EvaluateError(RuntimeError):
    """The evaluation cannot run as asked (no checkpoint there, bad argument, unreadable suite)."""


@dataclass
class Loaded:
    """The model to evaluate, with how its prompts are written."""

    model: Any
    tokenizer: Any
    label: str
    system_prompt: str
    use_chat_template: bool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m learner.evaluate_suite", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a run directory (newest checkpoint) or one checkpoint")
    source.add_argument("--model", help="an exported/HF model directory, a hub id, or tiny")
    parser.add_argument("--suite", default="math6", help="a built-in suite (math6) or a suite JSON file")
    parser.add_argument("--k", type=int, default=32, help="samples per prompt (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="response length cap (default 4096)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts of each benchmark")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--system-prompt", default=None,
                        help="system message (default: the run's task.system_prompt, else a \\boxed{} request)")
    parser.add_argument("--batch-sequences", type=int, default=64, help="sequences generated at once (default 64)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = parser.parse_args(argv)
    for name in ("k", "max_new_tokens", "batch_sequences"):
        if getattr(args, name) < 1:
            raise EvaluateError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise EvaluateError(f"--limit must be >= 1, got {args.limit}")
    return args


def run_and_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory (its newest checkpoint) or a checkpoint directory."""
    from learner.checkpoint import latest_checkpoint

    if (path / "config.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise EvaluateError(f"{path}: a run directory without checkpoints")
        return path, found
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.json").is_file() and path.is_dir():
        return path.parent.parent, path
    raise EvaluateError(f"{path}: neither a run directory (with config.json) nor "
                        f"RUN_DIR/checkpoints/step_N")


def load(args: argparse.Namespace, device: str) -> Loaded:
    import torch

    from common.models import ModelError, load_model, load_tokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        if args.model is not None:
            tokenizer = load_tokenizer(args.model)
            model = load_model(args.model, dtype=dtype, device=device)
            system, chat = DEFAULT_SYSTEM_PROMPT, bool(getattr(tokenizer, "chat_template", None))
            label = args.model
        else:
            model, tokenizer, system, chat, label = _load_checkpoint(args.checkpoint, dtype, device)
    except (ModelError, OSError) as exc:
        raise EvaluateError(f"cannot load the model: {exc}") from None
    if args.system_prompt is not None:
        system = args.system_prompt
    return Loaded(model, tokenizer, label, system, chat)


def _load_checkpoint(path: Path, dtype: Any, device: str) -> tuple[Any, Any, str, bool, str]:
    from common.config import ConfigError, load_config
    from common.models import load_model, load_tokenizer
    from learner.checkpoint import CheckpointError, load_weights

    run_dir, checkpoint = run_and_checkpoint(path)
    try:
        cfg = load_config(run_dir / "config.json")
    except ConfigError as exc:
        raise EvaluateError(f"--checkpoint {path}: {run_dir}/config.json: {exc}") from None
    model = load_model(cfg.run.model, dtype=dtype, device=device)
    try:
        load_weights(checkpoint, model)
    except CheckpointError as exc:
        raise EvaluateError(f"cannot load {checkpoint} into base model {cfg.run.model}: {exc}") from None
    task = cfg.task
    return model, load_tokenizer(cfg.run.model), task.system_prompt, task.use_chat_template, str(checkpoint)


def evaluate_benchmark(loaded: Loaded, prompts: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Samples, grades and summarises one benchmark."""
    from common.config import TaskConfig
    from common.suites import benchmark_metrics
    from common.tasks import encode_prompt, math_score
    from learner.evaluate import generate_batched

    task = TaskConfig(source="hf", scorer="math", system_prompt=loaded.system_prompt,
                      use_chat_template=loaded.use_chat_template)
    ids = [encode_prompt(loaded.tokenizer, p.question, task) for p in prompts]
    responses = generate_batched(loaded.model, loaded.tokenizer, ids, max_new_tokens=args.max_new_tokens,
                                 do_sample=True, num_return_sequences=args.k, temperature=1.0,
                                 batch_size=max(1, args.batch_sequences // args.k))
    correct = [[math_score(p.answer, loaded.tokenizer.decode(r)) for r in responses[i * args.k:(i + 1) * args.k]]
               for i, p in enumerate(prompts)]
    metrics = benchmark_metrics(correct, args.k)
    return {"prompts": len(prompts), **metrics, "correct": [sum(row) for row in correct],
            "response_tokens/mean": sum(len(r) for r in responses) / len(responses)}


def evaluate_suite(loaded: Loaded, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from common.suites import load_benchmark, load_suite, suite_average

    suite = load_suite(args.suite)
    torch.manual_seed(args.seed)
    per: dict[str, dict[str, Any]] = {}
    for benchmark in suite.benchmarks:
        start = time.perf_counter()
        data = load_benchmark(benchmark, args.limit)
        result = evaluate_benchmark(loaded, data.prompts, args)
        per[benchmark.name] = {"dataset": benchmark.dataset, "split": benchmark.split,
                               "skipped_rows": len(data.skipped), **result}
        print(f"evaluate_suite: {benchmark.name}: {result['prompts']} prompts x {args.k}, "
              f"avg@{args.k} {result[f'avg@{args.k}']:.3f}, pass@{args.k} {result[f'pass@{args.k}']:.3f} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    keys = (f"avg@{args.k}", f"pass@{args.k}")
    average = suite_average({name: {key: r[key] for key in keys} for name, r in per.items()})
    return {"suite": suite.name, "model": loaded.label, "k": args.k, "temperature": 1.0,
            "max_new_tokens": args.max_new_tokens, "limit": args.limit, "system_prompt": loaded.system_prompt,
            "benchmarks": per, "average": average}


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    k = results["k"]
    table = Table(title=f"{results['suite']} — {results['model']} (k={k}, temperature 1.0)")
    for column in ("benchmark", "prompts", f"avg@{k} (P@1)", f"pass@{k}"):
        table.add_column(column, justify="left" if column == "benchmark" else "right")
    for name, r in results["benchmarks"].items():
        table.add_row(name, str(r["prompts"]), f"{100 * r[f'avg@{k}']:.1f}", f"{100 * r[f'pass@{k}']:.1f}")
    avg = results["average"]
    table.add_row("average", "", f"{100 * avg[f'avg@{k}']:.1f}", f"{100 * avg[f'pass@{k}']:.1f}", style="bold")
    Console(width=100).print(table)


def main(argv: list[str] | None = None) -> int:
    from common.models import resolve_device
    from common.suites import SuiteError
    from common.tasks import TaskError

    try:
        args = parse_args(argv)
        from common.suites import load_suite

        load_suite(args.suite)  # a bad suite answers before the model loads
        loaded = load(args, resolve_device(args.device))
        results = evaluate_suite(loaded, args)
    except (EvaluateError, SuiteError, TaskError) as exc:
        print(f"evaluate_suite: error: {exc}", file=sys.stderr)
        return 2
    print_table(results)
    write_results(args.out, results)
    return 0


def write_results(path: Path | None, results: dict[str, Any]) -> None:
    """`results` as indented JSON at `path` (its directory made), or nothing when path is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
