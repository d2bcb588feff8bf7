"""Held-out evaluation of a model in this process: pass@1 (greedy) and pass@k (sampled), with transformers' `generate`.

Training runs evaluate on the actors' engines instead, coordinated by the buffer (buffer/evaluation.py), so
training never stops for it. This module serves offline use: `learner/evaluate_suite.py` (a checkpoint or an
exported model on a benchmark suite) and the check that an actor-served evaluation gives the same greedy results
(tests/test_eval_actor.py). A response is every generated token before the first end-of-sequence token, the same
tokens the HF engine returns before its stop token.
"""

from __future__ import annotations

import time
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


def evaluate(model: Any, tokenizer: Any, prompts: Sequence[Prompt], cfg: Config) -> dict[str, float]:
    """eval/pass@1 (greedy), eval/pass@k and eval/mean_reward@k (k = run.eval_samples, sampled at
    actor.temperature), eval/response_tokens, time/eval_s."""
    if not prompts:
        return {}
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    ids = [encode_prompt(tokenizer, p.question, cfg.task) for p in prompts]
    k = cfg.run.eval_samples
    batch = max(1, cfg.actor.max_batch_sequences // k)
    common = dict(max_new_tokens=cfg.actor.max_new_tokens, temperature=cfg.actor.temperature)
    greedy = generate_batched(model, tokenizer, ids, do_sample=False, num_return_sequences=1,
                              batch_size=cfg.actor.max_batch_sequences, **common)
    sampled = generate_batched(model, tokenizer, ids, do_sample=True, num_return_sequences=k, batch_size=batch,
                               **common)
    if was_training:
        model.train()
    pass1 = [score_response(p, tokenizer.decode(r), cfg.task)[1] for p, r in zip(prompts, greedy)]
    rewards, any_correct = [], []
    for i, p in enumerate(prompts):
        scores = [score_response(p, tokenizer.decode(r), cfg.task) for r in sampled[i * k : (i + 1) * k]]
        rewards.extend(s[0] for s in scores)
        any_correct.append(any(s[1] for s in scores))
    return {
        "eval/pass@1": sum(pass1) / len(pass1),
        f"eval/pass@{k}": sum(any_correct) / len(any_correct),
        f"eval/mean_reward@{k}": sum(rewards) / len(rewards),
        "eval/response_tokens/mean": sum(len(r) for r in greedy) / len(greedy),
        "time/eval_s": time.perf_counter() - start,
    }
