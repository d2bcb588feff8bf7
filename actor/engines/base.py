"""The narrow interface every generation engine implements (HF transformers in-process, SGLang over HTTP).

An engine turns prompt token ids into sampled responses, each with the behaviour log-probs of its sampled tokens
(at the sampling temperature, before top-p renormalisation: what SGLang returns), the policy version that produced
each token, and a finish reason. Weights are replaced with `load_weights` (HF) or through the engine's own update
path (SGLang); `policy_version` is the version of the weights currently generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol, runtime_checkable

import numpy as np

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature == 0 means greedy (log-probs then at temperature 1)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    """A fixed seed makes one generate call reproducible; None continues the engine's own random stream."""

    @classmethod
    def from_actor_config(cls, actor: Any, stop_token_ids: tuple[int, ...] = (), seed: int | None = None,
                          ) -> "SamplingParams":
        return cls(max_new_tokens=actor.max_new_tokens, temperature=actor.temperature, top_p=actor.top_p,
                   stop_token_ids=tuple(stop_token_ids), seed=seed)


@dataclass
class GeneratedSample:
    """One response: token_ids int32[T], logprobs float32[T], versions int32[T] (T includes a final stop token)."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.logprobs) != n or len(self.versions) != n:
            raise ValueError(f"GeneratedSample: token_ids/logprobs/versions lengths differ "
                             f"({n}/{len(self.logprobs)}/{len(self.versions)})")


@runtime_checkable
class Engine(Protocol):
    policy_version: int

    def generate(self, prompt_token_ids: list[list[int]], n: list[int],
                 sampling: SamplingParams) -> list[list[GeneratedSample]]:
        """n[i] samples for prompt i; result[i] holds them in order."""
        ...

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def health(self) -> bool: ...

    def close(self) -> None: ...
