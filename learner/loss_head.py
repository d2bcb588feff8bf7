"""Chunked loss head: per-token log-prob, entropy and E_pi[pi * Lambda] from hidden states, never all logits at once.

A micro-batch's response logits are [N, V]: at 32k tokens and a 152k vocabulary that is 10 GB in bf16 and twice
that once upcast, before its gradient. `head_token_outputs` instead projects `chunk_tokens` hidden states at a
time through the LM head, reduces that chunk's logits to the three per-token quantities and frees them. Backward
projects each chunk again (only the log-normaliser and the entropy, [N] each, are kept from the forward) and
writes the chunk's gradient into the hidden states and into one weight-sized accumulator. The extra memory is
O(chunk_tokens x V) + O(V x H) whatever N is; the price is one more head projection per chunk in backward.

Per position the results equal `learner.modulation.token_logprob_entropy` on `head(hidden) / temperature`:
log pi(token) with grad, the entropy H (with grad only when `entropy_grad`, for an entropy bonus) and
E_pi[pi * (log pi + H)] (detached). Each chunk's logits are computed in the dtype the unchunked head would give
(the weight's, or the autocast dtype) and reduced in at least float32; weight and bias gradients are summed over
chunks in float32 and cast to the parameter's dtype once. The hidden states must already be final-normed (HF
causal LMs apply the final norm inside the base model, so `base_model(...).last_hidden_state` is the head's input).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _log_pi_(scaled: Tensor, log_norm: Tensor) -> Tensor:
    """log pi [n, V] written over `scaled` (temperature-scaled logits, at least float32)."""
    return scaled.sub_(log_norm[:, None]).clamp_(min=torch.finfo(scaled.dtype).min)


def _chunk_outputs(scaled: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log pi(token), H, E_pi[pi (log pi + H)], log-normaliser), each [n], from scaled logits [n, V] (overwritten)."""
    shift = scaled.amax(-1)  # [n]; logsumexp by hand, since torch's keeps two [n, V] temporaries
    pi = scaled.sub_(shift[:, None]).exp()  # [n, V], unnormalised
    total = pi.sum(-1)  # [n]
    pi.div_(total[:, None])
    log_norm = shift + total.log()  # [n]
    log_pi = scaled.sub_(total.log()[:, None]).clamp_(min=torch.finfo(scaled.dtype).min)  # [n, V]
    logp = log_pi.gather(-1, tokens[:, None]).squeeze(-1)  # [n]
    # Elementwise products summed (not matmuls, which TF32 would round), in place in the two [n, V] buffers:
    entropy = -log_pi.mul_(pi).sum(-1)  # [n]; the buffer now holds pi log pi
    pi_log_pi_term = log_pi.mul_(pi).sum(-1)  # [n]: E_pi[pi log pi]
    expect = pi_log_pi_term + entropy * pi.square_().sum(-1)  # E_pi[pi log pi] + H E_pi[pi]
    return logp, entropy, expect, log_norm


def _chunk_logit_grad(scaled: Tensor, tokens: Tensor, log_norm: Tensor, entropy: Tensor, grad_logp: Tensor | None,
                      grad_entropy: Tensor | None) -> Tensor:
    """d loss / d scaled logits [n, V] (overwrites `scaled`): dlogp/dx = onehot - pi, dH/dx = -pi (log pi + H)."""
    log_pi = _log_pi_(scaled, log_norm)  # [n, V]
    pi = log_pi.exp()  # [n, V]
    if grad_entropy is not None:
        grad = log_pi.add_(entropy[:, None]).mul_(pi).mul_(grad_entropy[:, None])  # g_H pi (log pi + H)
        if grad_logp is not None:
            grad.addcmul_(pi, grad_logp[:, None])
        grad.neg_()
    else:
        grad = pi.mul_(-grad_logp[:, None])
    if grad_logp is not None:
        grad.scatter_add_(-1, tokens[:, None], grad_logp[:, None])
    return grad


class _ChunkedLossHead(torch.autograd.Function):
    """hidden [B, R, H] -> (log pi(token), H, E_pi[pi Lambda]) [B * R] through `linear(hidden, weight, bias) / T`.

    The hidden-state gradient is returned in the input's own shape (a contiguous [B, R, H]), so autograd can take
    it as `.grad` or pass it on without a copy.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, temperature: float,
                chunk_tokens: int, entropy_grad: bool):
        flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        n = flat.shape[0]
        outs = None
        for start in range(0, n, chunk_tokens):
            part = slice(start, min(start + chunk_tokens, n))
            logits = F.linear(flat[part], weight, bias)  # [c, V]
            if outs is None:
                ctx.logit_dtype = logits.dtype
                stat_dtype = torch.promote_types(logits.dtype, torch.float32)
                outs = [torch.empty(n, dtype=stat_dtype, device=hidden.device) for _ in range(4)]
            scaled = logits.div_(temperature).to(outs[0].dtype)  # [c, V]; no autograd here, so in place
            del logits
            for out, value in zip(outs, _chunk_outputs(scaled, tokens[part])):
                out[part] = value
            del scaled  # before the next chunk's logits exist
        if outs is None:  # no tokens
            ctx.logit_dtype = torch.promote_types(hidden.dtype, weight.dtype)
            stat_dtype = torch.promote_types(ctx.logit_dtype, torch.float32)
            outs = [hidden.new_empty(0, dtype=stat_dtype) for _ in range(4)]
        logp, entropy, expect, log_norm = outs
        ctx.save_for_backward(hidden, weight, bias, tokens, log_norm, entropy)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*((expect,) if entropy_grad else (expect, entropy)))
        return logp, entropy, expect

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_expect):
        hidden, weight, bias, tokens, log_norm, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = ctx.logit_dtype
        w = weight.to(dtype)  # [V, H]; a copy only under autocast
        b = bias.to(dtype) if bias is not None else None
        grad_hidden = hidden.new_zeros(hidden.shape) if need_hidden else None  # [B, R, H]
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None  # [V, H]
        grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if need_bias else None  # [V]
        device = hidden.device.type
        # the casts above already fix the dtype; a backward run inside an autocast region must not change it
        no_autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) \
            else nullcontext()
        with no_autocast:
            _accumulate_grads(hidden.reshape(-1, hidden.shape[-1]), w, b, tokens, log_norm, entropy, grad_logp,
                              grad_entropy, ctx.temperature, ctx.chunk_tokens,
                              grad_hidden.view(-1, hidden.shape[-1]) if grad_hidden is not None else None,
                              grad_weight, grad_bias)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _accumulate_grads(hidden: Tensor, w: Tensor, b: Tensor | None, tokens: Tensor, log_norm: Tensor,
                      entropy: Tensor, grad_logp: Tensor | None, grad_entropy: Tensor | None, temperature: float,
                      chunk_tokens: int, grad_hidden: Tensor | None, grad_weight: Tensor | None,
                      grad_bias: Tensor | None) -> None:
    """Recompute each chunk's logits and write its gradient into the hidden-state [N, H], weight and bias buffers."""
    dtype = w.dtype
    n = hidden.shape[0]
    for start in range(0, n, chunk_tokens):
        part = slice(start, min(start + chunk_tokens, n))
        h = hidden[part].to(dtype)  # [c, H]
        scaled = F.linear(h, w, b).div_(temperature).to(log_norm.dtype)  # [c, V]
        grad = _chunk_logit_grad(scaled, tokens[part], log_norm[part], entropy[part],
                                 None if grad_logp is None else grad_logp[part],
                                 None if grad_entropy is None else grad_entropy[part])
        grad = grad.div_(temperature).to(dtype)  # d loss / d logits [c, V]
        if grad_hidden is not None:
            grad_hidden[part] = grad @ w
        if grad_weight is not None and grad_weight.dtype == dtype:
            grad_weight.addmm_(grad.t(), h)
        elif grad_weight is not None:  # low-precision product, summed in float32
            grad_weight += grad.t() @ h
        if grad_bias is not None:
            grad_bias += grad.sum(0)
        del scaled, grad  # before the next chunk's logits exist


def head_token_outputs(hidden: Tensor, head: nn.Linear, tokens: Tensor, *, temperature: float, chunk_tokens: int,
                       entropy_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(log pi(tokens) with grad, entropy H, E_pi[pi * Lambda]), each [B, R] and at least float32.

    `hidden` [B, R, H] are the final-normed hidden states at the positions predicting `tokens` [B, R] (padding
    must still be a valid id; mask it later); `head` is the LM head (a tied one shares the input embedding's
    weight, which then gets this gradient too; its bias may be None). Works `chunk_tokens` positions at a time.
    """
    if hidden.dim() != 3 or tokens.shape != hidden.shape[:2]:
        raise ValueError(f"need hidden [B, R, H] and tokens [B, R], got {tuple(hidden.shape)}, {tuple(tokens.shape)}")
    if not isinstance(head, nn.Linear) or head.weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"need an nn.Linear LM head taking {hidden.shape[-1]} features, got {head!r}")
    if chunk_tokens < 1 or not temperature > 0:
        raise ValueError(f"need chunk_tokens >= 1 and temperature > 0, got {chunk_tokens}, {temperature}")
    outs = _ChunkedLossHead.apply(hidden, head.weight, head.bias, tokens.reshape(-1).long(), float(temperature),
                                  int(chunk_tokens), entropy_grad)
    return tuple(out.view(tokens.shape) for out in outs)
