"""Is the `tiny` preset's task learnable by the random tiny model? A plain synchronous GRPO loop measures it.

Uses the preset's own sizes (groups per step, rollouts per prompt n_mean, max_new_tokens, lr, steps) with the
HFEngine and on-policy REINFORCE with group-normalised advantages (token-mean). Reports held-out accuracy before
and after: greedy pass@1 and the mean reward of temperature-1 samples (less noisy on 16 prompts).

    .venv/bin/python bench/tiny_task.py                                   # the tiny preset's task
    .venv/bin/python bench/tiny_task.py --task.source reasoning_gym --task.name basic_arithmetic \\
        --task.params-json '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from actor.engines.base import SamplingParams  # noqa: E402
from actor.engines.hf import HFEngine, stop_token_ids_of  # noqa: E402
from common.config import parse_cli  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.tasks import encode_prompt, load_prompts, score_response  # noqa: E402


def evaluate(engine, tokenizer, prompts, cfg, sampling) -> tuple[float, float]:
    ids = [encode_prompt(tokenizer, p.question, cfg.task) for p in prompts]
    greedy = engine.generate(ids, [1] * len(ids), SamplingParams(**{**sampling.__dict__, "temperature": 0.0}))
    sampled = engine.generate(ids, [8] * len(ids), sampling)
    acc = sum(score_response(p, tokenizer.decode(s[0].token_ids, skip_special_tokens=True), cfg.task)[0]
              for p, s in zip(prompts, greedy)) / len(prompts)
    rewards = [score_response(p, tokenizer.decode(x.token_ids, skip_special_tokens=True), cfg.task)[0]
               for p, s in zip(prompts, sampled) for x in s]
    return acc, sum(rewards) / len(rewards)


def grpo_step(model, optimizer, prompt_ids, groups, rewards) -> None:
    """One on-policy policy-gradient step: advantage = (r - mean) / (std + eps) per group, token-mean loss."""
    losses, n_tokens = [], 0
    for ids, samples, group_rewards in zip(prompt_ids, groups, rewards):
        r = torch.tensor(group_rewards)
        adv = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
        for sample, a in zip(samples, adv):
            seq = torch.tensor([ids + sample.token_ids.tolist()])
            logits = model(seq).logits[0, len(ids) - 1:-1].float()                  # [T, V]
            logp = torch.log_softmax(logits, -1).gather(-1, seq[0, len(ids):, None]).squeeze(-1)
            losses.append(-(a * logp).sum())
            n_tokens += len(sample.token_ids)
    optimizer.zero_grad()
    (torch.stack(losses).sum() / max(n_tokens, 1)).backward()
    optimizer.step()


def main() -> None:
    cfg = parse_cli(["--preset", "tiny", *sys.argv[1:]])
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.run.model)
    model = load_model(cfg.run.model, dtype=torch.float32, device="cpu")
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, seed=0)
    sampling = SamplingParams.from_actor_config(cfg.actor, stop_token_ids_of(tokenizer, model))
    train, held_out = load_prompts(cfg.task, "train"), load_prompts(cfg.task, "eval")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, weight_decay=0.0)
    print(f"task {cfg.task.source}:{cfg.task.name}  before: greedy acc / sampled reward = "
          f"{evaluate(engine, tokenizer, held_out, cfg, sampling)}")
    rng, start = random.Random(0), time.time()
    for step in range(cfg.learner.total_steps):
        batch = rng.sample(train, cfg.learner.groups_per_step)
        ids = [encode_prompt(tokenizer, p.question, cfg.task) for p in batch]
        groups = engine.generate(ids, [cfg.algo.n_mean] * len(ids), sampling)
        rewards = [[score_response(p, tokenizer.decode(s.token_ids, skip_special_tokens=True), cfg.task)[0]
                    for s in g] for p, g in zip(batch, groups)]
        model.train()
        grpo_step(model, optimizer, ids, groups, rewards)
        model.eval()
        if (step + 1) % 10 == 0:
            mean = sum(map(sum, rewards)) / sum(map(len, rewards))
            print(f"step {step + 1}: train reward {mean:.3f}  ({time.time() - start:.0f} s)")
    print(f"after {cfg.learner.total_steps} steps: greedy acc / sampled reward = "
          f"{evaluate(engine, tokenizer, held_out, cfg, sampling)}  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
