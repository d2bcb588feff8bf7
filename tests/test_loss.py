"""Policy loss (docs/ALGORITHM.md §4) by hand, importance weights, aggregation, micro-batch invariance, and a 2-group
example flowing through advantages -> modulation -> loss."""

import math
from dataclasses import replace

import pytest
import torch

from common.config import AlgorithmConfig
from learner.advantages import group_advantages
from learner.loss import importance_weights, policy_loss
from learner.modulation import config_scope_stats, merge_scope_stats, modulate_advantages, token_logprob_entropy

pytestmark = pytest.mark.unit
CFG = AlgorithmConfig(is_mode="none")  # eps_low .2, eps_high .28, dual clip c = 10, token-mean


def assert_close(got, want, atol=1e-6):
    """torch.allclose with a message (torch.testing.assert_close lazily imports torch.distributed: seconds)."""
    want = torch.as_tensor(want, dtype=got.dtype)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=atol), f"{got} != {want}"


# ---- clipped surrogate ---------------------------------------------------------------------------------------------

# token: (A, r) -> per-token loss max(-A r, -A clip(r, .8, 1.28)), dual-capped at -A*10 for A < 0; d loss / d log r
TABLE = [
    (1.0, 1.1),    # A>0, inside:           max(-1.1, -1.1)  = -1.1   grad -A r = -1.1
    (1.0, 1.5),    # A>0, above 1.28:       max(-1.5, -1.28) = -1.28  clipped high, grad 0
    (1.0, 0.5),    # A>0, below .8:         max(-0.5, -0.8)  = -0.5   not clipped (PPO), grad -0.5
    (-1.0, 0.9),   # A<0, inside:           max(0.9, 0.9)    = 0.9    grad 0.9
    (-1.0, 0.5),   # A<0, below .8:         max(0.5, 0.8)    = 0.8    clipped low, grad 0
    (-1.0, 1.5),   # A<0, above 1.28:       max(1.5, 1.28)   = 1.5    not clipped, grad 1.5
    (-1.0, 12.0),  # A<0, r > c:            max(12, 1.28) = 12 -> dual cap 10, grad 0
    (-2.0, 3.0),   # A<0, r < c:            6 < 20: 6                  grad 2 * 3 = 6
    (1.0, 1.25),   # A>0, 1.2 < r < 1.28:   max(-1.25, -1.25) = -1.25 inside (eps_high, not eps_low), grad -1.25
    (-1.0, 0.75),  # A<0, .72 < r < .8:     max(0.75, 0.8)   = 0.8    clipped low (eps_low, not eps_high), grad 0
]
# sum = -1.1 - 1.28 - 0.5 + 0.9 + 0.8 + 1.5 + 10 + 6 - 1.25 + 0.8 = 15.87; token-mean over 10 -> 1.587


def _table_inputs():
    adv = torch.tensor([[a for a, _ in TABLE]])
    log_ratio = torch.tensor([[math.log(r) for _, r in TABLE]])
    prox = torch.full_like(log_ratio, -1.0)
    logp = (prox + log_ratio).requires_grad_()
    return logp, prox, adv, torch.ones_like(adv, dtype=torch.bool)


def test_clipped_and_unclipped_tokens_both_signs():
    logp, prox, adv, mask = _table_inputs()
    loss, metrics = policy_loss(logp, prox, prox, adv, mask, token_denominator=10, cfg=CFG)
    assert loss.item() == pytest.approx(1.587, abs=1e-5)
    loss.backward()
    # d(-A r)/d logp = -A r where unclipped, 0 where a clip bites; / 10
    assert_close(logp.grad, torch.tensor([[-1.1, 0, -0.5, 0.9, 0, 1.5, 0, 6.0, -1.25, 0]]) / 10, atol=1e-6)
    assert metrics["loss/clip_fraction/high"].item() == pytest.approx(1 / 10)  # token 1
    assert metrics["loss/clip_fraction/low"].item() == pytest.approx(2 / 10)   # tokens 4, 9
    assert metrics["loss/dual_clip_fraction"].item() == pytest.approx(1 / 10)  # token 6
    assert metrics["loss/policy"].item() == pytest.approx(1.587, abs=1e-5)


def test_dual_clip_off():
    # c = 0: token 6 keeps 12 -> sum 17.87 / 10 = 1.787, and its gradient -A r = 12 / 10
    logp, prox, adv, mask = _table_inputs()
    loss, metrics = policy_loss(logp, prox, prox, adv, mask, token_denominator=10, cfg=replace(CFG, dual_clip_c=0.0))
    assert loss.item() == pytest.approx(1.787, abs=1e-5)
    loss.backward()
    assert logp.grad[0, 6].item() == pytest.approx(12 / 10, abs=1e-5)
    assert metrics["loss/dual_clip_fraction"].item() == 0.0


def test_fully_masked_row_contributes_nothing():
    # row 1 is padding with wild (finite) values: loss and gradient equal those of row 0 alone
    logp, prox, adv, mask = _table_inputs()
    logp = torch.cat([logp.detach(), torch.full((1, 10), 30.0)]).requires_grad_()
    prox, adv = torch.cat([prox, torch.full((1, 10), -30.0)]), torch.cat([adv, torch.full((1, 10), 1e3)])
    mask = torch.cat([mask, torch.zeros(1, 10, dtype=torch.bool)])
    loss, metrics = policy_loss(logp, prox, prox, adv, mask, token_denominator=10,
                                cfg=replace(CFG, is_mode="truncate"))
    assert loss.item() == pytest.approx(1.587, abs=1e-5)
    loss.backward()
    assert logp.grad[1].abs().max().item() == 0.0
    assert metrics["loss/valid_tokens"].item() == 10


def test_seq_mean_token_mean():
    # row 0 valid tokens 0 and 2 of TABLE: (-1.1 - 0.5) / 2 = -0.8; row 1 valid token 3: 0.9
    # (sum of per-sequence means) / seq_denominator 2 = (-0.8 + 0.9) / 2 = 0.05
    logp, prox, adv, _ = _table_inputs()
    logp, prox, adv = (torch.cat([x.detach(), x.detach()]) for x in (logp, prox, adv))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [0, 2]] = True
    mask[1, 3] = True
    cfg = replace(CFG, loss_aggregation="seq-mean-token-mean")
    loss, _ = policy_loss(logp, prox, prox, adv, mask, token_denominator=3, seq_denominator=2, cfg=cfg)
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    with pytest.raises(ValueError):
        policy_loss(logp, prox, prox, adv, mask, token_denominator=3, cfg=cfg)


def test_kl_and_entropy_terms():
    # one token, A = 0 so only the extra terms count.  log mu - log pi = -0.5:
    # k3 = e^-0.5 + 0.5 - 1 = 0.10653; kl_coef 0.1 -> +0.010653; entropy 2, coef 0.01 -> -0.02
    logp = torch.tensor([[-1.0]], requires_grad=True)
    behav = torch.tensor([[-1.5]])
    entropy = torch.tensor([[2.0]], requires_grad=True)
    cfg = replace(CFG, kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = policy_loss(logp, logp.detach(), behav, torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                                token_denominator=1, cfg=cfg, entropy=entropy)
    assert loss.item() == pytest.approx(0.010653 - 0.02, abs=1e-6)
    assert metrics["loss/kl_behav/token_mean"].item() == pytest.approx(0.10653, abs=1e-5)
    loss.backward()
    assert entropy.grad.item() == pytest.approx(-0.01)
    # d k3 / d logp = -(e^d - 1) = 1 - e^-0.5 = 0.39347, times 0.1
    assert logp.grad.item() == pytest.approx(0.039347, abs=1e-6)
    with pytest.raises(ValueError):
        policy_loss(logp, logp.detach(), behav, torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                    token_denominator=1, cfg=cfg)


# ---- importance weights --------------------------------------------------------------------------------------------

def test_importance_weights_truncate_mask_none():
    # rho = pi_prox / mu = 1, 3, 0.25, 1.5; cap 2 (mask keeps [0.5, 2])
    behav = torch.zeros(1, 4)
    prox = torch.tensor([[1.0, 3.0, 0.25, 1.5]]).log()
    mask = torch.ones(1, 4, dtype=torch.bool)
    w, m = importance_weights(prox, behav, mask, mode="truncate", cap=2.0)
    assert_close(w, torch.tensor([[1.0, 2.0, 0.25, 1.5]]))  # 3 -> 2
    assert m["loss/is_truncated_fraction"].item() == pytest.approx(0.25)
    assert m["loss/is_weight/max"].item() == pytest.approx(2.0)
    assert m["loss/is_ratio/max"].item() == pytest.approx(3.0)
    # KL(pi_prox || mu) ~ mean of rho ln rho - rho + 1 = (0 + 1.29584 + 0.40343 + 0.10820) / 4 = 0.45187
    assert m["loss/is_kl_prox_behav/token_mean"].item() == pytest.approx(0.45187, abs=1e-4)
    w, m = importance_weights(prox, behav, mask, mode="mask", cap=2.0)
    assert_close(w, torch.tensor([[1.0, 0.0, 0.0, 1.5]]))  # 3 > 2 and 0.25 < 0.5 dropped
    assert m["loss/is_masked_fraction"].item() == pytest.approx(0.5)
    w, _ = importance_weights(prox, behav, mask, mode="none", cap=2.0)
    assert_close(w, torch.ones(1, 4))


def test_importance_log_ratio_clamped():
    # prox - behav = 50 is clamped to 20: rho = e^20 = 4.85e8, truncated to 2, never inf
    w, m = importance_weights(torch.tensor([[50.0]]), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                              mode="truncate", cap=2.0)
    assert w.item() == 2.0
    assert m["loss/is_ratio/max"].item() == pytest.approx(math.exp(20), rel=1e-5)


def test_truncated_weight_scales_the_loss():
    # token 0 of TABLE (A=1, r=1.1) with rho = 3 -> w = 2: loss -1.1 * 2 = -2.2
    logp, prox, adv, mask = _table_inputs()
    behav = prox - math.log(3.0)
    loss, _ = policy_loss(logp[:, :1], prox[:, :1], behav[:, :1], adv[:, :1], mask[:, :1], token_denominator=1,
                          cfg=replace(CFG, is_mode="truncate"))
    assert loss.item() == pytest.approx(-2.2, abs=1e-5)


# ---- invariance to the micro-batch split -------------------------------------------------------------------------

def _step_gradient(model, hidden, tokens, behav, adv, mask, cfg, splits, seq_denominator=None):
    """Summed gradient of one optimizer step, micro-batch by micro-batch, with step-wide denominators and scope."""
    model.zero_grad()
    token_denominator = mask.sum().item()
    with torch.no_grad():
        stats = []
        for rows in splits:  # no-grad pre-pass: the modulation scope is the whole mini-batch
            logp, entropy, expect = token_logprob_entropy(model(hidden[rows]), tokens[rows])
            stats.append(config_scope_stats(adv[rows], torch.ones_like(logp), logp, entropy, expect, mask[rows], cfg))
        stats = merge_scope_stats(stats)
    for rows in splits:
        logp, entropy, expect = token_logprob_entropy(model(hidden[rows]), tokens[rows], chunk_size=5)
        prox = logp.detach()  # one optimizer step per batch: pi_prox = current weights
        final, _ = modulate_advantages(adv[rows], (logp - prox).exp(), logp, entropy, expect, mask[rows], cfg,
                                       stats=stats)
        loss, _ = policy_loss(logp, prox, behav[rows], final, mask[rows], token_denominator=token_denominator,
                              cfg=cfg, seq_denominator=seq_denominator)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_gradient_invariant_to_micro_batch_split(aggregation):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7).double()
    hidden = torch.randn(8, 6, 5, dtype=torch.float64)
    tokens = torch.randint(0, 7, (8, 6))
    lengths = torch.tensor([6, 1, 4, 0, 5, 2, 6, 3])  # row 3 is fully masked
    mask = torch.arange(6)[None, :] < lengths[:, None]
    adv = torch.randn(8, 1, dtype=torch.float64).expand(8, 6)
    with torch.no_grad():
        behav = token_logprob_entropy(model(hidden), tokens)[0] + 0.3 * torch.randn(8, 6, dtype=torch.float64)
    cfg = AlgorithmConfig(loss_aggregation=aggregation)
    whole = [slice(0, 8)]
    quarters = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    one_by_eight = _step_gradient(model, hidden, tokens, behav, adv, mask, cfg, whole, seq_denominator=8)
    four_by_two = _step_gradient(model, hidden, tokens, behav, adv, mask, cfg, quarters, seq_denominator=8)
    assert one_by_eight.abs().max().item() > 1e-3  # the comparison is not between two zeros
    assert_close(four_by_two, one_by_eight, atol=1e-6)
    # the usual bug, a per-micro-batch mean, breaks the invariance (so the test above can fail)
    if aggregation == "token-mean":
        model.zero_grad()
        for rows in quarters:
            logp = token_logprob_entropy(model(hidden[rows]), tokens[rows])[0]
            local_denominator = max(mask[rows].sum().item(), 1)
            loss, _ = policy_loss(logp, logp.detach(), behav[rows], adv[rows], mask[rows],
                                  token_denominator=local_denominator, cfg=cfg)
            loss.backward()
        naive = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert not torch.allclose(naive, one_by_eight, rtol=0, atol=1e-4)


# ---- advantages -> modulation -> loss ----------------------------------------------------------------------------

def test_two_group_example_end_to_end():
    # advantages: group 1 rewards 1,-1,-1,-1 -> A = 1.5,-.5,-.5,-.5; group 2 rewards 1,-1,1,1 -> .5,-1.5,.5,.5
    adv, _ = group_advantages(torch.tensor([1.0, -1, -1, -1, 1, -1, 1, 1]), [4, 4])
    adv = adv[:, None]  # [8, 1]: one response token each
    # entropies H = 2,1,1,1,0,1,1,2 -> H_min 0, H_max 2; beta_comp = 1 + .2 (2 - H)/2 for A > 0:
    #   row 0: 1.0, row 4: 1.2, row 6: 1.1, row 7: 1.0, A < 0 rows: 1
    entropy = torch.tensor([[2.0], [1], [1], [1], [0], [1], [1], [2]])
    # on-policy (r = 1, w = 1); choose d = pi_a Lambda_a - E = 1, .1, .1, .1, 2.4, -.95, .1, .1
    #   Xi = |A d| = 1.5, .05, .05, .05, 1.2, 1.425, .05, .05 -> x = Xi / 1.5 = 1, .033, .., .8, .95, ..
    #   beta_stab = .75102 (row 0), .99997 (row 4), .95232 (row 5), 1 elsewhere
    logp = torch.full((8, 1), math.log(0.5), requires_grad=True)
    d = torch.tensor([[1.0], [0.1], [0.1], [0.1], [2.4], [-0.95], [0.1], [0.1]])
    expect = logp.detach().exp() * (logp.detach() + entropy) - d
    mask = torch.ones(8, 1, dtype=torch.bool)
    cfg = AlgorithmConfig()
    final, metrics = modulate_advantages(adv, torch.ones(8, 1), logp.detach(), entropy, expect, mask, cfg)
    # A_final = 1.5*.75102, -.5, -.5, -.5, .5*1.2*.99997, -1.5*.95232, .5*1.1, .5
    #         = 1.12653, -.5, -.5, -.5, .59998, -1.42848, .55, .5
    want = torch.tensor([[1.12653], [-0.5], [-0.5], [-0.5], [0.59998], [-1.42848], [0.55], [0.5]])
    assert_close(final, want, atol=2e-5)
    assert metrics["modulation/damped_fraction"].item() == pytest.approx(2 / 8)  # rows 0 and 5
    # loss = -sum(A_final) / 8 = -(2.77651 - 2.92848) / 8 = 0.018996; d loss / d logp = -A_final / 8
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), final, mask, token_denominator=8, cfg=cfg)
    assert loss.item() == pytest.approx(0.018996, abs=2e-5)
    loss.backward()
    assert_close(logp.grad, -want / 8, atol=3e-6)
