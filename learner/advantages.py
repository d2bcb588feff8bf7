"""Group-relative advantages (docs/ALGORITHM.md §2): GRPO / Dr. GRPO baselines and ADORA group weights.

A batch holds S responses laid out group after group; `group_sizes` gives the length of each group in order
(sizes vary once the allocator hands out different n_i). Everything is vectorised with segment sums, so the cost
does not depend on how many groups there are. Metrics are detached 0-dim tensors; logging them is the only sync.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _group_index(group_sizes: Sequence[int], total: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Group id of every response and the size of every group, checked against the number of responses."""
    sizes = torch.as_tensor(list(group_sizes), dtype=torch.long, device=device)  # [G]
    if sizes.numel() == 0 or bool((sizes < 1).any()):
        raise ValueError(f"group sizes must be >= 1 and non-empty, got {list(group_sizes)}")
    if int(sizes.sum()) != total:
        raise ValueError(f"group sizes sum to {int(sizes.sum())} but there are {total} responses")
    group_id = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)  # [S]
    return group_id, sizes


def _segment_sum(values: Tensor, group_id: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group_id, values)


def zero_variance_mask(rewards: Tensor, group_sizes: Sequence[int]) -> Tensor:
    """True for each group whose rewards are all equal (a singleton too): such a group carries no learning signal.

    Compared exactly (max == min), not through a std threshold, so float noise in the mean cannot hide it.
    """
    group_id, sizes = _group_index(group_sizes, rewards.numel(), rewards.device)
    num_groups = sizes.numel()
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # [S]
    group_max = torch.full((num_groups,), -torch.inf, device=rewards.device).scatter_reduce(
        0, group_id, rewards, reduce="amax")  # [G]
    group_min = torch.full((num_groups,), torch.inf, device=rewards.device).scatter_reduce(
        0, group_id, rewards, reduce="amin")  # [G]
    return group_max == group_min


def group_advantages(rewards: Tensor, group_sizes: Sequence[int], *, std_normalize: bool = True,
                     eps: float = 1e-6) -> tuple[Tensor, dict[str, Tensor]]:
    """A_ij = (R_ij - mean_i) / (std_i + eps) with the unbiased std (GRPO), or R_ij - mean_i (Dr. GRPO).

    A singleton group has no baseline to compare against: its response is its own mean, so the centred reward is
    exactly 0 and its variance is taken as 0 (not 0/0), giving advantage 0.
    Returns the per-response advantages [S] (the caller broadcasts them over tokens) and metrics.
    """
    group_id, sizes = _group_index(group_sizes, rewards.numel(), rewards.device)
    num_groups = sizes.numel()
    rewards = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))  # [S]
    counts = sizes.to(rewards.dtype)  # [G]
    mean = _segment_sum(rewards, group_id, num_groups) / counts  # [G]
    centred = rewards - mean[group_id]  # [S]
    variance = _segment_sum(centred.square(), group_id, num_groups) / (counts - 1).clamp(min=1)  # [G]
    std = variance.sqrt()  # [G]
    advantages = centred / (std[group_id] + eps) if std_normalize else centred  # [S]
    zero_variance = zero_variance_mask(rewards, group_sizes)  # [G]
    metrics = {
        "reward/mean": rewards.mean(),
        "reward/group_std/mean": std.mean(),
        "reward/zero_variance_group_fraction": zero_variance.float().mean(),
        "reward/singleton_group_fraction": (sizes == 1).float().mean(),
        "reward/advantage_abs/mean": advantages.abs().mean(),
    }
    return advantages, metrics


def adora_weights(correct: Tensor, lengths: Tensor, group_sizes: Sequence[int], *, truncation_length: int,
                  lam: float) -> tuple[Tensor, dict[str, Tensor]]:
    """ADORA multiplier per response [S]: 1 in a temporarily advantageous group, `lam` otherwise.

    A group is advantageous iff its longest correct response is longer than the mean length of its incorrect,
    non-truncated ones: the policy still has room to reason longer on it, so it keeps full weight. A group with
    no correct response is not advantageous; one with correct but no such incorrect responses is.
    No history: each call decides from the group alone.
    """
    if truncation_length < 1:
        raise ValueError(f"truncation_length must be >= 1 (resolve 0 via Config.truncation_length), "
                         f"got {truncation_length}")
    group_id, sizes = _group_index(group_sizes, correct.numel(), correct.device)
    num_groups = sizes.numel()
    correct = correct.bool()  # [S]
    lengths = lengths.to(torch.float64)  # [S]
    negative = ~correct & (lengths < truncation_length)  # [S]
    longest_correct = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=correct.device)
    longest_correct = longest_correct.scatter_reduce(
        0, group_id, torch.where(correct, lengths, torch.full_like(lengths, -torch.inf)), reduce="amax")  # [G]
    negative_count = _segment_sum(negative.double(), group_id, num_groups)  # [G]
    negative_mean = _segment_sum(torch.where(negative, lengths, 0.0), group_id, num_groups) / negative_count.clamp(
        min=1)  # [G]
    has_correct = _segment_sum(correct.double(), group_id, num_groups) > 0  # [G]
    advantageous = has_correct & ((negative_count == 0) | (longest_correct > negative_mean))  # [G]
    group_weight = torch.where(advantageous, 1.0, lam).float()  # [G]
    metrics = {"reward/adora_advantageous_fraction": advantageous.float().mean()}
    return group_weight[group_id], metrics
