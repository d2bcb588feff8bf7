"""The prompt record the buffer hands out: a training prompt, a held-out prompt or a suite benchmark's problem."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptRecord:
    """A prompt as the buffer hands it out in a WorkItem."""

    prompt_id: str
    question: str
    answer: str
    metadata_json: str = "{}"
    benchmark: str = ""
    """The evaluation suite benchmark it belongs to ('' for training prompts and the task's held-out split)."""
