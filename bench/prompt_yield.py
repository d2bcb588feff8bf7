"""Informative yield at equal learner steps: uniform GRPO vs DynaMO allocation, each with and without pre-rollout
prompt skipping (docs/ALGORITHM.md §8), several seeds each.

    python bench/prompt_yield.py --preset cpu-demo --seeds 0 1 2 --steps 20 --runs-dir runs/yield
    python bench/prompt_yield.py --preset tiny --seeds 0 1 2 --task spread          # 12 short runs
    python bench/prompt_yield.py --runs-dir runs/yield --arms dynamo dynamo-skip --extra --learner.threads 1
    python bench/prompt_yield.py --simulate --pool 32 256 --seeds 0 1 2    # the buffer alone, seconds

Each run is `run_async.py` as a child process (bench/_runs.py: one log per run, completed runs are reused). Every
arm gets the same preset, learner steps and thread split. `--task spread` replaces the preset's task with
reasoning-gym `basic_arithmetic` of 2 terms of 1 to 3 digits, so that prompts differ in difficulty and
allocation and skipping have something to choose between; `--task preset` keeps the preset's.

Per run, from the final buffer snapshot's counters and the actors' lease records (definitions):
- generated groups / samples: every group the actors submitted (`groups_received`, `samples_received`), dropped
  ones included;
- informative groups: groups with reward variance (`groups_received - groups_zero_variance`), the only ones that
  give a gradient;
- samples per informative group = generated samples / informative groups (lower is better: the cost of one
  group that teaches something); yield = informative / generated groups;
- generation seconds per learner step: the actors' busy generation time (tokens / tokens-per-second of each lease
  record, summed over actors) divided by the learner steps;
- final pass@1: the last held-out evaluation (greedy) of the run;
- wall seconds: from the run's first record to the learner's last step; with `--target X`, wall seconds to
  target = from the first record to the learner step (version) of the first evaluation with pass@1 >= X (the
  evaluation's own latency left out: it runs beside training), and learner steps to target (NaN if never).

A generation-bound setting (the learner waits on the actors, so yield turns into wall time), e.g.
    python bench/prompt_yield.py --arms dynamo dynamo-skip --seeds 0 1 --steps 60 --target 0.3 \
        --extra --learner.groups-per-step 2 --task.size 64 --run.eval-every 5 --run.eval-samples 2

`--simulate` runs the buffer's own leasing (`buffer.state.BufferState`, the arm's allocation and skipping flags)
without a model: a pool of `--pool` prompts whose success probabilities are fixed per prompt (40% never solved,
20% always solved, 40% uniform in [0.1, 0.9], drawn from the seed), rewards drawn per sample, every group submitted
at once, `--groups` groups per run. It isolates prompt selection from learning: the difficulties do not change as
they would while a model trains, and nothing is asynchronous.

The summary gives mean ± std over seeds per arm and, per skipping arm, the ratio of its samples per informative
group to its arm without skipping (`--baseline` for the reference; default `dynamo`, the default run's arm).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._runs import RunFailed, RunSpec, available_cores, fmt_ms, jsonable, mean_std, run_all, \
    split_threads  # noqa: E402

ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("GRPO", ("--algo.allocation-mode", "uniform", "--algo.no-modulation", "--algo.no-prompt-skipping")),
    "grpo-skip": ("GRPO + skipping", ("--algo.allocation-mode", "uniform", "--algo.no-modulation",
                                      "--algo.prompt-skipping")),
    "dynamo": ("DynaMO", ("--algo.allocation-mode", "reference", "--algo.modulation", "--algo.no-prompt-skipping")),
    "dynamo-skip": ("DynaMO + skipping", ("--algo.allocation-mode", "reference", "--algo.modulation",
                                          "--algo.prompt-skipping")),
}
"""name -> (label, flags); ADORA off in every arm (the preset's default)."""
SPREAD_TASK = ("--task.source", "reasoning_gym", "--task.name", "basic_arithmetic", "--task.params-json",
               '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 3}')


def generation_seconds(actor_records: list[dict[str, Any]]) -> float:
    """Busy generation seconds of one actor: each lease record's generated tokens over its tokens per second.

    A record covers the time since the previous record (the first: unknown, left out) at rollout/samples_per_s,
    so its samples are samples_per_s x dt and its tokens samples x rollout/response_length/mean."""
    total = 0.0
    for prev, rec in zip(actor_records, actor_records[1:]):
        rate = rec.get("rollout/tokens_per_s") or 0.0
        if rate <= 0:
            continue
        samples = rec["rollout/samples_per_s"] * (rec["time"] - prev["time"])
        total += samples * rec.get("rollout/response_length/mean", 0.0) / rate
    return total


def time_to_target(records: list[dict[str, Any]], target: float) -> tuple[float, float]:
    """(wall seconds, learner steps) to the first evaluated version with pass@1 >= target (NaN, NaN if none)."""
    nan = float("nan")
    start = min((r["time"] for r in records if "time" in r), default=nan)
    step_time = {r["step"]: r["time"] for r in records if r["role"] == "learner" and r.get("time/step_s") is not None}
    for rec in sorted((r for r in records if r.get("eval/pass@1") is not None), key=lambda r: r["step"]):
        if rec["eval/pass@1"] >= target:
            version = rec["step"]
            reached = start if version == 0 else step_time.get(version, rec["time"])
            return reached - start, float(version)
    return nan, nan


def summarize_run(counters: dict[str, Any], records: list[dict[str, Any]],
                  target: float | None = None) -> dict[str, float]:
    """One run's yield numbers (see the module docstring) from its buffer counters and metrics records."""
    groups = counters.get("groups_received", 0)
    informative = groups - counters.get("groups_zero_variance", 0)
    samples = counters.get("samples_received", 0)
    steps = max((r["step"] for r in records if r["role"] == "learner" and r.get("time/step_s") is not None),
                default=0)
    actors: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if rec["role"].startswith("actor") and rec.get("rollout/samples_per_s") is not None:
            actors.setdefault(rec["role"], []).append(rec)
    evals = sorted((r for r in records if r.get("eval/pass@1") is not None), key=lambda r: r["step"])
    nan = float("nan")
    times = [r["time"] for r in records if "time" in r]
    last_step = max((r["time"] for r in records if r["role"] == "learner" and r.get("time/step_s") is not None),
                    default=nan)
    wall_to_target, steps_to_target = time_to_target(records, target) if target is not None else (nan, nan)
    return {
        "wall_s": last_step - min(times) if times else nan,
        "wall_s_to_target": wall_to_target,
        "steps_to_target": steps_to_target,
        "steps": steps,
        "groups": groups,
        "informative_groups": informative,
        "samples": samples,
        "yield": informative / groups if groups else nan,
        "samples_per_informative_group": samples / informative if informative else nan,
        "generation_s_per_step": sum(generation_seconds(r) for r in actors.values()) / steps if steps else nan,
        "prompts_skipped": counters.get("prompts_skipped", 0),
        "final_pass@1": evals[-1]["eval/pass@1"] if evals else nan,
    }


def load(run_dir: Path, target: float | None = None) -> dict[str, float]:
    from buffer.state import decode_snapshot
    from common.metrics import read_metrics

    snap = decode_snapshot((run_dir / "buffer_snapshot.msgpack").read_bytes())
    counters = {f: getattr(snap.counters, f) for f in snap.counters.__struct_fields__}
    return summarize_run(counters, read_metrics(run_dir / "metrics.jsonl"), target)


def report(runs: dict[str, list[dict[str, float]]], baseline: str, target: float | None = None) -> str:
    """Markdown: one row per arm (mean ± std over seeds), then each skipping arm against its arm without."""
    keys = [("yield", "informative yield", 3), ("samples_per_informative_group", "samples / informative group", 1),
            ("generation_s_per_step", "generation s / learner step", 1), ("prompts_skipped", "prompts skipped", 0),
            ("final_pass@1", "final pass@1", 3), ("wall_s", "wall s", 0)]
    if target is not None:
        keys += [("wall_s_to_target", f"wall s to pass@1 >= {target}", 0),
                 ("steps_to_target", "learner steps to target", 0)]
    lines = ["| arm | seeds | " + " | ".join(label for _, label, _ in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for arm, rows in runs.items():
        cells = [fmt_ms([r.get(k, float("nan")) for r in rows], digits) for k, _, digits in keys]
        lines.append(f"| {ARMS[arm][0]} | {len(rows)} | " + " | ".join(cells) + " |")
    lines.append("")
    for arm, rows in runs.items():
        plain = arm.removesuffix("-skip")
        if arm == plain or plain not in runs:
            continue
        cost, _ = mean_std([r["samples_per_informative_group"] for r in rows])
        for ref in dict.fromkeys((plain, baseline)):
            if ref in runs:
                ref_cost, _ = mean_std([r["samples_per_informative_group"] for r in runs[ref]])
                lines.append(f"- {ARMS[arm][0]}: samples per informative group {cost:.1f} = {cost / ref_cost:.2f}x "
                             f"{ARMS[ref][0]}'s {ref_cost:.1f}")
    return "\n".join(lines)


SIM_FLAGS: dict[str, dict[str, Any]] = {
    "grpo": {"allocation_mode": "uniform", "prompt_skipping": False},
    "grpo-skip": {"allocation_mode": "uniform", "prompt_skipping": True},
    "dynamo": {"allocation_mode": "reference", "prompt_skipping": False},
    "dynamo-skip": {"allocation_mode": "reference", "prompt_skipping": True},
}


def simulate(arm: str, pool: int, groups: int, seed: int, preset: str = "cpu-demo") -> dict[str, float]:
    """Yield of the buffer's leasing alone on a pool of fixed-difficulty prompts (see the module docstring)."""
    import random

    from buffer.state import BufferState, PromptRecord
    from common.config import PRESETS, with_overrides
    from common.schemas import Group, make_sample

    rng = random.Random(seed)
    success = []
    for _ in range(pool):
        u = rng.random()
        success.append(0.0 if u < 0.4 else 1.0 if u < 0.6 else rng.uniform(0.1, 0.9))
    cfg = with_overrides(PRESETS[preset](), algo={**SIM_FLAGS[arm], "max_staleness": 10**6},
                         buffer={"max_queued_groups": 10**6, "seed": seed})
    state = BufferState(cfg, [PromptRecord(f"p{i}", f"question {i}", "0") for i in range(pool)])
    generated = informative = samples = 0
    while generated < groups:
        grant = state.lease("sim", cfg.actor.prompts_per_lease, now=0.0)
        for item in grant.items:
            p = success[int(item.prompt_id[1:])]
            correct = [rng.random() < p for _ in range(item.n)]
            group = Group(prompt_id=item.prompt_id, prompt_tokens=b"\x01\x00\x00\x00", samples=[
                make_sample([1], [-0.5], [0], reward=float(c), correct=c, finish_reason="stop") for c in correct])
            state.submit(grant.lease_id, group, now=0.0)
            generated += 1
            samples += item.n
            informative += 0 < sum(correct) < len(correct)
        state.queue.clear()  # the learner takes everything at once
    return {"yield": informative / generated, "samples_per_informative_group": samples / max(informative, 1),
            "prompts_skipped": state.counters.prompts_skipped,
            "mixed_prompts": sum(0 < p < 1 for p in success) / pool}


def simulation_report(args: argparse.Namespace) -> str:
    lines = ["| pool | arm | seeds | informative yield | samples / informative group | prompts skipped | "
             "prompts with 0 < p < 1 |", "|---|---|---|---|---|---|---|"]
    for pool in args.pool:
        for arm in args.arms:
            rows = [simulate(arm, pool, args.groups, seed, args.preset) for seed in args.seeds]
            lines.append(f"| {pool} | {ARMS[arm][0]} | {len(rows)} | " + " | ".join(
                fmt_ms([r[k] for r in rows], d) for k, d in (("yield", 3), ("samples_per_informative_group", 1),
                                                             ("prompts_skipped", 0), ("mixed_prompts", 2))) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo", choices=["tiny", "cpu-demo"])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="learner.total_steps (default: the preset's)")
    parser.add_argument("--task", choices=["preset", "spread"], default="preset")
    parser.add_argument("--baseline", choices=list(ARMS), default="dynamo")
    parser.add_argument("--cores", type=int, default=available_cores(), help="thread budget (default: all)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="limit per run")
    parser.add_argument("--target", type=float, default=None, help="held-out pass@1 whose wall time is reported")
    parser.add_argument("--simulate", action="store_true", help="the buffer's leasing alone, no model (seconds)")
    parser.add_argument("--pool", type=int, nargs="+", default=[32, 256], help="--simulate: prompts in the pool")
    parser.add_argument("--groups", type=int, default=1200, help="--simulate: generated groups per run")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags passed to every run (last, so they override)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.simulate:
        print(simulation_report(args))
        return 0
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="prompt_yield_"))
    actor_t, learner_t = split_threads(args.cores)
    task = SPREAD_TASK if args.task == "spread" else ()
    specs = [RunSpec(f"py-{args.preset}-{args.task}-{arm}-steps{args.steps or 'preset'}-seed{seed}",
                     (*ARMS[arm][1], *task, "--run.seed", str(seed), "--actor.threads", str(actor_t),
                      "--learner.threads", str(learner_t)), arm, seed)
             for seed in args.seeds for arm in args.arms]  # seed-major: drift of the machine falls on every arm
    try:
        dirs = run_all(specs, args.preset, runs_dir, args.steps, args.extra, args.timeout_s)
    except RunFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    runs: dict[str, list[dict[str, float]]] = {}
    for spec, run_dir in zip(specs, dirs):
        runs.setdefault(spec.config, []).append(load(run_dir, args.target))
    print(report(runs, args.baseline, args.target))
    if args.out_json:
        args.out_json.write_text(json.dumps(jsonable(runs), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
