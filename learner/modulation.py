"""Token-level advantage modulation (DynaMO, docs/ALGORITHM.md §3): A_final = A * beta_comp * beta_stab, no grad.

Tensors are [B, T] with a boolean `mask` of valid (response) tokens; only valid tokens count towards the scope
statistics (H_max, H_min, max Xi), and invalid positions get factor 1. The scope is the tokens passed in. To use a
whole optimizer mini-batch as the scope while training micro-batch by micro-batch, run `scope_stats` on each
micro-batch in a no-grad pre-pass, combine them with `merge_scope_stats`, and pass the result as `stats=`.

`token_logprob_entropy` gives the per-token inputs from the training forward pass: the log-prob of the sampled
token (with grad), the full-vocabulary entropy H and E_pi[pi * Lambda] (both detached), computed block by block so
that no second vocabulary-sized tensor is materialised or kept for backward.
Metrics are detached 0-dim tensors; logging them is the only device sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor

from common.config import AlgorithmConfig

DAMPED_BELOW = 0.99
"""beta_stab under this counts as damped in modulation/damped_fraction."""


def _blocks(rows: int, positions: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, position slice) blocks of about `chunk_size` positions covering a [rows, positions] grid."""
    if positions <= chunk_size:
        step = max(1, chunk_size // max(positions, 1))
        for r in range(0, rows, step):
            yield slice(r, min(r + step, rows)), slice(0, positions)
    else:
        for r in range(rows):
            for t in range(0, positions, chunk_size):
                yield slice(r, r + 1), slice(t, min(t + chunk_size, positions))


class _TokenLogprobEntropy(torch.autograd.Function):
    """log pi(token), H and E_pi[pi * Lambda] per position; backward recomputes softmax block by block.

    Autograd through log_softmax would keep a float copy of every block of logits alive until backward; here only
    the log-normaliser [B, T] is saved and the gradient is written straight into one logits-sized buffer.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, chunk_size: int, entropy_grad: bool):
        rows, positions, _ = logits.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = [torch.empty(rows, positions, dtype=dtype, device=logits.device) for _ in range(4)]
        logp, entropy, expect, log_norm = out  # each [B, T]
        for r, t in _blocks(rows, positions, chunk_size):
            x = logits[r, t].to(dtype)  # [b, t, V]
            log_norm[r, t] = torch.logsumexp(x, dim=-1)
            log_pi = (x - log_norm[r, t, None]).clamp(min=torch.finfo(dtype).min)  # [b, t, V]
            pi = log_pi.exp()
            h = -(pi * log_pi).sum(-1)  # [b, t]
            entropy[r, t] = h
            expect[r, t] = (pi.square() * (log_pi + h[..., None])).sum(-1)
            logp[r, t] = log_pi.gather(-1, tokens[r, t, None]).squeeze(-1)
        ctx.save_for_backward(logits, tokens, log_norm, entropy)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*((expect,) if entropy_grad else (expect, entropy)))
        return logp, entropy, expect

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_expect):
        logits, tokens, log_norm, entropy = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # [B, T, V]
        if grad_logp is None and grad_entropy is None:
            return grad, None, None, None
        for r, t in _blocks(logits.shape[0], logits.shape[1], ctx.chunk_size):
            log_pi = (logits[r, t].to(log_norm.dtype) - log_norm[r, t, None]).clamp(
                min=torch.finfo(log_norm.dtype).min)
            pi = log_pi.exp()  # [b, t, V]
            block = torch.zeros_like(pi)
            if grad_logp is not None:
                g = grad_logp[r, t, None]  # [b, t, 1]
                block -= g * pi
                block.scatter_add_(-1, tokens[r, t, None], g)
            if grad_entropy is not None:
                block -= grad_entropy[r, t, None] * pi * (log_pi + entropy[r, t, None])  # dH/dx = -pi(log pi + H)
            grad[r, t] = block.to(grad.dtype)
        return grad, None, None, None


def token_logprob_entropy(logits: Tensor, tokens: Tensor, *, chunk_size: int = 1024,
                          entropy_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(log pi(tokens) [B, T] with grad, entropy H [B, T], E_pi[pi * (log pi + H)] [B, T]), at least float32.

    `logits` [B, T, V] are already temperature-scaled; `tokens` [B, T] are the sampled ids (padding must still be
    a valid id; mask it later). Work is done in blocks of about `chunk_size` positions. The entropy is detached
    unless `entropy_grad` (needed only for an entropy bonus).
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"need logits [B, T, V] and tokens [B, T], got {tuple(logits.shape)}, {tuple(tokens.shape)}")
    return _TokenLogprobEntropy.apply(logits, tokens.long(), chunk_size, entropy_grad)


@dataclass(frozen=True)
class ScopeStats:
    """Statistics of one modulation scope (0-dim tensors): entropy range and the largest entropy change Xi."""

    entropy_max: Tensor
    entropy_min: Tensor
    xi_max: Tensor

    def merge(self, other: "ScopeStats") -> "ScopeStats":
        return ScopeStats(torch.maximum(self.entropy_max, other.entropy_max),
                          torch.minimum(self.entropy_min, other.entropy_min), torch.maximum(self.xi_max, other.xi_max))


def merge_scope_stats(stats: Iterable[ScopeStats]) -> ScopeStats:
    """Statistics of the union of several scopes (e.g. the micro-batches of one optimizer mini-batch)."""
    merged = None
    for s in stats:
        merged = s if merged is None else merged.merge(s)
    if merged is None:
        raise ValueError("no scope statistics to merge")
    return merged


def _masked_max(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, -torch.inf).amax() if values.numel() else values.new_tensor(-torch.inf)


def _masked_min(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.inf).amin() if values.numel() else values.new_tensor(torch.inf)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _exact_expectation(pi_lambda: Tensor, expect_term: Tensor | None, mask: Tensor) -> Tensor:
    """E_pi[pi * Lambda] computed from the full distribution by `token_logprob_entropy`."""
    if expect_term is None:
        raise ValueError("expectation='exact' needs expect_term from token_logprob_entropy")
    return expect_term


def _parity_expectation(pi_lambda: Tensor, expect_term: Tensor | None, mask: Tensor) -> Tensor:
    """The reference's approximation: the mean of pi_a * Lambda_a over each response's valid tokens."""
    per_response = torch.where(mask, pi_lambda, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_response[:, None].expand_as(pi_lambda)


EXPECTATIONS = {"exact": _exact_expectation, "parity": _parity_expectation}


@torch.no_grad()
def entropy_change(adv: Tensor, ratio: Tensor, logp: Tensor, entropy: Tensor, expect_term: Tensor | None,
                   mask: Tensor, *, eps_low: float, eps_high: float, expectation: str = "exact") -> Tensor:
    """Xi_t = |xi_t * (pi_a * Lambda_a - E_pi[pi * Lambda])| [B, T], the first-order entropy change of a PG step.

    xi_t = I_clip * r * A is the token's effective policy-gradient coefficient: clipped tokens have no gradient
    and so move nothing. Invalid positions are 0.
    """
    logp = logp.detach().float()  # [B, T]
    pi_lambda = logp.exp() * (logp + entropy)  # [B, T]
    expected = EXPECTATIONS[expectation](pi_lambda, expect_term, mask)  # [B, T]
    in_clip = ((adv > 0) & (ratio <= 1 + eps_high)) | ((adv < 0) & (ratio >= 1 - eps_low))  # [B, T]
    xi = in_clip * ratio * adv  # [B, T]
    return torch.where(mask, (xi * (pi_lambda - expected)).abs(), 0.0)


@torch.no_grad()
def scope_stats(adv: Tensor, ratio: Tensor, logp: Tensor, entropy: Tensor, expect_term: Tensor | None,
                mask: Tensor, *, eps_low: float, eps_high: float, expectation: str = "exact") -> ScopeStats:
    """H_max, H_min and max Xi over the valid tokens passed in (an empty scope gives -inf, inf, 0)."""
    xi = entropy_change(adv, ratio, logp, entropy, expect_term, mask, eps_low=eps_low, eps_high=eps_high,
                        expectation=expectation)  # [B, T]
    return ScopeStats(_masked_max(entropy, mask), _masked_min(entropy, mask),
                      xi.amax() if xi.numel() else xi.new_tensor(0.0))


def config_scope_stats(adv: Tensor, ratio: Tensor, logp: Tensor, entropy: Tensor, expect_term: Tensor | None,
                       mask: Tensor, cfg: AlgorithmConfig) -> ScopeStats:
    """`scope_stats` with the clip range and expectation variant taken from the config."""
    return scope_stats(adv, ratio, logp, entropy, expect_term, mask, eps_low=cfg.clip_eps_low,
                       eps_high=cfg.clip_eps_high, expectation=cfg.stab_expectation)


@torch.no_grad()
def compensation_factor(adv: Tensor, entropy: Tensor, mask: Tensor, *, alpha: float,
                        stats: ScopeStats | None = None) -> Tensor:
    """beta_comp [B, T] = 1 + alpha * (H_max - H) / (H_max - H_min + 1e-8) for A > 0, else 1.

    Confident (low-entropy) tokens get vanishing softmax gradients; boosting their positive advantages makes up
    for it. Negative advantages are left alone so as not to push confident tokens down harder.
    """
    if stats is None:
        stats = ScopeStats(_masked_max(entropy, mask), _masked_min(entropy, mask), entropy.new_tensor(0.0))
    boost = 1 + alpha * (stats.entropy_max - entropy) / (stats.entropy_max - stats.entropy_min + 1e-8)  # [B, T]
    return torch.where(mask & (adv > 0), boost, 1.0)


@torch.no_grad()
def stabilisation_factor(adv: Tensor, ratio: Tensor, logp: Tensor, entropy: Tensor, expect_term: Tensor | None,
                         mask: Tensor, *, eps_low: float, eps_high: float, lambda_min: float, gamma: float,
                         tau: float, expectation: str = "exact",
                         stats: ScopeStats | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """beta_stab [B, T] = lambda_min + (1 - lambda_min) / (1 + exp(gamma * (x - tau))), x = Xi / (max Xi + 1e-8).

    Damps only the tokens whose update would move the entropy the most (x near the scope maximum), which keeps
    entropy from collapsing or exploding; with the defaults beta is ~1 for x <= 0.8 and ~0.751 at x = 1.
    """
    xi = entropy_change(adv, ratio, logp, entropy, expect_term, mask, eps_low=eps_low, eps_high=eps_high,
                        expectation=expectation)  # [B, T]
    xi_max = xi.amax() if stats is None else stats.xi_max
    x = xi / (xi_max + 1e-8)  # [B, T]
    beta = lambda_min + (1 - lambda_min) * torch.sigmoid(-gamma * (x - tau))  # [B, T]
    beta = torch.where(mask, beta, 1.0)
    metrics = {
        "modulation/beta_stab/mean": _masked_mean(beta, mask),
        "modulation/beta_stab/min": _masked_min(beta, mask),
        "modulation/damped_fraction": _masked_mean((beta < DAMPED_BELOW).float(), mask),
        "modulation/xi/max": xi_max,
    }
    return beta, metrics


@torch.no_grad()
def modulate_advantages(adv: Tensor, ratio: Tensor, logp: Tensor, entropy: Tensor, expect_term: Tensor | None,
                        mask: Tensor, cfg: AlgorithmConfig, *,
                        stats: ScopeStats | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """A_final [B, T] = A * beta_comp * beta_stab when cfg.modulation, else A unchanged (and no metrics).

    `adv` is [B, T] (or [B, 1], broadcast); `ratio` = pi_theta / pi_prox, detached. Both factors are positive, so
    the sign of A and the PPO clip region of every token are unchanged. `stats` defaults to this call's tokens.
    """
    adv = adv.detach().float().expand_as(entropy)  # [B, T]
    if not cfg.modulation:
        return adv, {}
    if stats is None:
        stats = config_scope_stats(adv, ratio, logp, entropy, expect_term, mask, cfg)
    beta_comp = compensation_factor(adv, entropy, mask, alpha=cfg.comp_alpha, stats=stats)  # [B, T]
    beta_stab, metrics = stabilisation_factor(
        adv, ratio, logp, entropy, expect_term, mask, eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high,
        lambda_min=cfg.stab_lambda_min, gamma=cfg.stab_gamma, tau=cfg.stab_tau, expectation=cfg.stab_expectation,
        stats=stats)  # [B, T]
    metrics.update({
        "modulation/beta_comp/mean": _masked_mean(beta_comp, mask),
        "modulation/beta_comp/min": _masked_min(beta_comp, mask),
        "modulation/beta_comp/max": _masked_max(beta_comp, mask),
        "modulation/entropy/token_mean": _masked_mean(entropy, mask),
        "modulation/entropy/max": stats.entropy_max,
        "modulation/entropy/min": stats.entropy_min,
    })
    return adv * beta_comp * beta_stab, metrics
