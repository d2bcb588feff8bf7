"""Group advantages and ADORA weights (docs/ALGORITHM.md §2), worked by hand."""

import pytest
import torch

from learner.advantages import adora_weights, group_advantages, zero_variance_mask

pytestmark = pytest.mark.unit


def assert_close(got, want, atol=1e-6):
    """torch.allclose with a message (torch.testing.assert_close lazily imports torch.distributed: seconds)."""
    want = torch.as_tensor(want, dtype=got.dtype)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=atol), f"{got} != {want}"


def test_grpo_two_groups_by_hand():
    # group 1: rewards 1,-1,-1,-1: mean -0.5, deviations 1.5,-.5,-.5,-.5, unbiased var (2.25+3*.25)/3 = 1
    # group 2: rewards 1,-1, 1, 1: mean  0.5, deviations .5,-1.5,.5,.5, unbiased var 1
    # A = deviation / (1 + 1e-6)
    rewards = torch.tensor([1.0, -1, -1, -1, 1, -1, 1, 1])
    adv, metrics = group_advantages(rewards, [4, 4])
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, -1.5, 0.5, 0.5]) / (1 + 1e-6)
    assert_close(adv, expected, atol=5e-7)
    assert metrics["reward/zero_variance_group_fraction"].item() == 0.0


def test_grpo_pair_uses_unbiased_std():
    # rewards 1, 0: mean .5, unbiased std sqrt((.25+.25)/1) = 0.70711 -> A = +-0.5/0.70711 = +-0.70711
    # (the biased std 0.5 would give +-1)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0]), [2])
    assert_close(adv, torch.tensor([0.70710678, -0.70710678]), atol=2e-6)


def test_dr_grpo_only_centres():
    # rewards 1,0,0,0: mean .25 -> A = .75, -.25, -.25, -.25 (no division by std 0.5)
    adv, _ = group_advantages(torch.tensor([1.0, 0, 0, 0]), [4], std_normalize=False)
    assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


@pytest.mark.parametrize("std_normalize", [True, False])
def test_singleton_and_all_equal_groups_get_zero(std_normalize):
    # [3.0] alone: no baseline -> 0 (not 3, not nan); [1,1,1]: no signal -> 0; [0,2,4]: mean 2, std 2 -> -1,0,1
    rewards = torch.tensor([3.0, 1, 1, 1, 0, 2, 4])
    adv, metrics = group_advantages(rewards, [1, 3, 3], std_normalize=std_normalize)
    scale = 1 / (2 + 1e-6) if std_normalize else 1.0
    expected = torch.tensor([0.0, 0, 0, 0, -2 * scale, 0, 2 * scale])
    assert_close(adv, expected, atol=5e-7)
    assert torch.isfinite(adv).all()
    # zero-variance groups: [3.0] and [1,1,1] -> 2 of 3
    assert metrics["reward/zero_variance_group_fraction"].item() == pytest.approx(2 / 3)
    assert metrics["reward/singleton_group_fraction"].item() == pytest.approx(1 / 3)


def test_zero_variance_mask_is_exact():
    # 0.1 three times has a float mean that is not exactly 0.1, but max == min still flags it
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1])
    mask = zero_variance_mask(rewards, [2, 1, 2, 3])
    assert mask.tolist() == [True, True, False, True]


def test_group_sizes_are_checked():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), [2, 2])
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2), [2, 0])


def test_adora_weights_by_hand():
    # truncation_length 30, lam 0.1.  P = correct, N = incorrect with length < 30.
    # g0: P lens 10,30; N lens 20,25 (mean 22.5): max P 30 > 22.5 -> advantageous -> 1
    # g1: P 10; N 20 (the 30-token incorrect one is truncated): 10 > 20 false -> 0.1
    # g2: no correct response -> 0.1
    # g3: all correct, N empty -> 1
    # g4: P 12; only incorrect one is truncated -> N empty -> 1
    # g5: P 20; N 15,25 (mean 20): 20 > 20 is false (strict) -> 0.1
    correct = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    lengths = torch.tensor([10, 30, 20, 25, 10, 20, 30, 5, 7, 3, 4, 12, 30, 20, 15, 25])
    weights, metrics = adora_weights(correct, lengths, [4, 3, 2, 2, 2, 3], truncation_length=30, lam=0.1)
    expected = torch.tensor([1.0] * 4 + [0.1] * 3 + [0.1] * 2 + [1.0] * 2 + [1.0] * 2 + [0.1] * 3)
    assert_close(weights, expected)
    assert metrics["reward/adora_advantageous_fraction"].item() == pytest.approx(3 / 6)


def test_adora_weight_is_constant_within_group():
    correct = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    lengths = torch.tensor([5, 3, 9, 2])
    # max P = 5, mean N = 6 -> not advantageous -> all four get lam (0.25), including the correct ones
    weights, _ = adora_weights(correct, lengths, [4], truncation_length=100, lam=0.25)
    assert weights.tolist() == [0.25] * 4
    with pytest.raises(ValueError):
        adora_weights(correct, lengths, [4], truncation_length=0, lam=0.25)
