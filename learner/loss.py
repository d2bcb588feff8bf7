"""Off-policy corrected PPO loss (docs/ALGORITHM.md §4): decoupled ratio, dual clip, truncated/masked IS weights.

Tensors are [B, T] with a boolean `mask` of valid (response) tokens. Three log-probs per token: `logp` of the
current weights (with grad), `prox_logp` of the weights at the start of the optimizer step, and `behav_logp` from
the engine that sampled the token. The PPO ratio is taken against the proximal policy, so the trust region does
not depend on how stale the sample is; the staleness is corrected by the detached weight pi_prox / mu.

The loss is a sum over this micro-batch divided by a denominator the caller computes once per optimizer step
(all valid tokens, or all sequences, of the step), so summing gradients over micro-batches gives exactly the
full-batch gradient whatever the split. Metrics are detached 0-dim tensors: `loss/policy` and `loss/total` add
up over the micro-batches of a step, the fractions and means are token-weighted over this call's valid tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from common.config import AlgorithmConfig

LOG_RATIO_CLAMP = 20.0
"""Log-probability differences are clamped to this before exp, so one wild token cannot overflow the ratio."""


def _ratio(logp_num: Tensor, logp_den: Tensor) -> Tensor:
    return torch.exp((logp_num - logp_den).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _no_correction(ratio: Tensor, cap: float) -> tuple[Tensor, Tensor, Tensor]:
    untouched = torch.zeros_like(ratio, dtype=torch.bool)
    return torch.ones_like(ratio), untouched, untouched


def _truncate(ratio: Tensor, cap: float) -> tuple[Tensor, Tensor, Tensor]:
    """w = min(ratio, cap): bounds the variance a very stale token can add, at a small bias."""
    return ratio.clamp(max=cap), ratio > cap, torch.zeros_like(ratio, dtype=torch.bool)


def _mask_outside(ratio: Tensor, cap: float) -> tuple[Tensor, Tensor, Tensor]:
    """w = ratio inside [1/cap, cap], 0 outside: drops tokens the behaviour policy no longer represents."""
    dropped = (ratio < 1.0 / cap) | (ratio > cap)
    return torch.where(dropped, 0.0, ratio), torch.zeros_like(dropped), dropped


IS_CORRECTIONS: dict[str, Callable[[Tensor, float], tuple[Tensor, Tensor, Tensor]]] = {
    "none": _no_correction, "truncate": _truncate, "mask": _mask_outside}
"""(weight, truncated, masked) from the ratio pi_prox / mu, by `AlgorithmConfig.is_mode`."""


@torch.no_grad()
def importance_weights(prox_logp: Tensor, behav_logp: Tensor, mask: Tensor, *, mode: str,
                       cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached weights w [B, T] correcting samples of mu towards pi_prox (0 at invalid positions).

    `loss/is_kl_prox_behav/token_mean` estimates KL(pi_prox || mu) from tokens sampled by mu with
    rho log rho - rho + 1 (rho = pi_prox / mu), which is unbiased and never negative.
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown importance-weight mode {mode!r}; choose from {sorted(IS_CORRECTIONS)}")
    rho = _ratio(prox_logp.detach().float(), behav_logp.detach().float())  # [B, T]
    weights, truncated, masked = IS_CORRECTIONS[mode](rho, cap)  # [B, T] each
    weights = torch.where(mask, weights, 0.0)
    metrics = {
        "loss/is_weight/min": torch.where(mask, weights, torch.inf).amin(),
        "loss/is_weight/token_mean": _masked_mean(weights, mask),
        "loss/is_weight/max": torch.where(mask, weights, -torch.inf).amax(),
        "loss/is_ratio/min": torch.where(mask, rho, torch.inf).amin(),
        "loss/is_ratio/max": torch.where(mask, rho, -torch.inf).amax(),
        "loss/is_truncated_fraction": _masked_mean(truncated.float(), mask),
        "loss/is_masked_fraction": _masked_mean(masked.float(), mask),
        "loss/is_kl_prox_behav/token_mean": _masked_mean(rho * rho.log() - rho + 1, mask),
    }
    return weights, metrics


def _token_mean(per_token: Tensor, mask: Tensor, token_denominator: float, seq_denominator: float | None) -> Tensor:
    """Sum over valid tokens / all valid tokens of the optimizer step: every token weighs the same."""
    return torch.where(mask, per_token, 0.0).sum() / token_denominator


def _seq_mean_token_mean(per_token: Tensor, mask: Tensor, token_denominator: float,
                         seq_denominator: float | None) -> Tensor:
    """Sum over sequences of each sequence's token mean / all sequences of the step: every response weighs the same."""
    if seq_denominator is None:
        raise ValueError("loss_aggregation 'seq-mean-token-mean' needs seq_denominator")
    per_sequence = torch.where(mask, per_token, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_sequence.sum() / seq_denominator


AGGREGATIONS = {"token-mean": _token_mean, "seq-mean-token-mean": _seq_mean_token_mean}
"""Loss aggregation by `AlgorithmConfig.loss_aggregation`."""


def _clipped_surrogate(ratio: Tensor, adv: Tensor, *, eps_low: float, eps_high: float,
                       dual_clip_c: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token -A * r with the PPO clip and, for A < 0, the dual-clip cap -A * c; plus where each bound bites."""
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)  # [B, T]
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    dual = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip_c > 0:
        cap = -adv * dual_clip_c  # [B, T]
        dual = (adv < 0) & (cap < per_token)  # [B, T]
        per_token = torch.where(dual, cap, per_token)
    regions = {"low": (adv < 0) & (ratio < 1 - eps_low), "high": (adv > 0) & (ratio > 1 + eps_high), "dual": dual}
    return per_token, regions


def _k3_kl(logp: Tensor, behav_logp: Tensor) -> Tensor:
    """k3 estimator of KL(pi_theta || mu) per token: exp(d) - d - 1 with d = log mu - log pi_theta, >= 0."""
    d = (behav_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1


def policy_loss(logp: Tensor, prox_logp: Tensor, behav_logp: Tensor, adv: Tensor, mask: Tensor, *,
                token_denominator: float, cfg: AlgorithmConfig, seq_denominator: float | None = None,
                entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss of one micro-batch: w * max(-A r, -A clip(r)) (dual-clipped for A < 0), aggregated.

    `adv` [B, T] (or [B, 1]) is A_final, detached. `entropy` [B, T] must carry grad when cfg.entropy_coef > 0
    (see `token_logprob_entropy(entropy_grad=True)`). The KL and entropy terms are only added when their
    coefficients are positive.
    """
    if token_denominator <= 0:
        raise ValueError(f"token_denominator must be > 0, got {token_denominator}")
    aggregate = AGGREGATIONS[cfg.loss_aggregation]
    adv = adv.detach().float().expand_as(logp)  # [B, T]
    ratio = _ratio(logp.float(), prox_logp.detach().float())  # [B, T], grad through logp
    weights, metrics = importance_weights(prox_logp, behav_logp, mask, mode=cfg.is_mode, cap=cfg.is_cap)
    surrogate, regions = _clipped_surrogate(ratio, adv, eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high,
                                            dual_clip_c=cfg.dual_clip_c)  # [B, T]
    policy = aggregate(weights * surrogate, mask, token_denominator, seq_denominator)
    loss = policy
    if cfg.kl_coef > 0:
        kl = _k3_kl(logp.float(), behav_logp.float())  # [B, T]
        loss = loss + cfg.kl_coef * aggregate(kl, mask, token_denominator, seq_denominator)
        metrics["loss/kl_behav/token_mean"] = _masked_mean(kl.detach(), mask)
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the per-token entropy (with grad)")
        loss = loss - cfg.entropy_coef * aggregate(entropy, mask, token_denominator, seq_denominator)
        metrics["loss/entropy/token_mean"] = _masked_mean(entropy.detach(), mask)
    metrics.update({
        "loss/policy": policy.detach(),
        "loss/total": loss.detach(),
        "loss/clip_fraction/low": _masked_mean(regions["low"].float(), mask),
        "loss/clip_fraction/high": _masked_mean(regions["high"].float(), mask),
        "loss/dual_clip_fraction": _masked_mean(regions["dual"].float(), mask),
        "loss/ratio/token_mean": _masked_mean(ratio.detach(), mask),
        "loss/valid_tokens": mask.sum(),
    })
    return loss, metrics
