"""Generation throughput: HFEngine (with behaviour log-probs) beside plain `model.generate` on the same inputs.

Both sample at temperature 1 with no top-k/top-p and no stop token, so each produces exactly batch x
max_new_tokens tokens, from the same chat-templated arithmetic prompts, in the same process, alternating which goes
first. HFEngine additionally returns per-token log-probs and versions. Reports tokens/s (median of --repeats)
and the ratio engine / generate (target >= 0.9). `--samples-per-prompt k` makes each batch batch/k prompts with k
samples each, as an actor generates a group: the engine prefills each prompt once, `model.generate` gets each
prompt's row k times.

    .venv/bin/python bench/generation.py [--model smollm2] [--dtype bfloat16] [--batches 1 16 64]
                                         [--max-new-tokens 32] [--repeats 3] [--threads 0] [--samples-per-prompt 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from actor.engines.base import SamplingParams  # noqa: E402
from actor.engines.hf import HFEngine  # noqa: E402
from common.config import TaskConfig  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.tasks import encode_prompt, load_prompts  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    task = TaskConfig(size=max(batch, 1), eval_size=0)
    return [encode_prompt(tokenizer, p.question, task) for p in load_prompts(task, "train")[:batch]]


def time_engine(engine: HFEngine, prompts: list[list[int]], new_tokens: int, seed: int, samples: int = 1) -> float:
    """Tokens/s of `samples` samples of each of `prompts`."""
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, stop_token_ids=(), seed=seed)
    start = time.perf_counter()
    out = engine.generate(prompts, [samples] * len(prompts), sampling)
    elapsed = time.perf_counter() - start
    assert all(len(s.token_ids) == new_tokens for group in out for s in group)
    return len(prompts) * samples * new_tokens / elapsed


def time_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, seed: int) -> float:
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="k samples of each of batch/k prompts")
    args = parser.parse_args()
    k = args.samples_per_prompt
    if k < 1 or any(batch % k for batch in args.batches):
        parser.error(f"--samples-per-prompt {k}: must be >= 1 and divide every --batches size")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=DTYPES[args.dtype], device="cpu")
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, max_batch_sequences=max(args.batches))
    print(f"model {args.model} dtype {args.dtype} torch {torch.__version__} threads {torch.get_num_threads()} "
          f"cpu {platform.processor() or platform.machine()} cores {os.cpu_count()} load {os.getloadavg()[0]:.2f}")
    rows = []
    for batch in args.batches:
        prompts = prompts_for(tokenizer, batch // k)
        rows_k = [p for p in prompts for _ in range(k)]  # model.generate: each prompt's row k times
        time_engine(engine, prompts, 4, seed=0, samples=k)  # warm-up: allocator, kernels
        time_generate(model, rows_k, 4, tokenizer.pad_token_id, seed=0)
        ours, theirs = [], []
        for rep in range(args.repeats):
            if rep % 2 == 0:
                ours.append(time_engine(engine, prompts, args.max_new_tokens, seed=rep, samples=k))
                theirs.append(time_generate(model, rows_k, args.max_new_tokens, tokenizer.pad_token_id, rep))
            else:
                theirs.append(time_generate(model, rows_k, args.max_new_tokens, tokenizer.pad_token_id, rep))
                ours.append(time_engine(engine, prompts, args.max_new_tokens, seed=rep, samples=k))
        row = {"batch": batch, "engine_tok_s": statistics.median(ours), "generate_tok_s": statistics.median(theirs)}
        row["ratio"] = row["engine_tok_s"] / row["generate_tok_s"]
        rows.append(row)
        print(f"batch {batch:3d}: HFEngine {row['engine_tok_s']:8.1f} tok/s   model.generate "
              f"{row['generate_tok_s']:8.1f} tok/s   ratio {row['ratio']:.2f}", flush=True)
    print(json.dumps({"model": args.model, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                      "samples_per_prompt": k,
                      "load_after": os.getloadavg()[0], "rows": rows}))


if __name__ == "__main__":
    main()
