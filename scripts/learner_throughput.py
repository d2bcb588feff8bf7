"""Learner step throughput of a randomly initialised model of a real architecture (no download).

    python scripts/learner_throughput.py [--device cuda] [--size 0.5b|tiny] [--steps 3] [--dtype bfloat16]
        [--groups 8] [--group-size 8] [--prompt-tokens 128] [--response-tokens 384] [--micro-batch-tokens 16384]

`--size 0.5b` builds a Qwen2 model from the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 query / 2 key-value
heads, MLP 4864, vocabulary 151936: ~494 M parameters) with `from_config`; `--size tiny` a 2-layer one of the same
family for a dry run on a CPU. One batch of random tokens with alternating rewards runs through
`learner.step.train_step` (float32 master weights, `--dtype` compute) --steps + 1 times; the first step is a
warm-up and is not timed. Prints one line: `learner_throughput ... tokens_per_s=... peak_memory_mb=...`.
"""

from __future__ import annotations

import argparse
import time

import torch

SIZES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
}


def build_model(size: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=4096, **SIZES[size])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)


def random_batch(args: argparse.Namespace, vocab: int):
    from common.schemas import TOKEN_DTYPE, Batch, Group, ServedGroup, encode_array, make_sample

    gen = torch.Generator().manual_seed(0)
    served = []
    for g in range(args.groups):
        prompt = torch.randint(1, vocab, (args.prompt_tokens,), generator=gen).tolist()
        samples = [make_sample(torch.randint(1, vocab, (args.response_tokens,), generator=gen).tolist(),
                               [-1.0] * args.response_tokens, [0] * args.response_tokens, float(j % 2), j % 2 == 1,
                               "length") for j in range(args.group_size)]
        group = Group(prompt_id=f"p{g}", prompt_tokens=encode_array(prompt, TOKEN_DTYPE), samples=samples)
        served.append(ServedGroup(group=group, staleness=0, arrival=g))
    return Batch(groups=served, policy_version=0)


def step_parser(description: str) -> argparse.ArgumentParser:
    """The model, batch and step flags the throughput scripts share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--response-tokens", type=int, default=384)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024)
    return parser


def main() -> None:
    args = step_parser(__doc__.split("\n\n")[0]).parse_args()

    from common.config import PRESETS, with_overrides
    from learner.step import build_state

    device = torch.device(args.device)
    learner = {"dtype": args.dtype, "lr": 1e-6, "groups_per_step": args.groups,
               "micro_batch_tokens": args.micro_batch_tokens}
    cfg = with_overrides(PRESETS["tiny"](), learner=learner, algo={"n_max": max(12, args.group_size)})
    try:  # the chunked loss head, where this tree has it
        cfg = with_overrides(cfg, learner={**learner, "loss_chunk_tokens": args.loss_chunk_tokens})
    except TypeError:
        pass
    model = build_model(args.size, device)
    params = sum(p.numel() for p in model.parameters())
    state = build_state(model, cfg.learner)
    tokens, elapsed, peak, _ = timed_steps(state, random_batch(args, model.config.vocab_size), cfg, args, device)
    print(f"learner_throughput size={args.size} params={params / 1e6:.0f}M device={device} dtype={args.dtype} "
          f"tokens_per_step={tokens // args.steps} step_s={elapsed / args.steps:.3f} "
          f"tokens_per_s={tokens / elapsed:.0f} peak_memory_mb={peak:.0f}", flush=True)


def timed_steps(state, batch, cfg, args: argparse.Namespace, device: torch.device) -> tuple[int, float, float, dict]:
    """One warm-up step (allocator, kernels), then args.steps timed ones: (tokens, seconds, peak MiB, last metrics)."""
    from learner.step import train_step

    train_step(state, batch, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    last = {}
    for _ in range(args.steps):
        last = train_step(state, batch, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    tokens = args.steps * args.groups * args.group_size * (args.prompt_tokens + args.response_tokens)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else last["perf/peak_memory_mb"]
    return tokens, elapsed, peak, last


if __name__ == "__main__":
    main()
