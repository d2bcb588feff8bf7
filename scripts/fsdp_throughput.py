"""FSDP2 learner step throughput on one device: the sharded learner's code path on a 1-rank mesh.

    python scripts/fsdp_throughput.py [--device cuda] [--size 0.5b|tiny] [--steps 3] [--dtype bfloat16]
        [--activation-checkpointing] [--cpu-offload] [--cpu-smoke]

Builds the randomly initialised Qwen2 model of scripts/learner_throughput.py (`--size 0.5b`: the Qwen2.5-0.5B shape,
~494 M parameters, tied LM head), starts a one-rank process group (NCCL on a GPU, gloo on the CPU), wraps it as the
learner does with `learner.sharding fsdp` (`build_state(..., sharded=True)`: fully_shard per decoder layer and on the
root, bf16 gathers over float32 master weights), and times --steps learner steps after one warm-up step on the same
random batch. `--cpu-offload` keeps the shards, gradients and AdamW state in host memory (GPU only).
`--cpu-smoke`: the tiny size on the CPU, one step, small batch (checks the path without a GPU).
Prints one line: `fsdp_throughput ... tokens_per_s=... peak_memory_mb=...`.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from learner_throughput import build_model, random_batch, step_parser, timed_steps


def parse_args() -> argparse.Namespace:
    parser = step_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, 1 step, small batch")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.device, args.size, args.steps, args.groups, args.group_size = "cpu", "tiny", 1, 2, 4
        args.prompt_tokens, args.response_tokens, args.micro_batch_tokens = 16, 16, 64
    return args


def init_one_rank(device: torch.device) -> None:
    from common.processes import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def main() -> None:
    args = parse_args()
    from common.config import PRESETS, with_overrides
    from learner.step import build_state

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device refuses a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_one_rank(device)
    learner = {"dtype": args.dtype, "lr": 1e-6, "groups_per_step": args.groups,
               "micro_batch_tokens": args.micro_batch_tokens, "loss_chunk_tokens": args.loss_chunk_tokens,
               "activation_checkpointing": args.activation_checkpointing, "cpu_offload": args.cpu_offload,
               "sharding": "fsdp", "device": str(device)}
    cfg = with_overrides(PRESETS["tiny"](), learner=learner, algo={"n_max": max(12, args.group_size)})
    model = build_model(args.size, device)
    params = sum(p.numel() for p in model.parameters())
    state = build_state(model, cfg.learner, sharded=True)
    assert state.model.get_output_embeddings().weight is state.model.get_input_embeddings().weight  # still tied
    tokens, elapsed, peak, last = timed_steps(state, random_batch(args, model.config.vocab_size), cfg, args, device)
    print(f"fsdp_throughput size={args.size} params={params / 1e6:.0f}M device={device} dtype={args.dtype} "
          f"activation_checkpointing={args.activation_checkpointing} cpu_offload={args.cpu_offload} tokens_per_step={tokens // args.steps} "
          f"step_s={elapsed / args.steps:.3f} tokens_per_s={tokens / elapsed:.0f} peak_memory_mb={peak:.0f} "
          f"grad_norm={last['optim/grad_norm']:.3g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
