"""A plain synchronous GRPO loop in one process: the reference point for the default run's accuracy.

    python bench/sync_grpo.py --seed 0                 # 25 steps of 8 prompts x 8 samples, ~9 min on 2 cores
    python bench/sync_grpo.py --steps 2 --prompts 2 --samples 2 --eval-size 16    # a smoke run

No buffer, actor, learner process, allocation, staleness, importance correction or modulation: each step draws
`--prompts` training prompts of the cpu-demo task (uniformly, seeded), samples `--samples` responses to each with
transformers' `generate` (temperature 1, top-p 1, no top-k, `--max-new-tokens`), scores them with the task's
scorer, standardises rewards within each group ((r - mean) / std; groups whose samples all score the same carry no
signal and are left out), and takes one AdamW step (`--lr`, no weight decay, gradient norm clipped to 1) on
-sum(advantage x log pi(token)) / (response tokens). One update per batch means the sampling policy is the
updated one, so there is no ratio to clip. Float32 weights; `--dtype bfloat16` runs generation and the forward and
backward under bfloat16 autocast.

Before the first and after the last step it prints greedy pass@1 on the run's 64 held-out prompts (the set
`python run_async.py` evaluates on) and, with `--wide-size N`, on N held-out prompts (learner.evaluate_heldout's
set: the 64 first, none trained on). `--out` writes the numbers and per-step rewards and times as JSON.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import PRESETS, with_overrides  # noqa: E402 (after the path)
from common.models import load_model, load_tokenizer  # noqa: E402
from common.tasks import encode_prompt, load_prompts, score_response  # noqa: E402
from learner.evaluate import aggregate, generate_batched, score_prompts  # noqa: E402
from learner.evaluate_heldout import wide_held_out  # noqa: E402
from learner.evaluate_suite import write_results  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-size", type=int, default=64, help="the run's held-out prompts (cpu-demo: 64)")
    parser.add_argument("--wide-size", type=int, default=0, help="also evaluate on this many held-out prompts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("steps", "prompts", "samples", "max_new_tokens", "threads", "eval_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def response_logprobs(model, prompt_ids: list[int], responses: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """log pi of each response's tokens after `prompt_ids` (one right-padded forward for the group)."""
    seqs = [prompt_ids + r for r in responses]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i, : len(r)].gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1) for i, r in enumerate(responses)]


def held_out_pass1(model, tokenizer, prompts, cfg, autocast) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return aggregate(score_prompts(model, tokenizer, prompts, cfg, 0), 0)["pass@1"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = with_overrides(PRESETS["cpu-demo"](), actor={"max_new_tokens": args.max_new_tokens},
                         task={"eval_size": args.eval_size})
    tokenizer, model = load_tokenizer(cfg.run.model), load_model(cfg.run.model, dtype=torch.float32, device="cpu")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, run_set = load_prompts(cfg.task, "train"), load_prompts(cfg.task, "eval")
    wide = wide_held_out(cfg.task, args.wide_size) if args.wide_size else []
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    autocast = args.dtype == "bfloat16"
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": []}

    def evaluate(when: str) -> None:
        out[f"pass@1_{when}"] = held_out_pass1(model, tokenizer, run_set, cfg, autocast)
        line = f"sync_grpo: {when}: held-out pass@1 {out[f'pass@1_{when}']:.4f} ({len(run_set)} prompts)"
        if wide:
            out[f"wide_pass@1_{when}"] = held_out_pass1(model, tokenizer, wide, cfg, autocast)
            line += f", {out[f'wide_pass@1_{when}']:.4f} ({len(wide)} prompts)"
        print(line, flush=True)

    start = time.perf_counter()
    evaluate("start")
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        batch = [train[rng.randrange(len(train))] for _ in range(args.prompts)]
        ids = [encode_prompt(tokenizer, p.question, cfg.task) for p in batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            responses = generate_batched(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, do_sample=True,
                                         num_return_sequences=args.samples, temperature=1.0,
                                         batch_size=max(1, 64 // args.samples))
        model.train()
        terms, tokens, rewards = [], 0, []
        for i, (prompt, prompt_ids) in enumerate(zip(batch, ids)):
            group = [r if r else [tokenizer.eos_token_id] for r in responses[i * args.samples:(i + 1) * args.samples]]
            r = torch.tensor([score_response(prompt, tokenizer.decode(g), cfg.task)[0] for g in group])
            rewards.extend(r.tolist())
            if r.std() == 0:
                continue
            advantages = (r - r.mean()) / r.std()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logps = response_logprobs(model, prompt_ids, group, pad_id)
            terms.extend(a * lp.sum() for a, lp in zip(advantages.tolist(), logps))
            tokens += sum(len(g) for g in group)
        if terms:
            loss = -torch.stack(terms).sum() / tokens
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        model.eval()
        record = {"step": step, "reward": sum(rewards) / len(rewards), "groups_trained": len(terms) // args.samples,
                  "seconds": time.perf_counter() - t0}
        out["steps"].append(record)
        print(f"sync_grpo: step {step}/{args.steps} reward {record['reward']:.3f} groups {record['groups_trained']} "
              f"({record['seconds']:.1f} s)", flush=True)
    evaluate("end")
    out["seconds"] = time.perf_counter() - start
    print(f"sync_grpo: {out['seconds']:.0f} s", flush=True)
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
