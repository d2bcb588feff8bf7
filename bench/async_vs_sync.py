"""Async vs sync on the real system: the same preset, thread budget and learner steps with
algo.max_staleness = 0 (sync) and 2, 4 (async), over several seeds, against the ideal pipeline bound.

    python bench/async_vs_sync.py --preset tiny --seeds 0 1 2 --runs-dir runs/avs   # 9 runs, ~10-20 min on 2 cores
    python bench/async_vs_sync.py --quick                                    # seed 0, 8 steps: 3 runs, ~2-3 min
    python bench/async_vs_sync.py --preset cpu-demo --seeds 0 1 2 --out-json runs/avs.json   # hours
    python bench/async_vs_sync.py --sync-threads 1 --extra --learner.groups-per-step 8

Each run is `run_async.py` as a child process (bench/_runs.py: one log per run in its run dir, completed runs are
reused, Ctrl-C stops the child). Thread budget: the sync run gives actor and learner all `--cores` (they alternate;
`--sync-threads` changes it), the async runs give each stage its share (actor cores//2, learner the rest), so at
most `--cores` threads compute at any time. Evaluations run only at the start and the end (`--run.eval-every 0`);
they run on the actors (the buffer hands them out within run.eval_share of the generated sequences), so the
initial one shares the actors with the first training steps inside the window measured. run.seed reaches the actor's sampling generator and the learner's
torch seed (its evaluation sampling); the tiny model's initial weights and the buffer's prompt order (buffer.seed)
do not depend on it.

Per run: wall s (launch to exit, startup included) and run samples/s = the buffer's final samples_received / wall.
Over the training window (start of the first step -> end of the last step's train+broadcast):
  samples/s       generated samples in the window / window (bench/_runs.py sample_points: each actor lease record
                  covers the time since the previous one at its rollout/samples_per_s; linear within a lease)
  learner idle    sum of time/fetch_wait_s / window
  actor idle      per lease record, idle = rollout/idle_fraction x the time since the previous record; summed
  gen stage       samples/s of the actor while not idle: sum(rollout/samples_per_s x dt) / sum((1 - idle) x dt)
                  (generation, scoring, submission and weight swaps: the stage's work, minus its waiting)
  train stage     generated samples per step / mean time/step_s (train + broadcast, fetch wait excluded)
  ideal           the slower stage; pipeline efficiency = samples/s / ideal
Across runs, with per-step stage times t = samples per step / stage rate (gen) and mean step_s (train):
  ideal async/sync ratio = (t_gen + t_train of the sync run, all cores) / max(t_gen, t_train of the async run,
  one share each); measured ratio = sync window / async window (same steps). Seeds are paired (sync seed s with
  async seed s) and both ratios reported as mean ± std over seeds. Output: a markdown table to stdout, --out-json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._runs import (  # noqa: E402
    RunFailed,
    RunSpec,
    available_cores,
    eval_key,
    fmt_ms,
    jsonable,
    load_run,
    mean_std,
    run_all,
    run_evals,
    samples_at,
    split_threads,
    step_records,
    training_window,
)

STALENESS = (0, 2, 4)
QUICK_STEPS = 8


def config_name(staleness: int) -> str:
    return "sync" if staleness == 0 else f"async-s{staleness}"


def build_specs(preset: str, seeds: Sequence[int], staleness: Sequence[int], cores: int,
                steps: int | None, sync_threads: int | None = None) -> list[RunSpec]:
    """Sync runs give each stage `sync_threads` (default: every core); async runs split the cores between them."""
    actor_share, learner_share = split_threads(cores)
    specs = []
    for s in staleness:
        actor_t, learner_t = ((sync_threads or cores,) * 2) if s == 0 else (actor_share, learner_share)
        for seed in seeds:
            name = f"avs-{preset}-{config_name(s)}-t{actor_t}x{learner_t}-steps{steps or 'preset'}-seed{seed}"
            args = ("--algo.max-staleness", str(s), "--run.seed", str(seed), "--run.eval-every", "0",
                    "--actor.threads", str(actor_t), "--learner.threads", str(learner_t))
            specs.append(RunSpec(name, args, config_name(s), seed))
    return specs


def actor_stage(records: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """Idle fraction and busy-time throughput of one actor over the window, from its per-lease records.

    A record's counters cover the time since the actor's previous record (its stats are reset after each
    record), so dt = the gap between consecutive records; the first record has no known start and is skipped."""
    wall = idle = samples = busy = 0.0
    for prev, rec in zip(records, records[1:]):
        if not start <= rec["time"] <= end:
            continue
        dt = rec["time"] - prev["time"]
        frac = rec["rollout/idle_fraction"]
        wall += dt
        idle += frac * dt
        samples += rec["rollout/samples_per_s"] * dt
        busy += (1.0 - frac) * dt
    return {"idle_fraction": idle / wall if wall else math.nan,
            "busy_samples_per_s": samples / busy if busy else math.nan}


def summarize_run(data: Any) -> dict[str, float]:
    """The throughput and accuracy numbers of one run (see the module docstring for each definition)."""
    start, end = training_window(data.learner)
    window = end - start
    steps = step_records(data.learner)
    generated = samples_at(data.sample_points, end) - samples_at(data.sample_points, start)
    per_step = generated / len(steps)
    stages = [actor_stage(recs, start, end) for recs in data.actors.values()]
    gen_rate = sum(s["busy_samples_per_s"] for s in stages)
    step_s = sum(r["time/step_s"] for r in steps) / len(steps)
    train_rate = per_step / step_s
    ideal = min(gen_rate, train_rate)
    measured = generated / window
    evals = run_evals(data)
    final = evals[-1:]
    reward_key = eval_key(evals, "eval/mean_reward@")
    hist = {int(k): v for k, v in data.counters.get("staleness_hist", {}).items()}
    served = sum(hist.values())
    return {
        "wall_s": data.wall_s, "window_s": window, "steps": len(steps), "samples": generated,
        "samples_per_step": per_step, "samples_per_s": measured,
        "run_samples_per_s": data.counters.get("samples_received", math.nan) / data.wall_s,
        "learner_idle": sum(r["time/fetch_wait_s"] for r in steps) / window,
        "actor_idle": mean_std([s["idle_fraction"] for s in stages])[0],
        "gen_samples_per_s": gen_rate, "train_samples_per_s": train_rate, "ideal_samples_per_s": ideal,
        "efficiency": measured / ideal, "gen_step_s": per_step / gen_rate, "train_step_s": step_s,
        "pass@1": final[0]["eval/pass@1"] if final else math.nan,
        "mean_reward@k": final[0].get(reward_key, math.nan) if final and reward_key else math.nan,
        "staleness_mean": sum(k * v for k, v in hist.items()) / served if served else math.nan,
    }


def ratios(sync: dict[str, float], async_: dict[str, float]) -> dict[str, float]:
    """Ideal and measured async/sync speed-up of one seed pair (same learner steps)."""
    ideal = (sync["gen_step_s"] + sync["train_step_s"]) / max(async_["gen_step_s"], async_["train_step_s"])
    measured = sync["window_s"] / async_["window_s"]
    return {"ideal_ratio": ideal, "measured_ratio": measured, "measured_over_ideal": measured / ideal}


def summarize(runs: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any]:
    """Per config: mean ± std over seeds of every run metric; per async config: the paired ratios."""
    out: dict[str, Any] = {"configs": {}, "ratios": {}}
    for config, by_seed in runs.items():
        keys = next(iter(by_seed.values())).keys()
        out["configs"][config] = {k: mean_std([r[k] for r in by_seed.values()]) for k in keys}
    sync = runs.get("sync", {})
    for config, by_seed in runs.items():
        pairs = [ratios(sync[s], by_seed[s]) for s in by_seed if config != "sync" and s in sync]
        if pairs:
            out["ratios"][config] = {k: mean_std([p[k] for p in pairs]) for k in pairs[0]}
    return out


COLUMNS = [("wall s", "wall_s", 0), ("run samples/s", "run_samples_per_s", 1), ("window s", "window_s", 1),
           ("samples/s", "samples_per_s", 1),
           ("learner idle", "learner_idle", 2), ("actor idle", "actor_idle", 2),
           ("gen stage samples/s", "gen_samples_per_s", 1), ("train stage samples/s", "train_samples_per_s", 1),
           ("ideal samples/s", "ideal_samples_per_s", 1), ("pipeline efficiency", "efficiency", 2),
           ("trained staleness", "staleness_mean", 2), ("final pass@1", "pass@1", 3),
           ("final mean_reward@K", "mean_reward@k", 3)]


def markdown(runs: dict[str, dict[int, dict[str, float]]]) -> str:
    """Two tables: per-config metrics (mean ± std over seeds) and the async/sync ratios."""
    lines = ["| config | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for config, by_seed in runs.items():
        cells = [fmt_ms([r[key] for r in by_seed.values()], digits) for _, key, digits in COLUMNS]
        lines.append(f"| {config} | {len(by_seed)} | " + " | ".join(cells) + " |")
    sync = runs.get("sync", {})
    lines += ["", "| async config | sync t_gen + t_train (s/step) | async max(t_gen, t_train) (s/step) | "
              "ideal async/sync | measured async/sync | measured / ideal |", "|---|---|---|---|---|---|"]
    for config, by_seed in runs.items():
        seeds = [s for s in by_seed if config != "sync" and s in sync]
        if not seeds:
            continue
        pairs = [ratios(sync[s], by_seed[s]) for s in seeds]
        lines.append(" | ".join([
            f"| {config}", fmt_ms([sync[s]["gen_step_s"] + sync[s]["train_step_s"] for s in seeds], 2),
            fmt_ms([max(by_seed[s]["gen_step_s"], by_seed[s]["train_step_s"]) for s in seeds], 2),
            fmt_ms([p["ideal_ratio"] for p in pairs], 2), fmt_ms([p["measured_ratio"] for p in pairs], 2),
            fmt_ms([p["measured_over_ideal"] for p in pairs], 2)]) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "cpu-demo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run.seed values (default 0 1 2)")
    parser.add_argument("--staleness", type=int, nargs="+", default=list(STALENESS),
                        help="max_staleness values; 0 is the sync baseline")
    parser.add_argument("--steps", type=int, default=None, help="learner.total_steps (default: the preset's)")
    parser.add_argument("--cores", type=int, default=available_cores(), help="thread budget (default: all)")
    parser.add_argument("--sync-threads", type=int, default=None,
                        help="torch threads of each stage in the sync runs (default: --cores, as the stages "
                             "alternate); 1 shows what oversubscribed threads cost on a busy machine")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--timeout-s", type=float, default=7200.0, help="limit per run")
    parser.add_argument("--quick", action="store_true", help=f"seed 0 only, {QUICK_STEPS} steps (unless given)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags passed to every run_async.py run, last (so they override); put it last")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.steps is None and args.quick:
        args.steps = QUICK_STEPS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="async_vs_sync-"))
    specs = build_specs(args.preset, args.seeds, args.staleness, args.cores, args.steps, args.sync_threads)
    print(f"{len(specs)} runs of preset {args.preset} in {runs_dir} (cores {args.cores})", flush=True)
    try:
        dirs = run_all(specs, args.preset, runs_dir, args.steps, args.extra, args.timeout_s)
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; completed runs are kept and will be reused", file=sys.stderr)
        return 130
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for spec, run_dir in zip(specs, dirs):
        runs.setdefault(spec.config, {})[spec.seed] = summarize_run(load_run(run_dir))
    print(markdown(runs))
    if args.out_json:
        payload = {"preset": args.preset, "seeds": args.seeds, "steps": args.steps, "cores": args.cores,
                   "runs_dir": str(runs_dir), "runs": runs, "summary": summarize(runs)}
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
