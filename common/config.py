"""Typed configuration for every role, with defaults in one place.

Each role reads the same `Config`; a role uses only its own section plus `algo` and `task`. The CLI
(`parse_cli`) starts from a preset (`--preset tiny|cpu-demo|gpu-cluster|paper-1.5b|paper-7b`) or a resolved config file
(`--config-file runs/<name>/config.json`) and overrides any field with tyro flags such as
`--algo.max-staleness 0` or `--actor.temperature 0.7`. `python run_async.py --help` lists them all.

Validation lives in `__post_init__`: a bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

AllocationMode = Literal["uniform", "reference", "neyman"]
PriorityRefresh = Literal["continuous", "epoch"]
ModulationScope = Literal["minibatch", "microbatch"]
StabExpectation = Literal["exact", "parity"]
ISMode = Literal["none", "truncate", "mask"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean"]
EngineKind = Literal["hf", "sglang"]
PauseMode = Literal["abort", "retract", "in_place"]
AbortPolicy = Literal["resubmit", "drop"]
WandbMode = Literal["offline", "online", "disabled"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def _check_suite(name: str) -> None:
    """run.eval_suite: '' or a built-in suite, or a .json suite file (read, and checked, where it is loaded)."""
    if not name or name.endswith(".json"):
        return
    from common.suites import SUITES  # lazy: common.suites reads common.tasks, which reads this module

    _check(name in SUITES, "run.eval_suite", f"unknown suite {name!r}; known: {sorted(SUITES)} or a .json suite file")


def _check_gpu_ids(gpus: tuple[int, ...], field_name: str) -> None:
    _check(all(0 <= g < 1024 for g in gpus), field_name, f"GPU ids must be in [0, 1024), got {list(gpus)}")
    _check(len(set(gpus)) == len(gpus), field_name, f"GPU ids must not repeat, got {list(gpus)}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """The algorithm (docs/ALGORITHM.md): allocation, advantages, modulation, loss, staleness."""

    allocation_mode: AllocationMode = "reference"
    """How rollouts per prompt are chosen: `uniform` (plain GRPO, n_mean each), `reference` (DynaMO
    water-filling on the Bernoulli-variance priority), `neyman` (the same on its square root)."""
    n_mean: int = 8
    """Mean rollouts per prompt; a wave of N prompts gets a budget of n_mean * N."""
    n_min: int = 4
    """Fewest rollouts any prompt gets."""
    n_max: int = 12
    """Most rollouts any prompt gets."""
    initial_budget: int = 4
    """Exploration budget: a prompt with fewer than max(n_min, initial_budget) scored responses is topped up first."""
    min_history: int = 4
    """Responses needed before a prompt's priority is known (below: priority -1)."""
    mastery: float = 0.85
    """Success rate at or above which a prompt gets the floor priority."""
    priority_floor: float = 0.01
    """Smallest priority of a known prompt."""
    priority_refresh: PriorityRefresh = "continuous"
    """`continuous`: recompute priorities at each allocation; `epoch`: only at epoch ends (paper parity)."""
    stats_half_life: float = 0.0
    """Exponential forgetting of per-prompt (G, k), half-life in responses; 0 disables forgetting."""
    prompt_skipping: bool = False
    """Skip prompts before rollout when their recent groups all had zero reward variance (ALGORITHM §8): a prompt
    with z zero-variance groups in a row and s skips since its last rollout enters a wave with probability
    p_explore^max(0, z - s). Off by default (the cpu-demo preset turns it on to keep its one actor ahead of the
    learner): in the runs measured so far its accuracy is within noise of the same run without it (docs/BENCHMARKS.md,
    "Prompt skipping"), which does not show that it never hurts."""
    skip_target_yield: float = 0.75
    """Informative yield (groups with reward variance / generated groups) that the adaptive p_explore steers to."""
    skip_explore_init: float = 0.5
    """Starting p_explore, the chance that a prompt after one zero-variance group is rolled out anyway."""
    skip_explore_min: float = 0.05
    """Lower bound of p_explore (how hard skipping may get)."""
    skip_explore_max: float = 1.0
    """Upper bound of p_explore (1 lets the controller switch skipping off entirely while the yield is high)."""
    skip_rate_step: float = 0.02
    """Controller gain: each generated group moves p_explore by skip_rate_step * (informative - target)."""

    std_normalize: bool = True
    """Divide group-centred rewards by the group std (GRPO); False gives Dr. GRPO."""
    drop_zero_variance_groups: bool = True
    """Do not train on groups whose rewards are all equal (counted in buffer/zero_variance_groups)."""
    adora: bool = False
    """ADORA group weighting: scale advantages of non-advantageous groups by adora_lambda."""
    adora_lambda: float = 0.1
    """ADORA weight for groups that are not temporarily advantageous."""
    truncation_length: int = 0
    """ADORA: responses at least this long count as truncated; 0 means actor.max_new_tokens."""

    modulation: bool = True
    """DynaMO token-level advantage modulation (beta_comp * beta_stab)."""
    modulation_scope: ModulationScope = "minibatch"
    """Tokens over which H_min/H_max and max Xi are taken: the optimizer mini-batch or the micro-batch (parity)."""
    comp_alpha: float = 0.2
    """Compensation strength alpha of beta_comp."""
    stab_lambda_min: float = 0.6
    """Lower bound of beta_stab."""
    stab_gamma: float = 50.0
    """Sigmoid steepness of beta_stab."""
    stab_tau: float = 0.99
    """Sigmoid centre of beta_stab (fraction of the scope's max entropy change)."""
    stab_expectation: StabExpectation = "exact"
    """E_pi[pi*Lambda]: `exact` from the full distribution, `parity` = reference approximation."""

    clip_eps_low: float = 0.2
    """PPO clip range below 1."""
    clip_eps_high: float = 0.28
    """PPO clip range above 1 (clip-higher)."""
    dual_clip_c: float = 10.0
    """Dual-clip bound for negative advantages (0 disables)."""
    is_mode: ISMode = "truncate"
    """Behaviour-policy correction: none, truncate (w = min(pi_prox/mu, is_cap)) or mask (drop outside [1/cap, cap])."""
    is_cap: float = 2.0
    """Truncation cap C_is of the importance weight pi_prox/mu."""
    loss_aggregation: LossAggregation = "token-mean"
    """token-mean over all valid tokens of the optimizer step, or seq-mean-token-mean."""
    kl_coef: float = 0.0
    """Coefficient of a k3 KL(pi_theta || mu) penalty; 0 disables."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient; 0 disables."""

    max_staleness: int = 2
    """Most policy versions a trained group may lag the learner; 0 = synchronous on-policy."""

    def __post_init__(self) -> None:
        _check(1 <= self.n_min, "algo.n_min", f"must be >= 1, got {self.n_min}")
        _check(self.n_min <= self.n_mean <= self.n_max, "algo.n_mean",
               f"need n_min <= n_mean <= n_max, got {self.n_min} <= {self.n_mean} <= {self.n_max}")
        _check(self.initial_budget >= 0, "algo.initial_budget", "must be >= 0")
        _check(self.min_history >= 2, "algo.min_history", "must be >= 2 (variance needs two samples)")
        _check(0.0 < self.mastery <= 1.0, "algo.mastery", f"must be in (0, 1], got {self.mastery}")
        _check(0.0 < self.priority_floor < 1.0, "algo.priority_floor", "must be in (0, 1)")
        _check(self.stats_half_life >= 0, "algo.stats_half_life", "must be >= 0")
        _check(0.0 < self.skip_target_yield <= 1.0, "algo.skip_target_yield",
               f"must be in (0, 1], got {self.skip_target_yield}")
        _check(0.0 < self.skip_explore_min <= self.skip_explore_max <= 1.0, "algo.skip_explore_min",
               f"need 0 < skip_explore_min <= skip_explore_max <= 1, got {self.skip_explore_min}, "
               f"{self.skip_explore_max}")
        _check(self.skip_explore_min <= self.skip_explore_init <= self.skip_explore_max, "algo.skip_explore_init",
               f"must lie in [skip_explore_min, skip_explore_max], got {self.skip_explore_init}")
        _check(0.0 < self.skip_rate_step <= 1.0, "algo.skip_rate_step", f"must be in (0, 1], got {self.skip_rate_step}")
        _check(0.0 <= self.adora_lambda <= 1.0, "algo.adora_lambda", "must be in [0, 1]")
        _check(self.truncation_length >= 0, "algo.truncation_length", "must be >= 0")
        _check(self.comp_alpha >= 0, "algo.comp_alpha", "must be >= 0")
        _check(0.0 < self.stab_lambda_min <= 1.0, "algo.stab_lambda_min", "must be in (0, 1]")
        _check(self.stab_gamma > 0, "algo.stab_gamma", "must be > 0")
        _check(0.0 < self.clip_eps_low < 1.0, "algo.clip_eps_low", f"must be in (0, 1), got {self.clip_eps_low}")
        _check(self.clip_eps_high > 0, "algo.clip_eps_high", f"must be > 0, got {self.clip_eps_high}")
        _check(self.dual_clip_c == 0 or self.dual_clip_c > 1, "algo.dual_clip_c", "must be 0 (off) or > 1")
        _check(self.is_cap >= 1.0, "algo.is_cap", f"must be >= 1, got {self.is_cap}")
        _check(self.kl_coef >= 0 and self.entropy_coef >= 0, "algo.kl_coef", "coefficients must be >= 0")
        _check(self.max_staleness >= 0, "algo.max_staleness", f"must be >= 0, got {self.max_staleness}")


@dataclass(frozen=True)
class TaskConfig:
    """Where prompts come from and how answers are checked."""

    source: Literal["reasoning_gym", "procedural", "jsonl", "hf"] = "reasoning_gym"
    """`reasoning_gym` (procedural, scored by the dataset's scorer), `procedural` (built-in generators of
    common/tasks.py, exact match), `jsonl` (local JSONL/Parquet, math-verify) or `hf` (a dataset read with
    `datasets.load_dataset`: a hub id or a local path, downloaded when online, else from the cache; math-verify)."""
    name: str = "basic_arithmetic"
    """reasoning-gym dataset name, a built-in procedural task (e.g. `larger_digit`) with source = procedural, or a
    dataset id / local path with source = hf (e.g. `BytedTsinghua-SIA/DAPO-Math-17k`)."""
    params_json: str = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'
    """reasoning-gym dataset parameters as a JSON object."""
    size: int = 256
    """Training prompts: how many reasoning_gym / procedural draw (skipping held-out questions); with source = jsonl
    or hf, the most training rows kept (a seeded sample, in file order; 0 keeps every row)."""
    eval_size: int = 64
    """Held-out evaluation prompts (generated tasks: another seed, no question twice, none trained on); with
    source = hf, the most evaluation prompts kept (a seeded sample of the evaluation split)."""
    seed: int = 0
    """Seed of the procedural dataset (training uses seed, evaluation seed + 1_000_003)."""
    path: str = ""
    """Local dataset file (.jsonl or .parquet) when source = jsonl."""
    split: str = "train"
    """source = hf: the dataset split trained on (at most `size` of its rows)."""
    eval_name: str = ""
    """source = hf: dataset id / local path evaluated on ('' : task.name)."""
    eval_split: str = ""
    """source = hf: split of the evaluation dataset ('' : task.split). With both eval_name and eval_split empty,
    evaluation holds out eval_fraction of the training rows instead."""
    field_map: str = ""
    """source = hf: a named column mapping of a common math set (`dapo-math`, `math`, `math-500`; see
    common/tasks.py); '' picks it from the dataset id (also the last two parts of a local path), else none."""
    question_field: str = ""
    """Column holding the question ('' : the field map's, else `prompt`). A dotted path reads a nested field; a
    list of chat messages gives its last user message."""
    answer_field: str = ""
    """Column holding the reference answer ('' : the field map's, else `answer`); dotted paths as above, e.g.
    `reward_model.ground_truth`."""
    answer_format: Literal["auto", "raw", "boxed"] = "auto"
    """How the answer column holds the answer: `raw` (the answer itself) or `boxed` (a worked solution whose last
    \\boxed{} holds it, as in MATH); `auto`: the field map's, else raw."""
    scorer: Literal["auto", "math"] = "auto"
    """`math`: the answer is the content of the response's last \\boxed{} (none: wrong), compared with the
    reference by math-verify (LaTeX and expressions); any source can use it, source = hf always does. `auto`:
    reasoning-gym's scorer, exact match for procedural tasks, math-verify for jsonl, each on the last box or else the
    last number that is no operand (`common.tasks.extract_answer`)."""
    reward_correct: float = 1.0
    """Reward of a correct response."""
    reward_wrong: float = 0.0
    """Reward of a wrong response, or one without an answer (the paper uses -1)."""
    eval_fraction: float = 0.1
    """Fraction of a local dataset (jsonl, or hf without eval_name / eval_split) held out for evaluation."""
    system_prompt: str = "Answer with the final number only."
    """System message put before each question ('' for none)."""
    use_chat_template: bool = True
    """Apply the tokenizer's chat template (False: raw `question` text)."""

    def __post_init__(self) -> None:
        dataset = self.source in ("jsonl", "hf")
        _check(self.size >= (0 if dataset else 1), "task.size",
               f"must be >= {0 if dataset else 1} with task.source = {self.source} (got {self.size})")
        _check(self.eval_size >= 0, "task.eval_size", "must be >= 0")
        _check(0.0 <= self.eval_fraction < 1.0, "task.eval_fraction", "must be in [0, 1)")
        try:
            params = json.loads(self.params_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"task.params_json: not valid JSON ({exc})") from None
        _check(isinstance(params, dict), "task.params_json", "must be a JSON object")
        _check(self.source != "jsonl" or bool(self.path), "task.path", "required when task.source = jsonl")
        _check(self.source != "hf" or bool(self.name.strip()), "task.name", "a dataset id or path is required "
               "when task.source = hf")
        _check(all(abs(r) <= 1e6 for r in (self.reward_correct, self.reward_wrong)), "task.reward_correct",
               f"rewards must be finite and within +-1e6, got {self.reward_correct} / {self.reward_wrong}")
        _check(self.reward_correct > self.reward_wrong, "task.reward_wrong",
               f"must be below task.reward_correct ({self.reward_correct}), got {self.reward_wrong}")

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)


@dataclass(frozen=True)
class BufferConfig:
    """The replay-buffer service."""

    address: str = "tcp://127.0.0.1:5555"
    """ZeroMQ endpoint the buffer binds (port 0 in tests picks a free one)."""
    wave_size: int = 8
    """Prompts per allocation wave (the N of docs/ALGORITHM.md §1)."""
    lease_timeout_s: float = 300.0
    """Seconds before an unsubmitted lease expires and its prompts return to the pool."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest accepted message; larger ones are rejected and counted."""
    max_queued_groups: int = 4096
    """Back-pressure: no new leases while this many groups wait for the learner."""
    snapshot_path: str = ""
    """Snapshot file; '' means <run_dir>/buffer_snapshot.msgpack (or none when run alone without a run dir)."""
    snapshot_interval_s: float = 30.0
    """Seconds between periodic snapshots."""
    seed: int = 0
    """Seed of the per-epoch prompt order."""
    curve_secret_key_file: str = ""
    """ZeroMQ CURVE server secret key file (enables authentication); '' binds without CURVE."""
    curve_public_keys_dir: str = ""
    """Directory of authorised client public keys (with curve_secret_key_file)."""
    curve_server_public_key_file: str = ""
    """For clients (actors, learner, supervisor) of a CURVE buffer: the server's public key file."""
    curve_client_secret_key_file: str = ""
    """For clients of a CURVE buffer: this client's secret key file (from `python -m buffer.keys`)."""
    max_restarts: int = 3
    """Times run_async.py restarts a dead buffer from its last snapshot before stopping the run."""
    insecure: bool = False
    """Allow binding a non-loopback address without CURVE (anyone who can reach the port can then lease, submit
    and read the run). run_async.py generates CURVE keys into the run directory for such addresses instead."""
    max_version_jump: int = 256
    """Largest forward step of the policy version one report may make (a learner reports every step; a learner
    ahead of a buffer restored from an older snapshot reports the difference at once); larger reports are refused."""
    max_clients: int = 4096
    """Clients remembered, each for its registration and for its replay entry (the last lease/fetch answer); the
    least recently seen is forgotten beyond it (counted as clients_evicted / replay_evictions)."""
    yield_window_groups: int = 256
    """Recent generated groups over which the informative yield (groups with reward variance) is measured."""
    low_yield_threshold: float = 0.1
    """Informative yield below which, over a full window, the buffer warns (stats low_yield_warning, and the log)."""

    def __post_init__(self) -> None:
        _check(self.max_restarts >= 0, "buffer.max_restarts", "must be >= 0")
        _check(self.address.startswith(("tcp://", "ipc://", "inproc://")), "buffer.address",
               f"must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {self.address!r}")
        _check(self.wave_size >= 1, "buffer.wave_size", "must be >= 1")
        _check(self.lease_timeout_s > 0, "buffer.lease_timeout_s", "must be > 0")
        _check(self.max_message_bytes >= 1024, "buffer.max_message_bytes", "must be >= 1024")
        _check(self.max_queued_groups >= 1, "buffer.max_queued_groups", "must be >= 1")
        _check(self.snapshot_interval_s > 0, "buffer.snapshot_interval_s", "must be > 0")
        _check(bool(self.curve_server_public_key_file) == bool(self.curve_client_secret_key_file),
               "buffer.curve_client_secret_key_file", "CURVE clients need both the server public key and a secret")
        _check(self.max_version_jump >= 1, "buffer.max_version_jump", "must be >= 1")
        _check(self.max_clients >= 1, "buffer.max_clients", "must be >= 1")
        _check(self.yield_window_groups >= 1, "buffer.yield_window_groups", "must be >= 1")
        _check(0.0 <= self.low_yield_threshold <= 1.0, "buffer.low_yield_threshold",
               f"must be in [0, 1], got {self.low_yield_threshold}")


@dataclass(frozen=True)
class ActorConfig:
    """Rollout generation."""

    engine: EngineKind = "hf"
    """`hf` (transformers, any machine) or `sglang` (GPU servers over HTTP)."""
    num_actors: int = 1
    """Actor processes started by run_async.py."""
    prompts_per_lease: int = 8
    """Prompts an actor asks for at a time."""
    max_batch_sequences: int = 64
    """Largest number of sequences the HF engine samples in one batch."""
    max_new_tokens: int = 16
    """Longest response in tokens."""
    temperature: float = 1.0
    """Sampling temperature (behaviour log-probs are at this temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Engine dtype."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu` or `cuda:N`."""
    threads: int = 0
    """torch CPU threads for the engine (0: this host's cores shared evenly by the actors and the learner)."""
    sglang_urls: tuple[str, ...] = ()
    """Existing SGLang servers to attach to; empty with engine=sglang launches one per actor."""
    sglang_tp_size: int = 1
    """Tensor-parallel size of each SGLang server (launched or attached; common/layout.py)."""
    gpus: tuple[int, ...] = ()
    """GPU ids of an actor host for the actors' engines: each actor takes the next slice of sglang_tp_size ids (HF:
    one id). Empty: SGLang engines take the GPUs after the learner's, HF engines share the learner's (see
    common/layout.py)."""
    actors_per_host: int = 0
    """Actors per actor host, all sharing that host's `actor.gpus`; 0: every actor runs on the learner's host."""
    sglang_pause_mode: PauseMode = "retract"
    """How SGLang pauses for a weight update."""
    abort_policy: AbortPolicy = "resubmit"
    """Aborted SGLang requests: resubmit or drop (never scored as wrong)."""
    max_restarts: int = 3
    """Times run_async.py restarts a dead actor."""

    def __post_init__(self) -> None:
        _check(self.num_actors >= 1, "actor.num_actors", "must be >= 1")
        _check(self.prompts_per_lease >= 1, "actor.prompts_per_lease", "must be >= 1")
        _check(self.max_batch_sequences >= 1, "actor.max_batch_sequences", "must be >= 1")
        _check(self.max_new_tokens >= 1, "actor.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "actor.temperature", f"must be > 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "actor.top_p", f"must be in (0, 1], got {self.top_p}")
        # SGLang returns the log-prob under the full tempered distribution, not the top-p one it sampled from.
        _check(self.engine != "sglang" or self.top_p == 1.0, "actor.top_p",
               f"must be 1 with engine sglang, got {self.top_p}: sglang's returned log-prob is of the full tempered "
               f"distribution, not the top-p one sampled from, so importance weights would be biased")
        _check(self.threads >= 0, "actor.threads", "must be >= 0")
        _check(self.sglang_tp_size >= 1, "actor.sglang_tp_size", "must be >= 1")
        _check_gpu_ids(self.gpus, "actor.gpus")
        _check(self.actors_per_host >= 0, "actor.actors_per_host", "must be >= 0")
        _check(self.max_restarts >= 0, "actor.max_restarts", "must be >= 0")


@dataclass(frozen=True)
class LearnerConfig:
    """Optimisation and weight broadcast."""

    groups_per_step: int = 8
    """Groups consumed by one optimizer step (one policy version)."""
    mini_batches: int = 1
    """Optimizer steps per batch (PPO-style); >1 makes pi_prox differ from pi_theta."""
    micro_batch_tokens: int = 4096
    """Token budget (padded sequence length x rows) of one forward/backward micro-batch."""
    loss_chunk_tokens: int = 1024
    """Response positions per chunk of the loss head (learner/loss_head.py): the LM head projection, log-probs,
    entropy and E_pi[pi * Lambda] are computed this many tokens at a time and recomputed in backward, so the
    head's extra memory is two [chunk, vocabulary] float32 buffers instead of several [micro-batch response tokens,
    vocabulary] logits-sized tensors (and never grows with the micro-batch). 0: project the whole micro-batch at
    once (the [B, R, V] logits are materialised, as a forward hook on the LM head sees them)."""
    shared_prompt_forward: bool = True
    """Run each prompt of a micro-batch once and its samples' responses as continuations of its KV cache
    (learner/batch.py): a group of n samples costs one prompt forward and backward instead of n. Off: every sample's
    prompt + response as a separate sequence. No effect with activation_checkpointing (a layer recomputed in
    backward would extend the cache a second time), which runs every sequence separately."""
    total_steps: int = 40
    """Learner steps in the run."""
    lr: float = 2e-5
    """AdamW learning rate (after warm-up; see lr_final_ratio)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_final_ratio: float = 1.0
    """Learning rate of the last step as a fraction of `lr`: after warm-up the rate follows a half cosine from `lr`
    down to `lr_final_ratio` x `lr` at step `total_steps` (1.0: constant after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype. Weights and optimizer state stay float32 either way; `bfloat16` runs the forward and backward
    under autocast (bf16 weights would round away most small AdamW updates)."""
    device: str = "auto"
    """`auto`, `cpu` or `cuda:N`."""
    gpus: tuple[int, ...] = ()
    """GPU ids of the learner host, one per data-parallel rank (local rank r uses gpus[r]); empty: GPU r."""
    sharding: Literal["fsdp", "replicate"] = "fsdp"
    """With more than one learner rank (WORLD_SIZE > 1): `fsdp` shards the float32 weights, gradients and AdamW
    state over the ranks (FSDP2; the layers are gathered one at a time in `dtype` for forward and backward),
    `replicate` keeps a whole copy on every rank and all-reduces the gradients. One rank: no effect."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (less memory, one more
    forward of the body per micro-batch)."""
    cpu_offload: bool = False
    """FSDP only, GPU only: keep the sharded weights, gradients and AdamW state in host memory (FSDP2's
    CPUOffloadPolicy; the optimizer step runs on the CPU)."""
    dist_timeout_s: float = 1800.0
    """Timeout of the data-parallel learner's collectives. The other ranks wait in one while rank 0 fetches a batch
    (up to fetch_timeout_s), so it must exceed fetch_timeout_s."""
    threads: int = 0
    """torch CPU threads for the learner (0: this host's cores shared evenly by the actors and the learner)."""
    checkpoint_every: int = 10
    """Steps between checkpoints (0: only at the end and on SIGTERM)."""
    sync_address: str = "127.0.0.1:29555"
    """host:port of the weight-sync TCP rendezvous (learner is rank 0)."""
    sync_control_address: str = "tcp://127.0.0.1:29556"
    """ZeroMQ PUB endpoint on which the learner announces each weight version."""
    sync_group_name: str = "dynamo_weights"
    """Name of the weight-sync process group."""
    sync_bucket_mb: int = 256
    """Bucket size of the weight broadcast in MB."""
    sync_timeout_s: float = 120.0
    """A receiver that does not finish a broadcast within this time is dropped from the group."""
    fetch_timeout_s: float = 600.0
    """Longest wait for a batch before the learner reports the buffer as stuck (also the longest it waits for a
    buffer that stopped answering to come back)."""
    buffer_timeout_s: float = 10.0
    """Seconds the learner waits for one buffer reply (beyond a long poll's hold) before resending it; after
    three silent attempts the buffer counts as lost: the learner checkpoints and waits for it to come back."""

    def __post_init__(self) -> None:
        _check(0 < self.buffer_timeout_s <= 3600, "learner.buffer_timeout_s",
               f"must be in (0, 3600], got {self.buffer_timeout_s}")
        _check(self.groups_per_step >= 1, "learner.groups_per_step", "must be >= 1")
        _check(self.mini_batches >= 1, "learner.mini_batches", "must be >= 1")
        _check(self.groups_per_step % self.mini_batches == 0, "learner.mini_batches",
               f"must divide groups_per_step ({self.groups_per_step}), got {self.mini_batches}")
        _check(self.micro_batch_tokens >= 1, "learner.micro_batch_tokens", "must be >= 1")
        _check(0 <= self.loss_chunk_tokens <= 2**20, "learner.loss_chunk_tokens",
               f"must be in [0, 2**20] (0: unchunked), got {self.loss_chunk_tokens}")
        _check(self.total_steps >= 1, "learner.total_steps", "must be >= 1")
        _check(self.lr > 0, "learner.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
        _check(0 <= self.lr_final_ratio <= 1, "learner.lr_final_ratio",
               f"must be in [0, 1], got {self.lr_final_ratio}")
        _check(self.weight_decay >= 0, "learner.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "learner.grad_clip", "must be >= 0")
        _check(self.checkpoint_every >= 0, "learner.checkpoint_every", "must be >= 0")
        _check(":" in self.sync_address, "learner.sync_address", "must be host:port")
        _check(self.sync_bucket_mb >= 1, "learner.sync_bucket_mb", "must be >= 1")
        _check(self.sync_timeout_s > 0, "learner.sync_timeout_s", "must be > 0")
        _check_gpu_ids(self.gpus, "learner.gpus")
        _check(self.sharding in ("fsdp", "replicate"), "learner.sharding",
               f"must be 'fsdp' or 'replicate', got {self.sharding!r}")
        _check(not self.cpu_offload or self.sharding == "fsdp", "learner.cpu_offload",
               "needs learner.sharding 'fsdp'")
        _check(not self.cpu_offload or self.device != "cpu", "learner.cpu_offload",
               "needs the learner on a GPU (learner.device is 'cpu')")
        _check(self.dist_timeout_s > self.fetch_timeout_s, "learner.dist_timeout_s",
               f"must exceed learner.fetch_timeout_s ({self.fetch_timeout_s}), got {self.dist_timeout_s}")


@dataclass(frozen=True)
class RunConfig:
    """The run as a whole."""

    name: str = ""
    """Run name; '' picks <preset>-<timestamp>. The run directory is <runs_dir>/<name>."""
    runs_dir: str = "runs"
    """Parent directory of run directories."""
    model: str = "smollm2"
    """`smollm2` (embedded SmolLM2-135M-Instruct), `tiny` (random tiny model), a local HF model path, or a hub id
    (downloaded once per host into the Hugging Face cache when online; HF_HUB_OFFLINE=1 reads only the cache)."""
    seed: int = 0
    """Global seed."""
    wandb_mode: WandbMode = "offline"
    """wandb mode; metrics.jsonl is always written."""
    wandb_project: str = "dynamo-rl"
    """wandb project name."""
    eval_every: int = 10
    """Versions between held-out evaluations, which the buffer hands to the actors (0: only at start and end)."""
    eval_samples: int = 4
    """Samples per eval prompt for pass@k (pass@1 uses greedy decoding); with eval_suite, the suite's k (avg@k,
    pass@k)."""
    eval_suite: str = ""
    """'' evaluates the task's held-out split; a suite name of common/suites.py (`math6`) or a suite JSON file
    evaluates its benchmarks instead, each item graded by the math scorer, with per-benchmark avg@k / pass@k."""
    eval_suite_size: int = 0
    """With eval_suite: prompts per benchmark, the first N of each (as learner.evaluate_suite --limit); 0 = all."""
    eval_share: float = 0.5
    """While a held-out evaluation is pending, the most it takes of the sequences the buffer grants (in (0, 1]):
    an evaluation lease goes out while evaluation sequences <= eval_share x all sequences granted since the
    evaluation was posted, or whenever there is no training work to grant."""
    eval_timeout_s: float = 600.0
    """After the learner finishes, how long run_async.py waits for pending held-out evaluations before it stops."""
    resume: str = ""
    """Run directory to resume (continues its checkpoint and buffer snapshot)."""
    secret: str = ""
    """Per-run shared secret of the roles (learner registration at the buffer, weight-sync store keys and
    announcements). `run_async.py` generates one into config.json (mode 0600) when empty; roles started by hand
    read it from that file. Anyone who can read config.json can act as a role of this run."""

    def __post_init__(self) -> None:
        _check(self.eval_every >= 0, "run.eval_every", "must be >= 0")
        _check(self.eval_samples >= 2, "run.eval_samples",
               "must be >= 2 (pass@1 is the greedy score; 1 sample would write its pass@1 under the same key)")
        _check_suite(self.eval_suite)
        _check(self.eval_suite_size >= 0, "run.eval_suite_size", f"must be >= 0, got {self.eval_suite_size}")
        _check(0.0 < self.eval_share <= 1.0, "run.eval_share", "must be in (0, 1]")
        _check(self.eval_timeout_s >= 0.0, "run.eval_timeout_s", "must be >= 0")
        _check("/" not in self.name, "run.name", "must not contain '/'")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; every role reads the same resolved file."""

    run: RunConfig = field(default_factory=RunConfig)
    algo: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    def __post_init__(self) -> None:
        _check(self.algo.n_max * self.buffer.wave_size >= 1, "buffer.wave_size", "empty waves")

    def torch_threads(self, role: str) -> int:
        """Threads for `role` ("actor" | "learner"): the configured number, or the cores split between the
        roles of this host. Oversubscribing (each process taking every core) made CPU steps 10x slower here."""
        configured = self.actor.threads if role == "actor" else self.learner.threads
        if configured:
            return configured
        return max(1, (os.cpu_count() or 1) // (self.actor.num_actors + 1))

    @property
    def truncation_length(self) -> int:
        """ADORA truncation threshold in tokens (defaults to the generation limit)."""
        return self.algo.truncation_length or self.actor.max_new_tokens


def _tiny() -> Config:
    """Random tiny model on a task it can learn quickly; used by the end-to-end tests (~40 s on 2 cores).

    The task is `larger_digit` ("Which is larger, 3 or 8?"), not arithmetic: on arithmetic the random
    character-level model gets no reward signal. The answer is one token (max_new_tokens 1), so every sample is a
    scored guess: the sampled held-out reward goes from ~2% to ~15-20% in 30 steps, first from the skewed answer
    distribution (9 is the answer to 19% of pairs), and the rollout reward from ~2% to ~28%. No system prompt keeps
    its prompts ~25 characters long.
    """
    return Config(
        run=RunConfig(model="tiny", eval_every=5, eval_samples=8),
        algo=AlgorithmConfig(n_mean=8, n_min=4, n_max=12, initial_budget=4, max_staleness=2),
        task=TaskConfig(source="procedural", name="larger_digit", params_json="{}", system_prompt="", size=32,
                        eval_size=32),
        buffer=BufferConfig(wave_size=4, lease_timeout_s=30.0, snapshot_interval_s=5.0),
        actor=ActorConfig(prompts_per_lease=4, max_new_tokens=1, dtype="float32"),
        learner=LearnerConfig(groups_per_step=4, total_steps=30, lr=3e-3, checkpoint_every=10),
    )


def _cpu_demo() -> Config:
    """The embedded default: SmolLM2-135M-Instruct on 2-term 1-digit arithmetic, ~7.5-11 min on 2 CPU cores.

    Tuned on the 2-core machines of docs/BENCHMARKS.md ("The default run on 2026-12-03" and "... on 2026-12-04"):
    both roles compute in bfloat16 (autocast over float32 weights in the learner), ~1.5x faster than float32 on CPUs
    with bf16 instructions (run_async.py warns on a CPU without them). Six prompts of ~6 responses (n in [4, 8]) per
    step instead of four of ~8 train on more prompts at the same learner cost; zero-variance groups are never
    trained on, so every group of a batch carries signal. lr 3e-5 (5e-5 diverged), decaying by a half cosine to 3e-6
    at the last step: a constant rate gained little between steps 25 and 50. Late in the run most prompts are solved
    by every sample and the one actor falls behind the learner: prompt skipping keeps it ahead. Two sampled answers
    per held-out prompt (pass@2) keep the three evaluations short; the greedy pass@1 is what the run reports
    (`python -m learner.evaluate_heldout` scores a checkpoint on 512 held-out prompts). Nine groups per step, 2,048
    training prompts, sampling at temperature 0.7 or 60 steps gained nothing beyond run-to-run noise. What bounds the
    end point is the steps two cores fit: 70 steps on 1,024 prompts with no mid-run evaluation end ~0.04 higher in
    ~10-13 min; 150 steps (44 min) reach ~0.59 (BENCHMARKS "... on 2026-12-05 (later)")."""
    return Config(
        run=RunConfig(eval_every=25, eval_samples=2),
        algo=AlgorithmConfig(n_mean=6, n_min=4, n_max=8, prompt_skipping=True),
        actor=ActorConfig(dtype="bfloat16"),
        learner=LearnerConfig(groups_per_step=6, total_steps=50, lr=3e-5, lr_final_ratio=0.1, dtype="bfloat16"),
    )


def _gpu_cluster() -> Config:
    """A starting point for a GPU node: SGLang engines, bigger batches, the paper's allocation bounds."""
    return Config(
        run=RunConfig(model="Qwen/Qwen2.5-Math-1.5B", eval_every=20),
        algo=AlgorithmConfig(n_mean=16, n_min=8, n_max=24, initial_budget=4, max_staleness=4),
        task=TaskConfig(size=8192, eval_size=512, system_prompt="Put the final answer in \\boxed{}."),
        buffer=BufferConfig(wave_size=64, address="tcp://0.0.0.0:5555"),
        actor=ActorConfig(engine="sglang", num_actors=2, prompts_per_lease=64, max_new_tokens=4096,
                          dtype="bfloat16"),
        learner=LearnerConfig(groups_per_step=512, mini_batches=16, micro_batch_tokens=32768, total_steps=500,
                              lr=1e-6, warmup_steps=10, weight_decay=0.1, dtype="bfloat16"),
    )


PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def _paper(model: str, micro_batch_tokens: int) -> Config:
    """The paper's training recipe on one 8-GPU node (see `_paper_1_5b` for what each setting is and why)."""
    return Config(
        run=RunConfig(model=model, eval_every=20, eval_samples=32, eval_suite="math6", eval_suite_size=64),
        algo=AlgorithmConfig(allocation_mode="reference", n_mean=16, n_min=8, n_max=24, initial_budget=8,
                             modulation=True, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=10.0,
                             kl_coef=0.0, entropy_coef=0.0, loss_aggregation="token-mean", max_staleness=0),
        task=TaskConfig(source="hf", name="BytedTsinghua-SIA/DAPO-Math-17k", split="train", size=0,
                        eval_name="HuggingFaceH4/MATH-500", eval_split="test", eval_size=128, scorer="math",
                        reward_correct=1.0, reward_wrong=-1.0, system_prompt=PAPER_SYSTEM_PROMPT),
        buffer=BufferConfig(wave_size=512),
        actor=ActorConfig(engine="sglang", num_actors=4, gpus=(4, 5, 6, 7), prompts_per_lease=64,
                          max_new_tokens=3072, temperature=1.0, top_p=1.0, dtype="bfloat16"),
        learner=LearnerConfig(groups_per_step=512, mini_batches=16, micro_batch_tokens=micro_batch_tokens,
                              loss_chunk_tokens=1024, total_steps=300, lr=1e-6, warmup_steps=10,
                              weight_decay=0.1, grad_clip=1.0, dtype="bfloat16", gpus=(0, 1, 2, 3)),
    )


def _paper_1_5b() -> Config:
    """The paper's Qwen2.5-Math-1.5B run, with the released training script's settings.

    From the released script: 512 prompts per step, 16 optimizer mini-batches per step, AdamW lr 1e-6 with 10
    warm-up steps, weight decay 0.1, grad-clip 1.0; sampling at temperature 1.0, top-p 1.0; PPO clip 0.2 / 0.28,
    dual-clip 10, no KL, token-mean loss; DynaMO allocation with n_mean 16 in [8, 24] and advantage modulation;
    rewards +1 / -1 on the last \\boxed{} answer checked by math-verify.

    Our choices (the script leaves them open or they depend on this system):
    - Training set DAPO-Math-17k (`BytedTsinghua-SIA/DAPO-Math-17k`, train split), its problems stripped of the
      DAPO "Answer:" instructions so that the system prompt's \\boxed{} instruction is the only format asked for.
    - System prompt: Qwen2.5-Math's own "Please reason step by step, and put your final answer within \\boxed{}."
    - max_new_tokens 3072: Qwen2.5-Math models have a 4096-token context (max_position_embeddings), so 3072 leaves
      1024 tokens for the prompt (DAPO problems are far shorter).
    - max_staleness 0 (synchronous, like the released script's trainer); raise it for asynchronous training.
    - total_steps 300 (about 9 passes over DAPO-Math-17k); initial_budget 8 (= n_min).
    - In-training evaluation: the math6 suite on the actors every 20 steps, 32 samples per problem at the actors'
      temperature (avg@32 and pass@32 per benchmark and averaged, the paper's table) plus one greedy answer, on
      the first 64 problems of each benchmark (all of AIME24/25 and AMC23, 292 problems, ~9.6k sequences per
      evaluation, about one training step's generation); the full table is `learner.evaluate_suite` on a checkpoint.
    - Importance correction: truncate at 2 (this system's default; the script does not correct for staleness).
    - Layout of one 8-GPU node: learner on GPUs 0-3 (data-parallel under torchrun; one process on GPU 0 when
      started by run_async.py), four SGLang engines (tp 1) on GPUs 4-7; bf16 autocast over float32 weights, loss
      head chunked by 1024 positions (151k-token vocabulary).
    """
    return _paper("Qwen/Qwen2.5-Math-1.5B", micro_batch_tokens=32768)


def _paper_7b() -> Config:
    """The paper's Qwen2.5-Math-7B run: `paper-1.5b` with the 7B model and half the micro-batch tokens.

    The learner keeps float32 weights, gradients and AdamW state on every data-parallel rank (~16 bytes per
    parameter, ~120 GB for 7.6 B parameters): it needs GPUs with more memory than that (e.g. 141 GB); on 80 GB GPUs
    this preset does not fit."""
    return _paper("Qwen/Qwen2.5-Math-7B", micro_batch_tokens=16384)


PRESETS = {"tiny": _tiny, "cpu-demo": _cpu_demo, "gpu-cluster": _gpu_cluster, "paper-1.5b": _paper_1_5b,
           "paper-7b": _paper_7b}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _reject_unknown_keys(data: Any, cls: type, prefix: str) -> None:
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"config: unknown field {prefix}{key!r}")
        sub = fields[key].type
        sub_cls = globals().get(sub) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub_cls):
            _reject_unknown_keys(value, sub_cls, f"{prefix}{key}.")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a validated Config from a (possibly partial) nested dict; unknown keys are errors."""
    import msgspec

    data = _renamed_fields(data)
    _reject_unknown_keys(data, Config, "")
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config: {exc}") from None


RENAMED_FIELDS = {("task", "prompt_field"): "question_field"}
"""Fields renamed since runs were first written: a saved config.json with the old name still loads (--resume)."""


def _renamed_fields(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for (section, old), new in RENAMED_FIELDS.items():
        if isinstance(out.get(section), dict) and old in out[section]:
            part = dict(out[section])
            value = part.pop(old)
            part.setdefault(new, value)
            out[section] = part
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    tmp.replace(path)


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    return config_from_dict(data)


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove `--name value` or `--name=value` from argv and return the value."""
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def base_config(argv: list[str]) -> Config:
    """The starting point named by --preset or --config-file (removed from argv); cpu-demo otherwise."""
    preset = _pop_option(argv, "--preset")
    config_file = _pop_option(argv, "--config-file")
    if preset is not None and config_file is not None:
        raise ConfigError("give --preset or --config-file, not both")
    if config_file is not None:
        return load_config(config_file)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset or "cpu-demo"]()


def parse_cli(argv: Sequence[str] | None = None, description: str | None = None) -> Config:
    """Parse `[--preset NAME | --config-file PATH] [--section.field VALUE ...]` into a validated Config."""
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        default = base_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    extra = (
        "Start from --preset {" + ",".join(PRESETS) + "} (default cpu-demo) or --config-file PATH, "
        "then override any field below."
    )
    try:
        return tyro.cli(Config, args=args, default=default,
                        description=(description + "\n\n" if description else "") + extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return cfg with fields of named sections replaced, e.g. with_overrides(cfg, algo={"max_staleness": 0})."""
    updates = {name: replace(getattr(cfg, name), **values) for name, values in sections.items()}
    return replace(cfg, **updates)
