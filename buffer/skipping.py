"""Pre-rollout prompt skipping (ALGORITHM §8): decide, when a wave is formed, which prompts are worth generating.

A prompt whose last z groups all had zero reward variance (all correct or all wrong) will probably teach nothing
the next time either, so it enters a wave only with probability

    q = p_explore ** max(0, z - s)

where s counts the times it was skipped since its last rollout: every skip forgives one zero-variance group, so a
prompt is skipped at most z times in a row before it is rolled out again, and one that has become informative
comes back. p_explore adapts per generated group, p <- clip(p + step * (informative - target), [p_min, p_max]):
too few informative groups lower it (skip more), a yield above the target raises it (skip less).

The random draw is a hash of (seed, epoch, prompt id), so decisions are the same after a restart from a snapshot
and need no generator state. Pure functions and one small persisted struct; `buffer/state.py` applies them.
"""

from __future__ import annotations

import hashlib
import struct

import msgspec


class SkipController(msgspec.Struct, kw_only=True):
    """Adaptive skipping state of the whole pool (part of the buffer snapshot)."""

    p_explore: float
    """Chance that a prompt after one zero-variance group is rolled out anyway."""
    epoch_kept: int = 0
    """Prompts of the current epoch that entered a wave; 0 at the epoch's end means every prompt was skipped."""


def explore_probability(p_explore: float, zero_variance_streak: int, skips_in_row: int) -> float:
    """q = p_explore ** max(0, z - s): the chance that the prompt enters the wave it is considered for."""
    exponent = max(0, zero_variance_streak - skips_in_row)
    return 1.0 if exponent == 0 else p_explore ** exponent


def decision_draw(seed: int, epoch: int, prompt_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, epoch, prompt id): each prompt is considered once per epoch."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{prompt_id}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] / 2.0**64


def updated_explore(p_explore: float, informative: bool, target: float, step: float, p_min: float,
                    p_max: float) -> float:
    """One controller step after a generated group: p + step * (informative - target), clipped to the bounds."""
    return min(p_max, max(p_min, p_explore + step * (float(informative) - target)))
