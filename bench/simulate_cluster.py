"""Discrete-event simulation of the asynchronous RLVR system at GPU-cluster scale.

What it models: K inference engines with continuous batching (`slots_per_engine` concurrent sequences each), one
learner, and the buffer's admission control (docs/ALGORITHM.md §5). A lease is one group of `samples_per_group`
responses whose lengths are drawn from a capped lognormal (long tail). The learner trains on `groups_per_step` groups at
`learner_tokens_per_s`, then broadcasts weights for `sync_time_s` (engines pause meanwhile), then the policy version
goes up. A lease is granted only while served + queued + in_flight + 1 <= (version + max_staleness + 1) ×
groups_per_step; the learner takes the oldest queued groups first and drops (counts) any whose staleness exceeds
max_staleness. max_staleness = 0 makes generation and training alternate: the synchronous baseline.

Decode speed (the one batch effect kept): an engine advances all its running sequences by one token per decode
step, and a step takes base + per_seq × active seconds, with the base being `fixed_step_fraction` of the full-batch
step time slots / engine_tokens_per_s. fixed_step_fraction = 1 is purely memory-bound decoding (a lone straggler
decodes no faster than a full batch); 0 means aggregate throughput does not depend on occupancy. Prefill, KV-cache
growth and preemption are not modelled.

Run:
    python bench/simulate_cluster.py run --max-staleness 4          # one simulation, prints the metrics
    python bench/simulate_cluster.py validate --gen-time-s 8 --train-time-s 22   # CPU ratio, closed form vs sim
    python bench/simulate_cluster.py project                         # AReaL- and verl-like settings, plots
Outputs are deterministic under --seed.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

_EPS = 1e-9


@dataclass(frozen=True)
class SimConfig:
    """One simulated system. Throughputs are per engine / for the whole learner."""

    engines: int = 8
    """K inference engines (one engine may span several GPUs with tensor parallelism)."""
    slots_per_engine: int = 256
    """Concurrent sequences per engine (continuous-batching capacity)."""
    engine_tokens_per_s: float = 20_000.0
    """Decode throughput of one engine with all slots busy."""
    fixed_step_fraction: float = 0.5
    """Share of a full-batch decode step that does not shrink with fewer running sequences."""
    learner_tokens_per_s: float = 50_000.0
    """Training throughput (prompt + response tokens per second, whole learner)."""
    sync_time_s: float = 5.0
    """Weight broadcast per update; the learner and the engines both wait for it."""
    pause_engines_during_sync: bool = True
    """Engines stop decoding while weights are broadcast (AReaL interrupts; off = a free background copy)."""
    groups_per_step: int = 64
    """Groups (prompts) per optimizer step."""
    samples_per_group: int = 16
    """Responses per prompt (n)."""
    prompt_tokens: int = 256
    """Prompt length, counted in the training tokens only (prefill is not modelled)."""
    length_dist: Literal["lognormal", "fixed"] = "lognormal"
    """Response lengths: capped lognormal, or every response exactly median_tokens long."""
    median_tokens: float = 2_000.0
    """Median response length (the fixed length when length_dist = fixed)."""
    length_sigma: float = 0.8
    """Sigma of log(length); larger = longer tail."""
    max_new_tokens: int = 8_192
    """Cap on response length (a truncated response has exactly this many tokens)."""
    max_staleness: int = 4
    """docs/ALGORITHM.md §5 bound; 0 = synchronous on-policy."""
    steps: int = 30
    """Learner steps to simulate."""
    seed: int = 0

    def __post_init__(self):
        if min(self.engines, self.slots_per_engine, self.groups_per_step, self.samples_per_group, self.steps) < 1:
            raise ValueError("engines, slots_per_engine, groups_per_step, samples_per_group, steps must be >= 1")
        if not 0.0 <= self.fixed_step_fraction <= 1.0:
            raise ValueError("fixed_step_fraction must lie in [0, 1]")
        if self.max_staleness < 0 or self.sync_time_s < 0:
            raise ValueError("max_staleness and sync_time_s must be >= 0")


@dataclass
class _Group:
    group_id: int
    lease_version: int
    remaining: int
    tokens: int  # prompt + response tokens of all samples: what the learner trains on


@dataclass
class _Engine:
    running: list = field(default_factory=list)  # heap of (decode step at which it finishes, sample seq, group)
    pending: deque = field(default_factory=deque)  # (length, group) leased but waiting for a free slot
    steps_done: float = 0.0  # decode steps executed so far (a sequence started at s finishes at s + length)
    last_t: float = 0.0
    stamp: int = 0  # invalidates the scheduled completion event when the engine's state changes
    blocked: bool = False  # refused by admission control; retried when the version changes or groups drop
    idle_s: float = 0.0
    busy_slot_s: float = 0.0


@dataclass
class SimResult:
    wall_s: float
    steps: int
    steps_per_hour: float
    samples_per_s: float
    learner_idle_fraction: float
    engine_idle_fraction: float
    slot_utilisation: float
    staleness_hist: dict[int, int]
    groups_dropped_stale: int
    max_admission_excess: int  # max over grants of (served+queued+in_flight) - limit; <= 0 when the rule holds
    step_end_times: list[float]


class _Sim:
    """Mutable state of one run; the event loop lives in `simulate`."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.engines = [_Engine() for _ in range(cfg.engines)]
        self.events: list = []
        self.seq = 0  # tie-breaker: events at equal times run in scheduling order, so runs are deterministic
        self.version = 0
        self.served = 0
        self.in_flight = 0
        self.queue: list = []  # heap of (lease_version, group_id, group): the learner takes the oldest first
        self.next_group = 0
        self.paused = False
        self.learner_busy = False
        self.learner_busy_s = 0.0
        self.steps_done = 0
        self.samples_trained = 0
        self.staleness = Counter()
        self.dropped = 0
        self.max_excess = -10**9
        self.step_end_times: list[float] = []
        full_step = cfg.slots_per_engine / cfg.engine_tokens_per_s
        self.step_base = cfg.fixed_step_fraction * full_step
        self.step_per_seq = (1.0 - cfg.fixed_step_fraction) * full_step / cfg.slots_per_engine

    def push(self, t: float, kind: str, payload=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def draw_lengths(self, n: int) -> np.ndarray:
        cfg = self.cfg
        if cfg.length_dist == "fixed":
            return np.full(n, int(cfg.median_tokens))
        raw = cfg.median_tokens * np.exp(cfg.length_sigma * self.rng.standard_normal(n))
        return np.clip(np.rint(raw), 1, cfg.max_new_tokens).astype(int)


def _decode_step_s(sim: _Sim, active: int) -> float:
    return sim.step_base + sim.step_per_seq * active


def _advance(sim: _Sim, eng: _Engine, now: float) -> None:
    """Bring the engine's decode-step counter and idle accounting up to `now`."""
    dt = now - eng.last_t
    active = len(eng.running)
    if sim.paused and sim.cfg.pause_engines_during_sync or active == 0:
        eng.idle_s += dt
    else:
        eng.steps_done += dt / _decode_step_s(sim, active)
        eng.busy_slot_s += active * dt
    eng.last_t = now


def _reschedule(sim: _Sim, e: int, now: float) -> None:
    """Schedule the engine's next sequence completion under its current occupancy (old events go stale)."""
    eng = sim.engines[e]
    eng.stamp += 1
    if not eng.running or (sim.paused and sim.cfg.pause_engines_during_sync):
        return
    steps_left = max(0.0, eng.running[0][0] - eng.steps_done)
    sim.push(now + steps_left * _decode_step_s(sim, len(eng.running)), "engine", (e, eng.stamp))


def _try_lease(sim: _Sim) -> _Group | None:
    """docs/ALGORITHM.md §5 admission control: grant one group only if the count stays within the staleness window."""
    cfg = sim.cfg
    limit = (sim.version + cfg.max_staleness + 1) * cfg.groups_per_step
    if sim.served + len(sim.queue) + sim.in_flight + 1 > limit:
        return None
    sim.in_flight += 1
    sim.max_excess = max(sim.max_excess, sim.served + len(sim.queue) + sim.in_flight - limit)
    group = _Group(sim.next_group, sim.version, cfg.samples_per_group, 0)
    sim.next_group += 1
    return group


def _fill_engine(sim: _Sim, e: int, now: float) -> None:
    """Start sequences in free slots, leasing new groups while admission control allows."""
    eng = sim.engines[e]
    _advance(sim, eng, now)
    eng.blocked = False
    while len(eng.running) < sim.cfg.slots_per_engine:
        if not eng.pending:
            group = _try_lease(sim)
            if group is None:
                eng.blocked = True
                break
            lengths = sim.draw_lengths(sim.cfg.samples_per_group)
            group.tokens = int(lengths.sum()) + sim.cfg.prompt_tokens * len(lengths)
            eng.pending.extend((int(n), group) for n in lengths)
        length, group = eng.pending.popleft()
        sim.seq += 1
        heapq.heappush(eng.running, (eng.steps_done + length, sim.seq, group))
    _reschedule(sim, e, now)


def _on_engine_event(sim: _Sim, e: int, stamp: int, now: float) -> None:
    eng = sim.engines[e]
    if stamp != eng.stamp:
        return
    _advance(sim, eng, now)
    while eng.running and eng.running[0][0] <= eng.steps_done + _EPS:
        _, _, group = heapq.heappop(eng.running)
        group.remaining -= 1
        if group.remaining == 0:
            sim.in_flight -= 1
            heapq.heappush(sim.queue, (group.lease_version, group.group_id, group))
    _fill_engine(sim, e, now)
    _learner_try_start(sim, now)


def _drop_stale(sim: _Sim) -> int:
    dropped = 0
    while sim.queue and sim.version - sim.queue[0][0] > sim.cfg.max_staleness:
        heapq.heappop(sim.queue)
        dropped += 1
    sim.dropped += dropped
    return dropped


def _learner_try_start(sim: _Sim, now: float) -> None:
    """Fetch a batch (oldest groups first) and train, if the learner is free and enough groups are queued."""
    cfg = sim.cfg
    if sim.learner_busy or sim.steps_done >= cfg.steps:
        return
    if _drop_stale(sim):
        _wake_blocked(sim, now)
    if len(sim.queue) < cfg.groups_per_step:
        return
    batch = [heapq.heappop(sim.queue)[2] for _ in range(cfg.groups_per_step)]
    sim.served += len(batch)
    for group in batch:
        sim.staleness[sim.version - group.lease_version] += 1
    sim.samples_trained += cfg.samples_per_group * len(batch)
    train_s = sum(g.tokens for g in batch) / cfg.learner_tokens_per_s
    sim.learner_busy = True
    sim.learner_busy_s += train_s + cfg.sync_time_s
    sim.push(now + train_s, "trained")


def _on_trained(sim: _Sim, now: float) -> None:
    """Training done: broadcast weights (engines pause), then the version goes up at sync end."""
    for e, eng in enumerate(sim.engines):
        _advance(sim, eng, now)
    sim.paused = True
    for e in range(len(sim.engines)):
        _reschedule(sim, e, now)
    sim.push(now + sim.cfg.sync_time_s, "synced")


def _on_synced(sim: _Sim, now: float) -> None:
    for eng in sim.engines:
        _advance(sim, eng, now)
    sim.paused = False
    sim.version += 1
    sim.steps_done += 1
    sim.learner_busy = False
    sim.step_end_times.append(now)
    for e in range(len(sim.engines)):
        _reschedule(sim, e, now)
    _wake_blocked(sim, now)
    _learner_try_start(sim, now)


def _wake_blocked(sim: _Sim, now: float) -> None:
    for e, eng in enumerate(sim.engines):
        if eng.blocked:
            _fill_engine(sim, e, now)


def simulate(cfg: SimConfig) -> SimResult:
    """Run the event loop until `cfg.steps` learner steps (training + weight sync) have finished."""
    sim = _Sim(cfg)
    now = 0.0
    for e in range(cfg.engines):
        _fill_engine(sim, e, now)
    while sim.steps_done < cfg.steps:
        if not sim.events:
            raise RuntimeError(f"simulation stalled at t={now:.3f}s after {sim.steps_done} steps (no events left)")
        now, _, kind, payload = heapq.heappop(sim.events)
        if kind == "engine":
            _on_engine_event(sim, payload[0], payload[1], now)
        elif kind == "trained":
            _on_trained(sim, now)
        else:
            _on_synced(sim, now)
    return _result(sim, now)


def _result(sim: _Sim, wall: float) -> SimResult:
    cfg = sim.cfg
    for eng in sim.engines:
        _advance(sim, eng, wall)
    engine_time = wall * cfg.engines
    return SimResult(
        wall_s=wall,
        steps=sim.steps_done,
        steps_per_hour=3600.0 * sim.steps_done / wall,
        samples_per_s=sim.samples_trained / wall,
        learner_idle_fraction=1.0 - sim.learner_busy_s / wall,
        engine_idle_fraction=sum(eng.idle_s for eng in sim.engines) / engine_time,
        slot_utilisation=sum(eng.busy_slot_s for eng in sim.engines) / (engine_time * cfg.slots_per_engine),
        staleness_hist=dict(sorted(sim.staleness.items())),
        groups_dropped_stale=sim.dropped,
        max_admission_excess=sim.max_excess,
        step_end_times=sim.step_end_times,
    )


# ----------------------------------------------------------------------------------------- CPU validation


@dataclass(frozen=True)
class ValidateArgs:
    """Measured CPU stage timings for one learner step (defaults: DESIGN.md's 2-core SmolLM2 measurement)."""

    gen_time_s: float = 8.0
    """Generation of one step's batch with all cores."""
    train_time_s: float = 22.0
    """One training step with all cores."""
    sync_time_s: float = 0.2
    """One weight broadcast (135M fp32 params at gloo's 2-5 GB/s is 0.1-0.3 s)."""
    cores: int = 2
    gen_cores: int = 1
    """Cores given to generation in async mode; training gets the rest."""
    gen_time_share_s: float = 0.0
    """Generation time with its share of cores; 0 = linear scaling, gen_time_s × cores / gen_cores."""
    train_time_share_s: float = 0.0
    """Training time with its share of cores; 0 = linear scaling."""
    measured_ratio: float = 0.0
    """Measured async/sync steps-per-hour ratio to compare with (0 = none given)."""
    max_staleness: int = 2
    steps: int = 50


def share_times(args: ValidateArgs) -> tuple[float, float]:
    """Stage times when generation and training run side by side on their shares of the cores."""
    gen = args.gen_time_share_s or args.gen_time_s * args.cores / args.gen_cores
    train = args.train_time_share_s or args.train_time_s * args.cores / (args.cores - args.gen_cores)
    return gen, train


def ideal_cpu_ratio(args: ValidateArgs) -> float:
    """Ideal async/sync ratio when both phases share the same cores.

    Sync runs each stage with all cores one after the other; async runs them side by side, each on its share, so a
    step costs the slower stage. The weight sync stalls both in either mode. With sync_time 0 this is the ideal ratio
    ((gen + train) with all cores) / (slower stage with its share of cores).
    """
    gen_share, train_share = share_times(args)
    return (args.gen_time_s + args.train_time_s + args.sync_time_s) / (max(gen_share, train_share) + args.sync_time_s)


def cpu_sim_config(gen_time_s: float, train_time_s: float, sync_time_s: float, max_staleness: int,
                   steps: int) -> SimConfig:
    """One engine, fixed 16-token responses, 8 groups × 8 samples (the CPU run): throughputs from stage times."""
    groups, n, length, prompt = 8, 8, 16, 48
    return SimConfig(engines=1, slots_per_engine=groups * n, engine_tokens_per_s=groups * n * length / gen_time_s,
                     learner_tokens_per_s=groups * n * (length + prompt) / train_time_s, sync_time_s=sync_time_s,
                     groups_per_step=groups, samples_per_group=n, prompt_tokens=prompt, length_dist="fixed",
                     median_tokens=length, max_new_tokens=length, max_staleness=max_staleness, steps=steps)


def validate(args: ValidateArgs) -> dict:
    """Closed-form ideal ratio vs the simulator driven by the same stage timings (and a measured ratio if given)."""
    gen_share, train_share = share_times(args)
    sync = simulate(cpu_sim_config(args.gen_time_s, args.train_time_s, args.sync_time_s, 0, args.steps))
    asyn = simulate(cpu_sim_config(gen_share, train_share, args.sync_time_s, args.max_staleness, args.steps))
    report = {"inputs": dataclasses.asdict(args), "gen_share_s": gen_share, "train_share_s": train_share,
              "ideal_ratio": ideal_cpu_ratio(args), "sim_ratio": asyn.steps_per_hour / sync.steps_per_hour,
              "sim_sync_steps_per_hour": sync.steps_per_hour, "sim_async_steps_per_hour": asyn.steps_per_hour}
    if args.measured_ratio:
        report["measured_ratio"] = args.measured_ratio
        report["sim_over_measured"] = report["sim_ratio"] / args.measured_ratio
    return report


# ----------------------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class ClusterScenario:
    """A published-style setting. Every number here is an assumption of this benchmark, stated in BENCHMARKS.md."""

    name: str
    gpus: int
    gpus_per_engine: int
    gen_tokens_per_s_per_gpu: float
    train_tokens_per_s_per_gpu: float
    base: SimConfig
    gen_fractions: tuple[float, ...] = (0.5, 0.625, 0.75, 0.875)
    """GPU shares for generation tried in async mode (sync is colocated: all GPUs do both, in turn)."""


def colocated_sync(sc: ClusterScenario) -> SimConfig:
    """Synchronous baseline: every GPU generates, then every GPU trains (verl's colocated hybrid engine)."""
    return dataclasses.replace(sc.base, engines=sc.gpus // sc.gpus_per_engine,
                               engine_tokens_per_s=sc.gen_tokens_per_s_per_gpu * sc.gpus_per_engine,
                               learner_tokens_per_s=sc.train_tokens_per_s_per_gpu * sc.gpus, max_staleness=0)


def split_async(sc: ClusterScenario, gen_fraction: float, max_staleness: int) -> SimConfig:
    """Asynchronous: a fixed share of the GPUs generates, the rest trains."""
    engines = max(1, round(sc.gpus * gen_fraction / sc.gpus_per_engine))
    train_gpus = sc.gpus - engines * sc.gpus_per_engine
    if train_gpus < 1:
        raise ValueError(f"{sc.name}: gen_fraction {gen_fraction} leaves no GPU for training")
    return dataclasses.replace(sc.base, engines=engines,
                               engine_tokens_per_s=sc.gen_tokens_per_s_per_gpu * sc.gpus_per_engine,
                               learner_tokens_per_s=sc.train_tokens_per_s_per_gpu * train_gpus,
                               max_staleness=max_staleness)


def areal_like(steps: int) -> ClusterScenario:
    """Long-CoT RL of a 1.5B reasoning model on 32 GPUs (AReaL-style: interruptible generation, staleness 4)."""
    base = SimConfig(slots_per_engine=256, groups_per_step=512, samples_per_group=16, prompt_tokens=512,
                     median_tokens=4096, length_sigma=0.7, max_new_tokens=16384, sync_time_s=10.0, steps=steps)
    return ClusterScenario("areal_like_1.5b_32gpu", gpus=32, gpus_per_engine=1, gen_tokens_per_s_per_gpu=10_000,
                           train_tokens_per_s_per_gpu=30_000, base=base)


def verl_like(steps: int) -> ClusterScenario:
    """The DynaMO paper's setting (docs/ALGORITHM.md §6), 7B math model on 32 GPUs, verl sync vs one-step-off async."""
    base = SimConfig(slots_per_engine=256, groups_per_step=512, samples_per_group=16, prompt_tokens=512,
                     median_tokens=700, length_sigma=0.6, max_new_tokens=3072, sync_time_s=15.0, steps=steps)
    return ClusterScenario("verl_like_7b_32gpu", gpus=32, gpus_per_engine=1, gen_tokens_per_s_per_gpu=8_000,
                           train_tokens_per_s_per_gpu=7_000, base=base,
                           gen_fractions=(0.25, 0.375, 0.5, 0.625, 0.75))


def project(sc: ClusterScenario, max_staleness: int) -> dict:
    """Sync baseline and the best GPU split for async at `max_staleness`, with every split tried."""
    sync = simulate(colocated_sync(sc))
    splits = {f: simulate(split_async(sc, f, max_staleness)) for f in sc.gen_fractions}
    best_fraction = max(splits, key=lambda f: splits[f].steps_per_hour)
    return {"scenario": sc.name, "max_staleness": max_staleness, "sync": sync, "best_gen_fraction": best_fraction,
            "async": splits[best_fraction], "speedup": splits[best_fraction].steps_per_hour / sync.steps_per_hour,
            "speedup_by_fraction": {f: r.steps_per_hour / sync.steps_per_hour for f, r in splits.items()}}


def _summary(r: SimResult) -> dict:
    """Headline metrics of one run (the per-step end times are left out)."""
    d = dataclasses.asdict(r)
    d.pop("step_end_times")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _plot_projection(results: list[dict], img_dir: Path) -> list[Path]:
    """Speed-up vs max_staleness per scenario, and the staleness histogram of each scenario's largest bound."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({r["scenario"] for r in results})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = [r for r in results if r["scenario"] == name]
        ax1.plot([r["max_staleness"] for r in rows], [r["speedup"] for r in rows], "o-", label=name)
        last = rows[-1]["async"].staleness_hist
        total = sum(last.values())
        ax2.bar([k + (0.2 if name == names[-1] else -0.2) for k in last], [v / total for v in last.values()],
                width=0.4, label=f"{name} (max_staleness {rows[-1]['max_staleness']})")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set(xlabel="max_staleness", ylabel="async / sync steps per hour", title="Projected speed-up (best split)")
    ax2.set(xlabel="staleness of trained groups", ylabel="fraction of groups", title="Staleness histogram")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = img_dir / "sim_cluster_projection.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def run_projections(steps: int, staleness_values: tuple[int, ...], img_dir: Path) -> list[dict]:
    results = []
    for scenario in (areal_like(steps), verl_like(steps)):
        for s in staleness_values:
            results.append(project(scenario, s))
            r = results[-1]
            print(f"{r['scenario']:24s} max_staleness={s}  speed-up {r['speedup']:.2f}x  "
                  f"(best gen share {r['best_gen_fraction']}; by share "
                  f"{ {f: round(v, 2) for f, v in r['speedup_by_fraction'].items()} })")
            print(f"    sync : {_summary(r['sync'])}\n    async: {_summary(r['async'])}")
    for path in _plot_projection(results, img_dir):
        print(f"wrote {path}")
    return results


@dataclass(frozen=True)
class Cli:
    """Pick one mode; without --validate or --project one simulation of --sim.* runs and its metrics print."""

    validate: bool = False
    """Predict the CPU async/sync ratio from measured stage timings (--val.*)."""
    project: bool = False
    """Project async vs sync for the AReaL-like and verl-like cluster settings; writes the plot."""
    quick: bool = False
    """Fewer simulated steps in --project (a few seconds instead of ~a minute)."""
    sim: SimConfig = SimConfig()
    val: ValidateArgs = ValidateArgs()
    img_dir: str = "docs/img"


def main(cli: Cli) -> None:
    if cli.validate:
        print(json.dumps(validate(cli.val), indent=2))
    elif cli.project:
        steps = 8 if cli.quick else 20
        run_projections(steps, (0, 1, 2, 4) if not cli.quick else (1, 4), Path(cli.img_dir))
    else:
        print(json.dumps(_summary(simulate(cli.sim)), indent=2))


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Cli))
