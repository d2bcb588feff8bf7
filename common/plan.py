"""The checks `run_async.py` makes before it starts any role, and the run plan `run_async.py --dry-run` prints.

`check_model_or_exit(cfg)` resolves the model (a hub model is downloaded here, once per host, so the roles find it
in the cache) and loads its config and tokenizer; a model that cannot be found or loaded stops run_async with one
line. `plan_lines(cfg)` does the same and also loads the task's prompts (every column and row check), then
describes what would run: roles, engines and GPUs, steps and batch. Nothing is started.
"""

from __future__ import annotations

import dataclasses

from typing import TYPE_CHECKING

from common.config import Config, ConfigError

if TYPE_CHECKING:
    from common.models import ModelInfo


def check_model_or_exit(cfg: Config) -> "ModelInfo":
    """The model's `ModelInfo`; SystemExit with one line when it cannot be found or loaded."""
    from common.models import ModelError, check_model

    try:
        return check_model(cfg.run.model)
    except ModelError as exc:
        raise SystemExit(f"error: run.model: {exc}") from None


def plan_lines(cfg: Config) -> list[str]:
    """The run plan: model, data, roles, GPUs, steps, batch (checks the model and the data on the way)."""
    from common.tasks import TaskError, describe_task

    info = check_model_or_exit(cfg)
    try:
        # With run.eval_suite the suite replaces the held-out split (run_async.py lists its benchmarks).
        data = describe_task(dataclasses.replace(cfg.task, eval_size=0) if cfg.run.eval_suite else cfg.task)
    except TaskError as exc:
        raise SystemExit(f"error: task: {exc}") from None
    if cfg.run.eval_suite:
        data = [f"eval: the {cfg.run.eval_suite} suite (below), not the task's held-out split" if line.startswith(
            "eval:") else line for line in data]
    algo, task, actor, learner = cfg.algo, cfg.task, cfg.actor, cfg.learner
    lines = [info.describe()]
    if info.context is not None and actor.max_new_tokens >= info.context:
        lines.append(f"warning: actor.max_new_tokens {actor.max_new_tokens} leaves no room for a prompt in the "
                     f"model's {info.context}-token context")
    lines += [f"data {line}" for line in data]
    scorer = "last \\boxed{} + math-verify" if task.scorer == "math" or task.source == "hf" else task.source
    lines.append(f"scoring: {scorer}; reward {task.reward_correct:g} correct / {task.reward_wrong:g} wrong")
    lines += _role_lines(cfg) + dtype_warnings(cfg)
    lines.append(f"steps: {learner.total_steps} x {learner.groups_per_step} prompts (~{algo.n_mean} responses "
                 f"each, {algo.allocation_mode} allocation in [{algo.n_min}, {algo.n_max}]), "
                 f"{learner.mini_batches} optimizer mini-batch(es) per step, lr {learner.lr:g} "
                 f"({learner.warmup_steps} warm-up), max staleness {algo.max_staleness}")
    lines.append(f"generation: up to {actor.max_new_tokens} new tokens, temperature {actor.temperature:g}, "
                 f"top-p {actor.top_p:g}")
    return lines


def dtype_warnings(cfg: Config) -> list[str]:
    """One warning line naming the roles (HF actor engine, learner) that compute in bfloat16 on a CPU without bf16
    instructions (common.models.cpu_has_native_bf16), where float32 is faster; none otherwise. The cpu-demo preset
    uses bf16 because the CPUs it is measured on have them."""
    from common.models import cpu_has_native_bf16, resolve_device

    slow = [(f"{role}.dtype", f"--{role}.dtype float32") for role, section in (("actor", cfg.actor),
                                                                                ("learner", cfg.learner))
            if section.dtype == "bfloat16" and resolve_device(section.device) == "cpu"
            and not (role == "actor" and cfg.actor.engine != "hf")]
    if not slow or cpu_has_native_bf16():
        return []
    fields, flags = ", ".join(f for f, _ in slow), " ".join(f for _, f in slow)
    return [f"warning: {fields} bfloat16 on a CPU without bf16 instructions (no AVX512-BF16 or AMX found): "
            f"float32 is faster here ({flags})"]


def _role_lines(cfg: Config) -> list[str]:
    from common.layout import plan_layout

    try:
        layout = plan_layout(cfg)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    lines = [f"buffer: {cfg.buffer.address}, waves of {cfg.buffer.wave_size} prompts",
             f"learner: device {cfg.learner.device}, GPU ids {list(layout.learner_gpus)} (one data-parallel rank "
             f"each under torchrun; run_async.py starts one process, on the first)"]
    for engine in layout.engines:
        gpus = list(engine.gpu_ids) if engine.gpu_ids else "its own"
        lines.append(f"actor {engine.actor_index}: {cfg.actor.engine} engine {engine.url}, tp {engine.tp_size}, "
                     f"GPUs {gpus}, weight-sync rank {engine.rank_offset}")
    lines.append(f"weight sync: world size {layout.world_size} ({layout.weight_layout})")
    return lines
