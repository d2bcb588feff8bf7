"""Held-out evaluation of a model in this process: pass@1 (greedy) and pass@k (sampled), with transformers' `generate`.

Training runs evaluate on the actors' engines instead, coordinated by the buffer (buffer/evaluation.py), so
training never stops for it. This module serves offline use: `learner/evaluate_suite.py` (a checkpoint or an
exported model on a benchmark suite), `learner/evaluate_heldout.py` (a checkpoint on a wider held-out set of its
run's task) and the check that an actor-served evaluation gives the same greedy results
(tests/test_eval_actor.py). A response is every generated token before the first end-of-sequence token, the same
tokens the HF engine returns before its stop token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from common.config import Config
from common.tasks import Prompt, encode_prompt, score_response


@torch.no_grad()
def generate_batched(model: Any, tokenizer: Any, prompt_ids: list[list[int]], *, max_new_tokens: int,
                     do_sample: bool, num_return_sequences: int, temperature: float,
                     batch_size: int) -> list[list[int]]:
    """Responses (token ids, prompt removed), `num_return_sequences` consecutive ones per prompt."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding keeps every prompt's last token at the same position for decoding.
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if do_sample else \
            dict(do_sample=False)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_return_sequences=num_return_sequences, pad_token_id=pad_id,
                             eos_token_id=tokenizer.eos_token_id, **kwargs)
        for row in gen[:, width:].tolist():
            # `generate` pads a finished row after its EOS; a pad id before it is a token the model chose.
            out.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return out


@dataclass
class PromptResult:
    """One held-out prompt's greedy answer and its k sampled ones."""

    greedy_text: str
    greedy_correct: bool
    greedy_tokens: int
    sampled_rewards: list[float]
    sampled_correct: list[bool]


def score_prompts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], cfg: Config, k: int) -> list[PromptResult]:
    """Each prompt's greedy response and `k` responses sampled at actor.temperature (k = 0: greedy only), scored by
    the task's scorer; at most actor.max_new_tokens tokens each."""
    was_training = model.training
    model.eval()
    ids = [encode_prompt(tokenizer, p.question, cfg.task) for p in prompts]
    common = dict(max_new_tokens=cfg.actor.max_new_tokens, temperature=cfg.actor.temperature)
    greedy = generate_batched(model, tokenizer, ids, do_sample=False, num_return_sequences=1,
                              batch_size=cfg.actor.max_batch_sequences, **common)
    sampled = generate_batched(model, tokenizer, ids, do_sample=True, num_return_sequences=k,
                               batch_size=max(1, cfg.actor.max_batch_sequences // k), **common) if k else []
    if was_training:
        model.train()
    results = []
    for i, (prompt, response) in enumerate(zip(prompts, greedy)):
        scores = [score_response(prompt, tokenizer.decode(r), cfg.task) for r in sampled[i * k : (i + 1) * k]]
        text = tokenizer.decode(response)
        results.append(PromptResult(text, score_response(prompt, text, cfg.task)[1], len(response),
                                    [s[0] for s in scores], [s[1] for s in scores]))
    return results


def aggregate(results: Sequence[PromptResult], k: int) -> dict[str, float]:
    """pass@1 (greedy), response_tokens/mean (greedy) and, with k > 0 sampled answers per prompt, pass@k and
    mean_reward@k, over a non-empty list of prompt results."""
    n = len(results)
    out = {"pass@1": sum(r.greedy_correct for r in results) / n,
           "response_tokens/mean": sum(r.greedy_tokens for r in results) / n}
    if k:
        out[f"pass@{k}"] = sum(any(r.sampled_correct) for r in results) / n
        out[f"mean_reward@{k}"] = sum(sum(r.sampled_rewards) for r in results) / (n * k)
    return out


def evaluate(model: Any, tokenizer: Any, prompts: Sequence[Prompt], cfg: Config) -> dict[str, float]:
    """eval/pass@1 (greedy), eval/pass@k and eval/mean_reward@k (k = run.eval_samples, sampled at
    actor.temperature), eval/response_tokens, time/eval_s."""
    if not prompts:
        return {}
    start = time.perf_counter()
    k = cfg.run.eval_samples
    metrics = aggregate(score_prompts(model, tokenizer, prompts, cfg, k), k)
    return {**{f"eval/{key}": value for key, value in metrics.items()}, "time/eval_s": time.perf_counter() - start}
