"""Token-level modulation (docs/ALGORITHM.md §3): chunked logp/entropy/expectation, beta_comp, beta_stab, scopes."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from common.config import AlgorithmConfig
from learner.modulation import (ScopeStats, compensation_factor, config_scope_stats, merge_scope_stats,
                                modulate_advantages, stabilisation_factor, token_logprob_entropy)

pytestmark = pytest.mark.unit
CFG = AlgorithmConfig()  # alpha .2, lambda_min .6, gamma 50, tau .99, eps .2/.28, exact expectation
STAB = dict(eps_low=0.2, eps_high=0.28, lambda_min=0.6, gamma=50.0, tau=0.99)


def assert_close(got, want, atol=1e-6):
    """torch.allclose with a message (torch.testing.assert_close lazily imports torch.distributed: seconds)."""
    want = torch.as_tensor(want, dtype=got.dtype)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=atol), f"{got} != {want}"


def _expect_for(logp, entropy, d):
    """The E_pi[pi*Lambda] that makes pi_a*Lambda_a - E equal to d (so Xi = |I_clip * r * A * d|)."""
    return logp.exp() * (logp + entropy) - d


# ---- log-prob, entropy, expectation ----------------------------------------------------------------------------

def _numpy_reference(logits, tokens):
    logits = logits.detach().double().numpy()
    shifted = logits - logits.max(-1, keepdims=True)
    log_pi = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    pi = np.exp(log_pi)
    entropy = -(pi * log_pi).sum(-1)
    expect = np.zeros_like(entropy)
    for b in range(logits.shape[0]):  # brute force: sum_v pi_v^2 (log pi_v + H), one position at a time
        for t in range(logits.shape[1]):
            expect[b, t] = sum(pi[b, t, v] ** 2 * (log_pi[b, t, v] + entropy[b, t]) for v in range(logits.shape[2]))
    logp = np.take_along_axis(log_pi, tokens.numpy()[..., None], -1)[..., 0]
    return logp, entropy, expect


def test_exact_expectation_and_entropy_match_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64) * 3
    tokens = torch.randint(0, 5, (2, 3))
    logp, entropy, expect = token_logprob_entropy(logits, tokens, chunk_size=2)
    ref_logp, ref_entropy, ref_expect = _numpy_reference(logits, tokens)
    np.testing.assert_allclose(logp.numpy(), ref_logp, atol=1e-12)
    np.testing.assert_allclose(entropy.numpy(), ref_entropy, atol=1e-12)
    np.testing.assert_allclose(expect.numpy(), ref_expect, atol=1e-12)
    # uniform over 4: H = log 4, and every pi_v * Lambda_v = 1/4 * (log 1/4 + log 4) = 0 -> E = 0
    _, h, e = token_logprob_entropy(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long))
    assert h.item() == pytest.approx(math.log(4), abs=1e-6) and e.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7, 8, 100])
def test_chunked_equals_unchunked(chunk_size):
    torch.manual_seed(1)
    base = torch.randn(3, 8, 11)
    tokens = torch.randint(0, 11, (3, 7))
    logits = base[:, :-1]  # a shifted, non-contiguous view, as a causal LM produces
    outs = token_logprob_entropy(logits, tokens, chunk_size=chunk_size)
    whole = token_logprob_entropy(logits.contiguous(), tokens, chunk_size=10**6)
    log_pi = torch.log_softmax(logits, -1)
    for got, want in zip(outs, whole):
        assert_close(got, want, atol=1e-6)
    assert_close(outs[0], log_pi.gather(-1, tokens[..., None])[..., 0], atol=1e-6)


def test_gradients_of_logp_and_entropy():
    # the hand-written backward against autograd through log_softmax, for an arbitrary upstream gradient
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 4, (2, 3))
    g_logp, g_entropy = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    logp, entropy, _ = token_logprob_entropy(logits, tokens, chunk_size=2, entropy_grad=True)
    (got,) = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), logits)
    log_pi = torch.log_softmax(logits, -1)
    ref_entropy = -(log_pi.exp() * log_pi).sum(-1)
    ref_logp = log_pi.gather(-1, tokens[..., None])[..., 0]
    (want,) = torch.autograd.grad((ref_logp * g_logp + ref_entropy * g_entropy).sum(), logits)
    assert_close(got, want, atol=1e-12)
    logp, entropy, expect = token_logprob_entropy(logits, tokens)
    assert logp.requires_grad and not entropy.requires_grad and not expect.requires_grad


def test_no_vocab_sized_tensor_saved_for_backward():
    logits = torch.randn(2, 16, 50, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp, _, _ = token_logprob_entropy(logits, torch.zeros(2, 16, dtype=torch.long), chunk_size=4)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert all(t.data_ptr() == logits.data_ptr() for t in big)  # only the logits themselves, no copy
    logp.sum().backward()
    assert logits.grad.shape == logits.shape


# ---- beta_comp -------------------------------------------------------------------------------------------------

def test_beta_comp_at_entropy_extremes():
    # valid H = .5 (H_min), 2.5 (H_max), 1.5; the masked 0.0 must not become H_min.
    # A > 0: 1 + .2 * (2.5 - H) / 2 -> 1.2, 1.0, 1.1;  masked -> 1
    entropy = torch.tensor([[0.5, 2.5, 1.5, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    beta = compensation_factor(torch.ones(1, 4), entropy, mask, alpha=0.2)
    assert_close(beta, torch.tensor([[1.2, 1.0, 1.1, 1.0]]))
    # A <= 0: always 1 (no boost of negative advantages)
    for adv in (-torch.ones(1, 4), torch.zeros(1, 4)):
        assert_close(compensation_factor(adv, entropy, mask, alpha=0.2), torch.ones(1, 4))
    # a precomputed wider scope (H in [0.5, 4.5]): H = 2.5 -> 1 + .2 * 2/4 = 1.1
    wide = ScopeStats(torch.tensor(4.5), torch.tensor(0.5), torch.tensor(1.0))
    assert compensation_factor(torch.ones(1, 4), entropy, mask, alpha=0.2, stats=wide)[0, 1].item() == \
        pytest.approx(1.1)


# ---- beta_stab -------------------------------------------------------------------------------------------------

def test_beta_stab_curve_values():
    # on-policy (r = 1), A = 1 -> Xi = |d|; d = 1, .95, .8, 0 -> x = Xi / (1 + 1e-8)
    # f(x) = .6 + .4 / (1 + exp(50 (x - .99))):
    #   x = 1   : .6 + .4 / (1 + e^0.5)   = .6 + .4 / 2.64872 = 0.75102
    #   x = .95 : .6 + .4 / (1 + e^-2)    = .6 + .4 / 1.13534 = 0.95232
    #   x = .8  : .6 + .4 / (1 + e^-9.5)  = 0.99997
    #   x = 0   : .6 + .4 / (1 + e^-49.5) = 1.00000
    logp = torch.full((1, 4), math.log(0.5))
    entropy = torch.ones(1, 4)
    expect = _expect_for(logp, entropy, torch.tensor([[1.0, 0.95, 0.8, 0.0]]))
    beta, metrics = stabilisation_factor(torch.ones(1, 4), torch.ones(1, 4), logp, entropy, expect,
                                         torch.ones(1, 4, dtype=torch.bool), **STAB)
    assert_close(beta, torch.tensor([[0.75102, 0.95232, 0.99997, 1.0]]), atol=1e-5)
    assert metrics["modulation/damped_fraction"].item() == pytest.approx(0.5)  # .751 and .952 are < .99
    assert metrics["modulation/beta_stab/min"].item() == pytest.approx(0.75102, abs=1e-5)


def test_beta_stab_ignores_clipped_and_masked_tokens():
    # I_clip: A>0 needs r <= 1.28, A<0 needs r >= 0.8 (a clipped token has no gradient, so moves nothing)
    # token 0: A>0, r=1.3          -> clipped, Xi 0 (even with d=5)
    # token 1: A<0, r=0.75 < 0.8   -> clipped, Xi 0 (with 1 - eps_high = .72 it would be 3.75, the max)
    # token 2: A<0, r=1.3 >= 0.8   -> Xi = 1.3 * 1 * |1| = 1.3, the scope max: x = 1 -> .75102
    # token 3: A>0, r=1.0          -> Xi = 1.0, x = 1/1.3 = .769 -> .6 + .4/(1 + e^-11.04) = 0.99999
    # token 4: masked, d=100       -> ignored, factor 1
    # token 5: A>0, r=1.25 <= 1.28 -> Xi = 1.25 * .988 = 1.235, x = .95 -> .95232 (with 1 + eps_low: clipped, 1)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0]])
    ratio = torch.tensor([[1.3, 0.75, 1.3, 1.0, 1.0, 1.25]])
    logp = ratio.log()  # prox = 0 -> log r = logp
    entropy = torch.ones(1, 6)
    expect = _expect_for(logp, entropy, torch.tensor([[5.0, 5.0, 1.0, 1.0, 100.0, 0.988]]))
    mask = torch.tensor([[True, True, True, True, False, True]])
    beta, metrics = stabilisation_factor(adv, ratio, logp, entropy, expect, mask, **STAB)
    assert_close(beta, torch.tensor([[1.0, 1.0, 0.75102, 0.99999, 1.0, 0.95232]]), atol=1e-5)
    assert metrics["modulation/xi/max"].item() == pytest.approx(1.3, rel=1e-6)


def test_beta_stab_parity_uses_response_mean():
    # logp = 0 (pi_a = 1) -> pi_a * Lambda_a = H.
    # row 0: valid H = 1, 3 (masked 100) -> mean 2 -> d = -1, +1 -> Xi = 1, 1 (both the max) -> .75102
    # row 1: valid H = 2, 2 -> mean 2 -> d = 0 -> Xi = 0 -> 1
    entropy = torch.tensor([[1.0, 3.0, 100.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ones = torch.ones(2, 3)
    beta, _ = stabilisation_factor(ones, ones, torch.zeros(2, 3), entropy, None, mask, expectation="parity", **STAB)
    assert_close(beta, torch.tensor([[0.75102, 0.75102, 1.0], [1.0, 1.0, 1.0]]), atol=1e-5)
    with pytest.raises(ValueError):
        stabilisation_factor(ones, ones, torch.zeros(2, 3), entropy, None, mask, expectation="exact", **STAB)


# ---- composition and scopes --------------------------------------------------------------------------------------

def _random_inputs(seed, rows=4, positions=6):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(rows, 1, generator=g).expand(rows, positions)
    logp = -torch.rand(rows, positions, generator=g) * 3
    ratio = torch.exp(torch.randn(rows, positions, generator=g) * 0.2)
    entropy = torch.rand(rows, positions, generator=g) * 3
    expect = torch.rand(rows, positions, generator=g) * 0.3
    mask = torch.rand(rows, positions, generator=g) > 0.2
    return adv, ratio, logp, entropy, expect, mask


def test_modulation_keeps_sign_and_bounds():
    adv, ratio, logp, entropy, expect, mask = _random_inputs(3, rows=16, positions=32)
    final, metrics = modulate_advantages(adv, ratio, logp, entropy, expect, mask, CFG)
    factor = torch.where(adv != 0, final / adv, 1.0)
    assert (factor >= 0.6 * 0.99).all() and (factor <= 1.2 + 1e-6).all()  # [lambda_min, 1 + alpha]
    assert (torch.sign(final) == torch.sign(adv)).all()
    assert not final.requires_grad
    assert metrics["modulation/beta_comp/max"].item() == pytest.approx(1.2, abs=1e-6)  # the H_min token with A>0


def test_modulation_off_is_identity():
    adv, ratio, logp, entropy, expect, mask = _random_inputs(4)
    final, metrics = modulate_advantages(adv, ratio, logp, entropy, expect, mask, replace(CFG, modulation=False))
    assert_close(final, adv)
    assert metrics == {}


def test_minibatch_scope_via_merged_stats_equals_whole_batch():
    adv, ratio, logp, entropy, expect, mask = _random_inputs(5, rows=6)
    whole, _ = modulate_advantages(adv, ratio, logp, entropy, expect, mask, CFG)
    halves = [tuple(x[s] for x in (adv, ratio, logp, entropy, expect, mask)) for s in (slice(0, 3), slice(3, 6))]
    stats = merge_scope_stats(config_scope_stats(*h, CFG) for h in halves)
    merged = torch.cat([modulate_advantages(*h, CFG, stats=stats)[0] for h in halves])
    assert_close(merged, whole)
    # the micro-batch scope (parity) is a different computation: it must not coincide by accident
    per_half = torch.cat([modulate_advantages(*h, CFG)[0] for h in halves])
    assert not torch.allclose(per_half, whole)
