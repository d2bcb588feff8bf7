"""Where everything runs: the weight-sync ranks of the engines and the GPUs of the learner and of the engines.

`plan_layout(cfg)` is a pure function of the Config, so the learner (size of the weight-sync group), each actor
(its engines, their rank offsets and GPUs) and the supervisor (each role's CUDA_VISIBLE_DEVICES) agree without
talking to each other. The mapping, also stated in docs/CLUSTER.md:

- Rank 0 of the weight-sync group is the learner (its global data-parallel rank 0).
- HF engines: actor i is one engine of one rank, rank 1 + i.
- SGLang engines: each engine belongs to exactly one actor. With `actor.sglang_urls` empty, actor i launches one
  engine. Otherwise the URLs are dealt to the actors in contiguous blocks, as evenly as possible (the first
  len(urls) mod num_actors actors get one more); fewer URLs than actors is refused. Engines are numbered in that
  order; engine j has rank offset 1 + j * tp and holds ranks offset .. offset + tp - 1. World = 1 + sum of tp.
- GPUs: the learner's local rank r uses `learner.gpus[r]` (default r). Engines of actors on the learner's host
  (`actor.actors_per_host` 0) take `actor.gpus` in slices of tp (HF: one id) in actor order; with
  `actors_per_host` P > 0 the actors run P to a host of their own and actor i takes slice i mod P. Empty
  `actor.gpus`: launched SGLang engines take the ids after the learner's (0, 1, ... on hosts of their own); HF
  engines share the learner's GPUs. Attached SGLang servers run on GPUs of their own choosing (gpu_ids empty).
- Refused: an SGLang engine on a learner GPU, and two SGLang engines on one GPU. Their weights arrive over NCCL,
  and NCCL cannot place two ranks of one communicator on one device (the second server would also run out of
  memory). HF engines may share the learner's GPU: their weights travel over gloo from CPU staging buffers
  (common/weight_protocol.py, `transport_device`), which is the path a one-GPU colocated run takes.

A "GPU id" is a CUDA device index as an un-narrowed process on that host sees it. A role started with a narrowed
CUDA_VISIBLE_DEVICES also gets DYNAMO_GPU_IDS (the ids behind its visible devices, in order), so `cuda_index` can
turn an id back into the role's own device index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Mapping

from common.config import Config, ConfigError

LAUNCHED = "launched"
"""`EngineSlot.url` of an SGLang engine its actor starts itself."""
IN_PROCESS = "in-process"
"""`EngineSlot.url` of an HF engine (it runs inside the actor process)."""
GPU_IDS_ENV = "DYNAMO_GPU_IDS"
"""Set with a narrowed CUDA_VISIBLE_DEVICES: the GPU ids behind the role's visible devices, comma-separated."""

WeightLayout = Literal["per_tensor", "flat"]


@dataclass(frozen=True)
class EngineSlot:
    actor_index: int
    """The actor that owns (and alone drives) this engine."""
    url: str
    """Server URL of an attached SGLang engine, LAUNCHED, or IN_PROCESS (HF)."""
    tp_size: int
    """Weight-sync ranks this engine holds (its tensor-parallel size)."""
    rank_offset: int
    """First weight-sync rank of the engine; it holds rank_offset .. rank_offset + tp_size - 1."""
    gpu_ids: tuple[int, ...]
    """GPU ids of the actor's host the engine runs on; empty for attached servers."""


@dataclass(frozen=True)
class Layout:
    engines: tuple[EngineSlot, ...]
    world_size: int
    """Size of the weight-sync group: 1 (the learner) + the engines' ranks."""
    learner_gpus: tuple[int, ...]
    """GPU ids of the learner host's data-parallel ranks, by local rank (when the learner uses CUDA)."""
    weight_layout: WeightLayout
    """`per_tensor` (SGLang, NCCL between GPUs) or `flat` (HF, gloo from CPU staging)."""
    colocated: bool
    """Some engine shares a GPU with the learner (allowed only for HF engines, over gloo)."""

    def engines_of(self, actor_index: int) -> tuple[EngineSlot, ...]:
        found = tuple(e for e in self.engines if e.actor_index == actor_index)
        if not found:
            raise ConfigError(f"actor index {actor_index}: not an actor of this layout "
                              f"(actor.num_actors engines span actors 0..{self.engines[-1].actor_index})")
        return found

    def actor_gpus(self, actor_index: int) -> tuple[int, ...]:
        return tuple(g for e in self.engines_of(actor_index) for g in e.gpu_ids)


def _attached_blocks(urls: tuple[str, ...], num_actors: int) -> list[tuple[int, str]]:
    """(actor index, url) in URL order: contiguous blocks, the first len(urls) % num_actors one longer."""
    if len(urls) < num_actors:
        raise ConfigError(f"actor.sglang_urls: {len(urls)} server(s) for actor.num_actors = {num_actors}; each "
                          f"engine belongs to exactly one actor, so every actor needs at least one URL")
    if len(set(urls)) != len(urls):
        raise ConfigError("actor.sglang_urls: a server is listed twice (each engine belongs to one actor)")
    base, extra = divmod(len(urls), num_actors)
    owners = [actor for actor in range(num_actors) for _ in range(base + (1 if actor < extra else 0))]
    return list(zip(owners, urls))


def _gpu_slice(cfg: Config, actor_index: int, width: int, default_start: int) -> tuple[int, ...]:
    """The `width` GPU ids of actor `actor_index` on its host (see the module docstring)."""
    per_host = cfg.actor.actors_per_host
    slot = actor_index % per_host if per_host else actor_index
    slots = per_host or cfg.actor.num_actors
    pool = cfg.actor.gpus or tuple(range(default_start, default_start + slots * width))
    if len(pool) < slots * width:
        raise ConfigError(f"actor.gpus: {slots} actor(s) per host x {width} GPU(s) each need {slots * width} "
                          f"GPU ids, got {list(pool)}")
    return tuple(pool[slot * width:(slot + 1) * width])


def _engines(cfg: Config, learner_gpus: tuple[int, ...]) -> list[EngineSlot]:
    actor = cfg.actor
    if actor.engine == "hf":
        shared = learner_gpus if not actor.actors_per_host else (0,)
        return [EngineSlot(i, IN_PROCESS, 1, 1 + i, _gpu_slice(cfg, i, 1, 0) if actor.gpus
                           else (shared[i % len(shared)],)) for i in range(actor.num_actors)]
    tp = actor.sglang_tp_size
    if actor.sglang_urls:
        owners = _attached_blocks(actor.sglang_urls, actor.num_actors)
        return [EngineSlot(a, url, tp, 1 + j * tp, ()) for j, (a, url) in enumerate(owners)]
    start = 0 if actor.actors_per_host else max(learner_gpus) + 1
    return [EngineSlot(i, LAUNCHED, tp, 1 + i * tp, _gpu_slice(cfg, i, tp, start))
            for i in range(actor.num_actors)]


def _refuse_shared_nccl_gpus(cfg: Config, engines: list[EngineSlot], learner_gpus: tuple[int, ...]) -> None:
    """Engines never share a GPU with each other (actor.gpus has no repeats, slices are disjoint); refuse one on a
    learner GPU of the same host."""
    if cfg.actor.actors_per_host or cfg.learner.device == "cpu":
        return
    for e in engines:
        for g in e.gpu_ids:
            if g in learner_gpus:
                raise ConfigError(
                    f"actor.gpus: SGLang engine of actor {e.actor_index} on GPU {g}, which the learner uses "
                    f"(learner.gpus {list(learner_gpus)}); NCCL cannot place two ranks of the weight-sync group on "
                    f"one GPU. Give the engines other GPUs, or use actor.engine=hf to share the learner's GPU")


def plan_layout(cfg: Config) -> Layout:
    """Engines (owner, url, tp, rank offset, GPUs) and the weight-sync world size; ConfigError names a bad field."""
    learner_gpus = cfg.learner.gpus or (0,)
    engines = _engines(cfg, learner_gpus)
    weight_layout: WeightLayout = "per_tensor" if cfg.actor.engine == "sglang" else "flat"
    if weight_layout == "per_tensor":
        _refuse_shared_nccl_gpus(cfg, engines, learner_gpus)
    colocated = (cfg.actor.actors_per_host == 0 and cfg.learner.device != "cpu" and cfg.actor.device != "cpu"
                 and any(g in learner_gpus for e in engines for g in e.gpu_ids))
    world = 1 + sum(e.tp_size for e in engines)
    return Layout(tuple(engines), world, learner_gpus, weight_layout, colocated)


def learner_gpu(cfg: Config, local_rank: int) -> int:
    """GPU id of the learner's data-parallel rank `local_rank` on its host; refuses one an SGLang engine holds."""
    if cfg.learner.gpus and local_rank >= len(cfg.learner.gpus):
        raise ConfigError(f"learner.gpus: local rank {local_rank} has no GPU in {list(cfg.learner.gpus)} "
                          f"(give one id per data-parallel rank of this host)")
    gpu = cfg.learner.gpus[local_rank] if cfg.learner.gpus else local_rank
    layout = plan_layout(cfg)
    if layout.weight_layout == "per_tensor" and cfg.actor.actors_per_host == 0:
        for e in layout.engines:
            if gpu in e.gpu_ids:
                raise ConfigError(f"learner.gpus: learner rank {local_rank} on GPU {gpu}, which the SGLang engine "
                                  f"of actor {e.actor_index} uses; list the learner's GPUs in learner.gpus")
    return gpu


# ---------------------------------------------------------------------------------------------- environment


def _visible(env: Mapping[str, str]) -> list[str] | None:
    value = env.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _own_ids(env: Mapping[str, str]) -> list[int] | None:
    value = env.get(GPU_IDS_ENV)
    return None if value is None else [int(v) for v in value.split(",") if v.strip()]


def cuda_index(gpu_id: int, env: Mapping[str, str] | None = None) -> int:
    """This process's CUDA device index of GPU id `gpu_id` (differs when a supervisor narrowed its devices)."""
    own = _own_ids(os.environ if env is None else env)
    if own is None:
        return gpu_id
    if gpu_id not in own:
        raise ConfigError(f"GPU {gpu_id} is not among this role's GPUs {own} ({GPU_IDS_ENV}); "
                          f"the config and the role's environment disagree")
    return own.index(gpu_id)


def narrowed_env(gpu_ids: tuple[int, ...], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES and DYNAMO_GPU_IDS for a child that should see only `gpu_ids` (its device k is
    gpu_ids[k]), written in the parent's own device names so an outer narrowing (SLURM, a UUID list) carries over."""
    env = os.environ if env is None else env
    visible = _visible(env)
    names = []
    for g in gpu_ids:
        local = cuda_index(g, env)
        if visible is not None and local >= len(visible):
            raise ConfigError(f"GPU {g} is not visible here (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})")
        names.append(visible[local] if visible is not None else str(local))
    return {"CUDA_VISIBLE_DEVICES": ",".join(names), GPU_IDS_ENV: ",".join(str(g) for g in gpu_ids)}


def role_gpu_ids(cfg: Config, role: str, actor_index: int = 0) -> tuple[int, ...]:
    """GPU ids a role started by the supervisor should see: the learner's, or actor `actor_index`'s engines'.
    Empty when the layout does not place the role: a CPU device, an explicit `cuda:N`, or attached servers only."""
    if role == "learner":
        return () if cfg.learner.device == "cpu" or ":" in cfg.learner.device else plan_layout(cfg).learner_gpus
    if cfg.actor.engine == "hf" and (cfg.actor.device == "cpu" or ":" in cfg.actor.device):
        return ()
    return plan_layout(cfg).actor_gpus(actor_index)


def hf_engine_device(cfg: Config, actor_index: int, cuda_available: bool) -> str:
    """Device of actor `actor_index`'s HF engine: its layout GPU when it runs on CUDA, else actor.device."""
    device = cfg.actor.device
    if device == "cpu" or ":" in device or (device == "auto" and not cuda_available):
        return "cpu" if device == "auto" else device
    return f"cuda:{cuda_index(plan_layout(cfg).actor_gpus(actor_index)[0])}"
