"""Weight-sync benchmark: seconds per update of `learner.weight_sync` vs one raw broadcast of the same bytes.

    python -m bench.weight_sync [--receivers 1 2] [--repeats 3] [--bucket-mb 256] [--synthetic-mb 500]

For each payload (the embedded SmolLM2-135M-Instruct state dict in fp32 and bf16, and a synthetic ~500 MB fp32
state dict) and each receiver count, it starts that many receiver processes (`WeightReceiver`, gloo, 127.0.0.1),
times `WeightSender.broadcast` (announcement, flat buckets of --bucket-mb, receivers staging every version), then
times a raw `broadcast` of one flat uint8 tensor of the same byte count on a separate group of the same
processes. Each time is the median over --repeats after WARMUP untimed updates (steady state); the sender
measures until its last bucket is handed to gloo and complete. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2
"""Untimed updates first: the first forms the group; both fill the receive-buffer pools and the sender's two
staging buffers, whose first touch page-faults (a steady-state run reuses them)."""

RECEIVER = r"""
import json, sys, torch
from common.config import LearnerConfig
from actor.weight_receiver import WeightReceiver
from common.weight_protocol import connect_store, new_process_group
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
cfg = LearnerConfig(**args["cfg"])
template = {name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, (dtype, shape) in args["specs"].items()}
receiver = WeightReceiver(cfg, args["rank"], template, "cpu").start()
for version in range(args["updates"]):
    if receiver.wait_for_version(version, 300) is None:
        sys.exit(3)
receiver.close()
store = connect_store(args["raw_address"], 300, is_master=False)
group = new_process_group(store, "raw", args["rank"], args["world"], 300, torch.device("cpu"))
buf = torch.empty(args["nbytes"], dtype=torch.uint8)
for _ in range(args["updates"]):
    group.broadcast(buf, 0).wait()
del group, store  # destroy the gloo group before interpreter teardown
"""


def free_port() -> int:
    from common.processes import free_port as pick

    return pick()


def payloads(synthetic_mb: int) -> dict[str, dict[str, torch.Tensor]]:
    from common.models import load_model
    from common.weight_protocol import unique_named_tensors

    model = load_model("smollm2", dtype=torch.float32, device="cpu")
    fp32 = {k: v.detach() for k, v in model.state_dict().items()}
    per_tensor = 25 * 1024 * 1024 // 4  # 25 MiB fp32 tensors, about the size of large LLM matrices
    synthetic = {f"layer{i}.weight": torch.randn(per_tensor) for i in range(synthetic_mb // 25)}
    bf16 = dict(unique_named_tensors(fp32, torch.bfloat16))  # as the learner ships it to bf16 engines
    return {"smollm2-135m fp32": fp32, "smollm2-135m bf16": bf16,
            f"synthetic {synthetic_mb} MB fp32": synthetic}


def run_case(state: dict[str, torch.Tensor], receivers: int, repeats: int, bucket_mb: int) -> dict[str, float]:
    from common.config import LearnerConfig
    from common.weight_protocol import connect_store, new_process_group, unique_named_tensors
    from learner.weight_sync import WeightSender

    cfg = LearnerConfig(sync_address=f"127.0.0.1:{free_port()}", sync_timeout_s=300.0,
                        sync_control_address=f"tcp://127.0.0.1:{free_port()}", sync_bucket_mb=bucket_mb)
    named = unique_named_tensors(state)
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    raw_address = f"127.0.0.1:{free_port()}"
    raw_store = connect_store(raw_address, 300, is_master=True)
    sender = WeightSender(cfg, 1 + receivers, "cpu")
    args = {"cfg": {"sync_address": cfg.sync_address, "sync_control_address": cfg.sync_control_address,
                    "sync_timeout_s": 300.0}, "world": 1 + receivers, "updates": repeats + WARMUP, "nbytes": nbytes,
            "raw_address": raw_address,
            "specs": {n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in named}}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", RECEIVER, json.dumps({**args, "rank": r + 1})], env=env,
                              cwd=REPO) for r in range(receivers)]
    try:
        bucketed = []
        for version in range(repeats + WARMUP):
            metrics = sender.broadcast(state, version)
            assert metrics["perf/sync_ok"] == 1.0, metrics
            bucketed.append(metrics["time/sync_s"])
        sender.close()
        group = new_process_group(raw_store, "raw", 0, 1 + receivers, 300, torch.device("cpu"))
        flat = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
        raw = []
        for _ in range(repeats + WARMUP):
            start = time.perf_counter()
            group.broadcast(flat, 0).wait()
            raw.append(time.perf_counter() - start)
        for proc in procs:
            assert proc.wait(300) == 0
    finally:
        for proc in procs:
            proc.kill()
    bucketed_s, raw_s = statistics.median(bucketed[WARMUP:]), statistics.median(raw[WARMUP:])
    return {"mb": nbytes / 2**20, "bucketed_s": bucketed_s, "raw_s": raw_s, "ratio": bucketed_s / raw_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--synthetic-mb", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# weight sync, gloo on 127.0.0.1, {os.cpu_count()} CPU cores, bucket {args.bucket_mb} MB, "
          f"median of {args.repeats} after {WARMUP} warm-up updates, {datetime.date.today()}")
    print("| payload | MiB | receivers | bucketed s/update | raw flat broadcast s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, state in payloads(args.synthetic_mb).items():
        for receivers in args.receivers:
            r = run_case(state, receivers, args.repeats, args.bucket_mb)
            print(f"| {name} | {r['mb']:.0f} | {receivers} | {r['bucketed_s']:.3f} | {r['raw_s']:.3f} | "
                  f"{r['ratio']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
