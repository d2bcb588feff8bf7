"""One learner step (one policy version) as plain functions over a `LearnerState`.

Order of operations in `train_step(state, batch, cfg)`:
1. `prepare_step`: decode the batch; GRPO advantages per group (x ADORA weights when `algo.adora`); drop
   zero-variance groups (`algo.drop_zero_variance_groups`); cut the groups into `learner.mini_batches`
   mini-batches and pack each into micro-batches of <= `learner.micro_batch_tokens` padded tokens; fix each
   mini-batch's loss denominators (valid tokens, sequences) once.
2. pi_prox: with several mini-batches, a no-grad pass at the step's starting weights records pi_prox for every
   mini-batch after the first (for the first, pi_prox is the detached current log-prob: same weights).
3. Per mini-batch (`accumulate_gradients`, `apply_gradients`): with modulation over the `minibatch` scope and
   more than one micro-batch, a no-grad pre-pass collects H_max, H_min and max Xi over the whole mini-batch; then
   per micro-batch: forward (logits / actor.temperature, because behaviour log-probs are at the sampling
   temperature) -> log-prob, entropy and E_pi[pi Lambda] chunk-wise -> modulated advantages -> decoupled-PPO
   loss with truncated IS over the fixed denominator -> backward; then clip the gradient norm and take an AdamW
   step.
4. Scheduler step (linear warm-up over learner steps, then constant), `state.version += 1`.

Dropout stays off (the model is in eval mode) so that pi_theta equals pi_prox at the start of a step.

Precision: weights, gradients and AdamW state are float32; `learner.dtype` bfloat16 runs the forward passes
under autocast (`compute_precision`), or, for the sharded learner, with the layers gathered in bfloat16 (FSDP's
MixedPrecisionPolicy; gradients are reduced in float32).

Several ranks (torchrun): every rank gets the same batch (rank 0 fetches and broadcasts it, see learner/train.py),
takes every world_size-th micro-batch of each mini-batch and divides by the global denominators, so the step's
gradient is the SUM over ranks; scope statistics are reduced with max/min. Metrics are rank 0's shard. Two
layouts (`learner.sharding`, learner/sharding.py):
- `fsdp` (FSDP2): each rank holds 1/world of every float32 weight, gradient and AdamW moment, and each forward
  all-gathers the layers, so every rank must run the same number of forwards and backwards. The even-micro-batch
  rule: a rank with fewer micro-batches than the busiest one pads its list with neutral ones (a copy of the
  mini-batch's first micro-batch, its statistics ignored and its loss multiplied by 0) in the scope-statistics
  pre-pass, the pi_prox pass and the loss pass. Gradients accumulate on each rank and are reduce-scattered (as a
  sum) once per optimizer step, with the last micro-batch's backward; the norm clip is over the global norm.
- `replicate`: whole copies, the gradients summed with one all-reduce per optimizer step; a rank with no
  micro-batch in a mini-batch skips the passes and contributes zero gradients.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.config import Config, LearnerConfig
from common.schemas import Batch
from learner.advantages import adora_weights, group_advantages, zero_variance_mask
from learner.batch import MicroBatch, Rollouts, pack_micro_batches, rollouts_from_batch, split_groups
from learner.loss import LOG_RATIO_CLAMP, policy_loss
from learner.loss_head import head_token_outputs
from learner.modulation import ScopeStats, config_scope_stats, merge_scope_stats, modulate_advantages, \
    token_logprob_entropy


class ResponseLogits(nn.Module):
    """Wraps a HF causal LM: logits only at the positions that predict response tokens ([B, R, V]).

    `loss_chunk_tokens` > 0 makes `token_outputs` feed the response hidden states to the chunked loss head
    (learner/loss_head.py) instead of materialising these logits.
    """

    def __init__(self, model: nn.Module, loss_chunk_tokens: int = 0):
        super().__init__()
        self.model = model
        self.loss_chunk_tokens = loss_chunk_tokens

    def response_hidden(self, input_ids: Tensor, attention_mask: Tensor, logit_index: Tensor) -> Tensor:
        """The LM head's input [B, R, H]: HF base models (LlamaModel, Qwen2Model) apply the final norm."""
        # No KV cache: training never decodes, and a layer recomputed in backward (activation checkpointing) would
        # append its keys to the cache a second time.
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        return hidden.gather(1, logit_index[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, R, H]

    def shared_prompt_hidden(self, prompt_ids: Tensor, prompt_mask: Tensor, responses: Tensor,
                             response_mask: Tensor, owner: Tensor) -> Tensor:
        """The LM head's input [B, R, H] with each prompt run once: the prompts [U, P] (right-padded) fill a KV
        cache, whose rows are copied to their responses (`owner` [B]); the responses then run as a continuation
        (positions prompt length + j, attending to their prompt and their own earlier tokens). Response token 0
        is predicted from the prompt's last position, token j > 0 from response token j - 1. Gradients reach
        the prompt's keys and values through the cache (the copy and the concatenation are differentiable)."""
        from transformers import DynamicCache

        from common.models import kv_cache_kwargs

        base = self.model.base_model
        cache = DynamicCache()
        with_cache = kv_cache_kwargs(base, cache)
        positions = torch.arange(prompt_ids.shape[1], device=prompt_ids.device).expand_as(prompt_ids)
        first = base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                     **with_cache).last_hidden_state                                                 # [U, P, H]
        prompt_len = prompt_mask.sum(1)                                                         # [U]
        last = first[torch.arange(first.shape[0], device=first.device), prompt_len - 1][owner]  # [B, H]
        if responses.shape[1] == 1:
            return last[:, None]
        cache.batch_select_indices(owner)
        inputs = responses[:, :-1]                                                              # [B, R-1]
        steps = torch.arange(inputs.shape[1], device=inputs.device)
        rest = base(input_ids=inputs, attention_mask=torch.cat([prompt_mask[owner], response_mask[:, :-1].long()], 1),
                    position_ids=prompt_len[owner, None] + steps, use_cache=True,
                    **with_cache).last_hidden_state                                                  # [B, R-1, H]
        return torch.cat([last[:, None], rest], 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, logit_index: Tensor | None,
                hidden_only: bool = False, responses: Tensor | None = None, response_mask: Tensor | None = None,
                owner: Tensor | None = None) -> Tensor:
        """Logits [B, R, V], or with `hidden_only` the LM head's input [B, R, H]. With `owner` (shared prompts),
        `input_ids`/`attention_mask` are the distinct prompts [U, P] and `responses`/`response_mask` the response
        grid [B, R] (`shared_prompt_hidden`). The chunked loss head calls this too (not the hidden-state methods):
        under FSDP the root's parameters (embeddings, final norm, LM head) are gathered when this module's
        forward runs, and stay gathered until its backward."""
        if owner is None:
            hidden = self.response_hidden(input_ids, attention_mask, logit_index)
        else:
            hidden = self.shared_prompt_hidden(input_ids, attention_mask, responses, response_mask, owner)
        return hidden if hidden_only else self.model.get_output_embeddings()(hidden)


@dataclass
class LearnerState:
    model: nn.Module
    policy: ResponseLogits
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    version: int = 0
    """Learner steps completed = the policy version of the current weights."""
    sharded: bool = False
    """FSDP2: `policy` is the root of the sharded model (learner/sharding.py); parameters are DTensor shards."""
    device: torch.device = torch.device("cpu")
    """Where the forward and backward passes run (sharded weights may live in host memory: learner.cpu_offload)."""


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """The learning rate of optimizer step `step` (0-based: the step that makes version step + 1) over `cfg.lr`.

    Linear warm-up: (step + 1) / warmup_steps for the first warmup_steps steps. Then a half cosine from 1 at the
    first step after warm-up to lr_final_ratio at the last step (total_steps - 1), held there if a run goes on:
    r + (1 - r) (1 + cos(pi p)) / 2 with p = (step - warmup_steps) / (total_steps - 1 - warmup_steps); a run with
    at most one step after warm-up trains at lr."""
    warmup, ratio = cfg.warmup_steps, cfg.lr_final_ratio
    if step < warmup:
        return (step + 1) / warmup
    span = cfg.total_steps - 1 - warmup
    progress = min(1.0, (step - warmup) / span) if span > 0 else 0.0
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_state(model: nn.Module, cfg: LearnerConfig, sharded: bool = False) -> LearnerState:
    """AdamW with the learning-rate schedule of `lr_factor`.

    `sharded`: fully_shard the model over every rank of the default process group first (learner/sharding.py), so
    that AdamW holds this rank's shards; `cfg.activation_checkpointing` applies either way."""
    from learner.sharding import prepare_policy

    model.eval()  # no dropout: see the module docstring
    device = next(model.parameters()).device
    policy = ResponseLogits(model, cfg.loss_chunk_tokens)
    prepare_policy(policy, cfg, device, sharded)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return LearnerState(model=model, policy=policy, optimizer=optimizer, scheduler=scheduler, sharded=sharded,
                        device=device)


def token_outputs(policy: ResponseLogits, mb: MicroBatch, temperature: float,
                  entropy_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(log pi(target) with grad, entropy, E_pi[pi Lambda]), each [B, R], at the sampling temperature."""
    if mb.owner is None:
        inputs: tuple = (mb.input_ids, mb.attention_mask, mb.logit_index)
        shared: dict[str, Tensor] = {}
    else:
        inputs, shared = (mb.prompt_ids, mb.prompt_mask, None), dict(responses=mb.targets, response_mask=mb.mask,
                                                                    owner=mb.owner)
    if policy.loss_chunk_tokens > 0:
        hidden = policy(*inputs, hidden_only=True, **shared)  # [B, R, H]
        return head_token_outputs(hidden, policy.model.get_output_embeddings(), mb.targets, temperature=temperature,
                                  chunk_tokens=policy.loss_chunk_tokens, entropy_grad=entropy_grad)
    logits = policy(*inputs, **shared) / temperature  # [B, R, V]
    return token_logprob_entropy(logits, mb.targets, entropy_grad=entropy_grad)


# ---------------------------------------------------------------------------------------------- preparation


def shared_prompts(cfg: LearnerConfig) -> bool:
    """Whether micro-batches hold each prompt once (learner.shared_prompt_forward, unless activation
    checkpointing recomputes the layers: their KV cache would be extended twice)."""
    return cfg.shared_prompt_forward and not cfg.activation_checkpointing


@dataclass
class PreparedStep:
    mini_batches: list[list[MicroBatch]]
    denominators: list[tuple[float, float]]
    """(valid response tokens, sequences) of each mini-batch: the loss denominators of its optimizer step."""
    metrics: dict[str, Any]


def batch_metrics(rollouts: Rollouts, batch: Batch) -> dict[str, Any]:
    staleness = torch.tensor(rollouts.staleness, dtype=torch.float32)
    return {
        "reward/correct_fraction": rollouts.correct.float().mean(),
        "rollout/response_length/mean": rollouts.lengths.float().mean(),
        "rollout/truncated_fraction": rollouts.truncated.float().mean(),
        "buffer/staleness/mean": staleness.mean(),
        "buffer/staleness/max": staleness.max(),
        "buffer/dropped_stale": batch.dropped_stale,
    }


def sequence_advantages(rollouts: Rollouts, cfg: Config) -> tuple[Tensor, dict[str, Any]]:
    """Per-response advantages [S]: GRPO (or Dr. GRPO), times the ADORA group weight when enabled."""
    adv, metrics = group_advantages(rollouts.rewards, rollouts.group_sizes, std_normalize=cfg.algo.std_normalize)
    if cfg.algo.adora:
        weights, adora_metrics = adora_weights(rollouts.correct, rollouts.lengths, rollouts.group_sizes,
                                               truncation_length=cfg.truncation_length, lam=cfg.algo.adora_lambda)
        adv = adv * weights
        metrics.update(adora_metrics)
    return adv, metrics


def prepare_step(batch: Batch, cfg: Config) -> PreparedStep:
    rollouts = rollouts_from_batch(batch)
    metrics = batch_metrics(rollouts, batch)
    adv, adv_metrics = sequence_advantages(rollouts, cfg)
    metrics.update(adv_metrics)
    keep = list(range(len(rollouts.group_sizes)))
    if cfg.algo.drop_zero_variance_groups:
        zero = zero_variance_mask(rollouts.rewards, rollouts.group_sizes)
        keep = [g for g in keep if not bool(zero[g])]
    metrics["reward/zero_variance_groups_dropped"] = len(rollouts.group_sizes) - len(keep)
    slices = rollouts.sample_slices()
    mini_batches, denominators = [], []
    for groups in split_groups(len(keep), cfg.learner.mini_batches):
        chosen = [keep[g] for g in groups]
        sub = rollouts.select_groups(chosen)
        sub_adv = torch.cat([adv[slices[g]] for g in chosen])
        micro = pack_micro_batches(sub, sub_adv, cfg.learner.micro_batch_tokens, shared_prompts(cfg.learner))
        tokens = float(sub.lengths.sum())
        if tokens == 0:
            continue
        mini_batches.append(micro)
        denominators.append((tokens, float(sub.num_samples)))
    metrics["loss/trained_sequences"] = sum(int(d[1]) for d in denominators)
    return PreparedStep(mini_batches, denominators, metrics)


# ---------------------------------------------------------------------------------------------- passes


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(micro_batches: list[MicroBatch], even: bool = False) -> tuple[list[MicroBatch], list[MicroBatch]]:
    """(this rank's micro-batches, neutral padding). `even` (FSDP): the padding, copies of the first micro-batch,
    makes every rank's count ceil(n / world), so that every rank runs the same forwards and backwards."""
    rank, world = _world()
    mine = micro_batches[rank::world]
    if not even or not micro_batches:
        return mine, []
    return mine, [micro_batches[0]] * (math.ceil(len(micro_batches) / world) - len(mine))


@torch.no_grad()
def record_prox_logp(policy: nn.Module, micro_batches: list[MicroBatch], temperature: float,
                     neutral: list[MicroBatch] = ()) -> None:
    """Store pi_prox (the current weights) on each micro-batch, for mini-batches trained after weights moved;
    the `neutral` forwards only keep the ranks' passes even."""
    for mb in micro_batches:
        mb.prox_logp = token_outputs(policy, mb, temperature)[0].detach()
    for mb in neutral:
        token_outputs(policy, mb, temperature)


def _ratio(logp: Tensor, prox_logp: Tensor) -> Tensor:
    return torch.exp((logp.detach() - prox_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


@torch.no_grad()
def minibatch_scope_stats(policy: nn.Module, micro_batches: list[MicroBatch], cfg: Config,
                          neutral: list[MicroBatch] = ()) -> ScopeStats:
    """H_max, H_min and max Xi over every valid token of the mini-batch (a no-grad pre-pass); the `neutral`
    forwards only keep the ranks' passes even."""
    for mb in neutral:
        token_outputs(policy, mb, cfg.actor.temperature)
    parts = []
    for mb in micro_batches:
        logp, entropy, expect = token_outputs(policy, mb, cfg.actor.temperature)
        prox = mb.prox_logp if mb.prox_logp is not None else logp
        adv = mb.adv[:, None].expand_as(logp)
        parts.append(config_scope_stats(adv, _ratio(logp, prox), logp, entropy, expect, mb.mask, cfg.algo))
    if not parts:  # a rank with no micro-batch of this mini-batch still joins the reductions below
        device = next(policy.parameters()).device
        inf = torch.tensor(math.inf, device=device)
        parts.append(ScopeStats(entropy_max=-inf, entropy_min=inf.clone(), xi_max=-inf))
    stats = merge_scope_stats(parts)
    if _world()[1] > 1:
        for value, op in ((stats.entropy_max, dist.ReduceOp.MAX), (stats.entropy_min, dist.ReduceOp.MIN),
                          (stats.xi_max, dist.ReduceOp.MAX)):
            dist.all_reduce(value, op=op)
    return stats


def micro_batch_loss(policy: nn.Module, mb: MicroBatch, cfg: Config, denominators: tuple[float, float],
                     stats: ScopeStats | None) -> tuple[Tensor, dict[str, Any]]:
    """Forward one micro-batch, modulate its advantages and return its share of the mini-batch loss."""
    entropy_grad = cfg.algo.entropy_coef > 0
    logp, entropy, expect = token_outputs(policy, mb, cfg.actor.temperature, entropy_grad)
    prox = mb.prox_logp if mb.prox_logp is not None else logp.detach()
    adv, metrics = modulate_advantages(mb.adv[:, None], _ratio(logp, prox), logp, entropy.detach(), expect,
                                       mb.mask, cfg.algo, stats=stats)
    loss, loss_metrics = policy_loss(logp, prox, mb.behav_logp, adv, mb.mask, token_denominator=denominators[0],
                                     cfg=cfg.algo, seq_denominator=denominators[1],
                                     entropy=entropy if entropy_grad else None)
    metrics.update(loss_metrics)
    valid = mb.mask
    metrics["loss/entropy/token_mean"] = torch.where(valid, entropy.detach(), 0.0).sum() / valid.sum().clamp(min=1)
    metrics["loss/advantage_final/token_mean"] = torch.where(valid, adv, 0.0).sum() / valid.sum().clamp(min=1)
    return loss, metrics


class MetricAccumulator:
    """Combines per-part metrics: `/min` and `/max` reduce, `sum_keys` add up, the rest are weighted means."""

    def __init__(self, sum_keys: tuple[str, ...] = ()):
        self.sum_keys = sum_keys
        self._values: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict[str, Any], weight: float) -> None:
        for key, value in metrics.items():
            value = float(value)
            if key.endswith("/min") or key.endswith("/max"):
                pick = min if key.endswith("/min") else max
                self._values[key] = pick(self._values.get(key, value), value)
            elif key in self.sum_keys:
                self._values[key] = self._values.get(key, 0.0) + value
            elif math.isfinite(value):
                self._values[key] = self._values.get(key, 0.0) + value * weight
                self._weights[key] = self._weights.get(key, 0.0) + weight

    def result(self) -> dict[str, float]:
        return {k: (v / self._weights[k] if k in self._weights and self._weights[k] > 0 else v)
                for k, v in self._values.items()}


def _all_reduce_gradients(model: nn.Module) -> None:
    """Sum the gradients of the data-parallel ranks (each loss is already over the global denominator)."""
    if _world()[1] == 1:
        return
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)


def compute_precision(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to `learner.dtype` for the forward passes; weights, gradients and AdamW state stay float32 (a bf16
    weight of size ~0.02 has an ulp of ~1.2e-4, so lr-1e-6 updates would round away)."""
    if cfg.learner.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.learner.dtype))


def _precision(state: LearnerState, cfg: Config) -> contextlib.AbstractContextManager:
    """The sharded model casts its gathered layers itself (MixedPrecisionPolicy); autocast is for the others."""
    return contextlib.nullcontext() if state.sharded else compute_precision(cfg, state.device)


def accumulate_gradients(state: LearnerState, micro_batches: list[MicroBatch], denominators: tuple[float, float],
                         cfg: Config) -> dict[str, float]:
    """Backward over one mini-batch's micro-batches into .grad (zeroed first); returns the loss metrics."""
    from learner.sharding import set_gradient_sync

    mine, neutral = _shard(micro_batches, even=state.sharded)
    stats = None
    if cfg.algo.modulation and cfg.algo.modulation_scope == "minibatch" and len(micro_batches) > 1:
        with _precision(state, cfg):
            stats = minibatch_scope_stats(state.policy, mine, cfg, neutral)
    state.optimizer.zero_grad(set_to_none=True)
    acc = MetricAccumulator(sum_keys=("loss/policy", "loss/total", "loss/valid_tokens"))
    passes = [(mb, 1.0) for mb in mine] + [(mb, 0.0) for mb in neutral]
    for i, (mb, weight) in enumerate(passes):
        set_gradient_sync(state.policy, i == len(passes) - 1)  # one reduce-scatter per optimizer step
        with _precision(state, cfg):
            loss, metrics = micro_batch_loss(state.policy, mb, cfg, denominators, stats)
        (loss * weight).backward()  # outside autocast: backward runs each op in the dtype its forward chose
        if weight:
            acc.add(metrics, weight=mb.num_tokens)
    if not state.sharded:
        _all_reduce_gradients(state.model)
    return acc.result()


def apply_gradients(state: LearnerState, cfg: LearnerConfig) -> dict[str, float]:
    """Clip the global gradient norm (grad_clip 0: measure only) and take the AdamW step."""
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: a DTensor, already reduced over the ranks
        grad_norm = grad_norm.full_tensor()
    state.optimizer.step()
    return {"optim/grad_norm": float(grad_norm)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_step(state: LearnerState, batch: Batch, cfg: Config) -> dict[str, float]:
    """One learner step on `batch`; returns its metrics and advances `state.version` by one."""
    start = time.perf_counter()
    device = state.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prepared = prepare_step(batch, cfg)
    mini_batches = [[mb.to(device) for mb in mbs] for mbs in prepared.mini_batches]
    for mbs in mini_batches[1:]:
        mine, neutral = _shard(mbs, even=state.sharded)
        with _precision(state, cfg):
            record_prox_logp(state.policy, mine, cfg.actor.temperature, neutral)
    acc = MetricAccumulator(sum_keys=("loss/valid_tokens",))
    lr = state.optimizer.param_groups[0]["lr"]
    for mbs, denominators in zip(mini_batches, prepared.denominators):
        metrics = accumulate_gradients(state, mbs, denominators, cfg)
        metrics.update(apply_gradients(state, cfg.learner))
        acc.add(metrics, weight=denominators[0])
    state.scheduler.step()
    state.version += 1
    if state.sharded:  # the sharded parameters back on the modules, also after a step without a backward
        state.policy.reshard()
    elapsed = time.perf_counter() - start
    tokens = sum(mb.sequence_tokens for mbs in mini_batches for mb in mbs)
    metrics = {k: float(v) for k, v in prepared.metrics.items()}
    metrics.update(acc.result())
    metrics.update({"optim/lr": lr, "optim/steps": len(mini_batches), "time/forward_backward_s": elapsed,
                    "perf/tokens_per_s": tokens / elapsed, "perf/peak_memory_mb": peak_memory_mb(device)})
    return metrics
