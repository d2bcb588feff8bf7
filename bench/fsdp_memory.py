"""Sharded learner memory benchmark: the SmolLM2-135M learner step on 2 gloo ranks, replicated vs FSDP2.

    python -m bench.learner_memory --fsdp [--fsdp-model smollm2] [--fsdp-steps 2] [--fsdp-groups 2]
        [--fsdp-response-tokens 32]

For each layout (`learner.sharding` replicate, then fsdp) two rank processes are forked after the imports; each
loads the model in float32 as learner/train.py does, builds the learner state (`build_state`, FSDP2 wrapping for
fsdp) and runs one warm-up step and --fsdp-steps timed steps on the same synthetic batch (--fsdp-groups groups of
4 samples, 32-token prompts, --fsdp-response-tokens-token responses, one micro-batch per rank, 1 thread per rank).
Per rank it reports: the peak resident memory of the steps (VmHWM, reset after the warm-up), the resident memory
after the model is built, the bytes this rank holds of the float32 parameters, gradients and AdamW moments (its
shards under FSDP2, counted from the tensors), and the median step time. Prints one Markdown table.

Resident memory depends on glibc keeping freed memory: without a fixed mmap threshold the freed whole model and
step buffers stay resident in both layouts, hiding the difference. Run it with `MALLOC_MMAP_THRESHOLD_=65536` to
see what the tensors need (the learner itself trims its heap after each step instead: learner/train.py,
`return_freed_heap`).
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

WORLD = 2
GROUP_SIZE = 4
PROMPT_TOKENS = 32


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def held_bytes(state) -> dict[str, int]:
    params = list(state.model.parameters())
    moments = [v for s in state.optimizer.state.values() for k, v in s.items() if k != "step"]
    return {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
            "optimizer": _local_bytes(moments)}


def synthetic_batch(vocab: int, groups: int, response_tokens: int):
    from common.schemas import TOKEN_DTYPE, Batch, Group, ServedGroup, encode_array, make_sample

    gen = torch.Generator().manual_seed(0)
    served = []
    for g in range(groups):
        prompt = torch.randint(3, vocab, (PROMPT_TOKENS,), generator=gen).tolist()
        samples = [make_sample(torch.randint(3, vocab, (response_tokens,), generator=gen).tolist(),
                               [-1.0] * response_tokens, [0] * response_tokens, float(j % 2), j % 2 == 1, "stop")
                   for j in range(GROUP_SIZE)]
        group = Group(prompt_id=f"p{g}", prompt_tokens=encode_array(prompt, TOKEN_DTYPE), samples=samples)
        served.append(ServedGroup(group=group, staleness=0, arrival=g))
    return Batch(groups=served, policy_version=0)


def rank_run(rank: int, port: int, sharding: str, args: dict, out: Path) -> None:
    from common.config import PRESETS, with_overrides
    from common.models import load_model
    from learner.step import build_state, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    rows = args["groups"] * GROUP_SIZE
    cfg = with_overrides(PRESETS["tiny"](), run={"model": args["model"]},
                         learner={"sharding": sharding, "threads": 1, "device": "cpu", "lr": 1e-6,
                                  "groups_per_step": args["groups"],
                                  "micro_batch_tokens": (rows // WORLD) * (PROMPT_TOKENS + args["response_tokens"])})
    model = load_model(cfg.run.model, dtype=torch.float32, device="cpu")
    state = build_state(model, cfg.learner, sharded=sharding == "fsdp")
    del model
    built_rss = _status_bytes("VmRSS")
    batch = synthetic_batch(state.model.config.vocab_size, args["groups"], args["response_tokens"])
    train_step(state, batch, cfg)  # warm-up: AdamW creates its moments, the allocator settles
    _reset_peak()
    times = []
    for _ in range(args["steps"]):
        dist.barrier()
        start = time.perf_counter()
        train_step(state, batch, cfg)
        times.append(time.perf_counter() - start)
    result = {"peak_rss": _status_bytes("VmHWM"), "built_rss": built_rss, "step_s": statistics.median(times),
              **held_bytes(state)}
    (out / f"{sharding}.{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _rank_entry(rank, port, sharding, args, out, errors) -> None:
    try:
        rank_run(rank, port, sharding, args, out)
    except BaseException:
        errors.put(f"{sharding} rank {rank}: {traceback.format_exc()[-1500:]}")
        raise


def run_layout(sharding: str, args: dict, out: Path, timeout_s: float = 900) -> list[dict]:
    from common.processes import free_port

    ctx = multiprocessing.get_context("fork")
    errors, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_entry, args=(rank, port, sharding, args, out, errors)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{sharding}: rank exit codes {[p.exitcode for p in procs]}; "
                           f"{errors.get() if not errors.empty() else 'no traceback'}")
    return [json.loads((out / f"{sharding}.{rank}.json").read_text()) for rank in range(WORLD)]


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def fsdp_table(results: dict[str, list[dict]], args: dict) -> list[str]:
    lines = [f"{args['model']} learner step on {WORLD} gloo ranks (CPU, 1 thread each), {args['groups']} groups x "
             f"{GROUP_SIZE} samples of {PROMPT_TOKENS}+{args['response_tokens']} tokens, float32; per rank, MiB:", "",
             "| layout | rank | params | grads | AdamW | params+grads+AdamW | RSS after build | peak RSS in steps "
             "| step s (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for sharding, rows in results.items():
        for rank, r in enumerate(rows):
            held = r["params"] + r["grads"] + r["optimizer"]
            lines.append(f"| {sharding} | {rank} | {_mib(r['params'])} | {_mib(r['grads'])} | "
                         f"{_mib(r['optimizer'])} | {_mib(held)} | {_mib(r['built_rss'])} | {_mib(r['peak_rss'])} | "
                         f"{r['step_s']:.2f} |")
    if {"replicate", "fsdp"} <= results.keys():
        held = {k: max(r["params"] + r["grads"] + r["optimizer"] for r in v) for k, v in results.items()}
        peak = {k: max(r["peak_rss"] for r in v) for k, v in results.items()}
        step = {k: statistics.mean(r["step_s"] for r in v) for k, v in results.items()}
        lines += ["", f"fsdp / replicate: params+grads+AdamW {held['fsdp'] / held['replicate']:.2f}x, "
                      f"peak RSS {peak['fsdp'] / peak['replicate']:.2f}x, step time "
                      f"{step['fsdp'] / step['replicate']:.2f}x"]
    return lines


def run(model: str = "smollm2", steps: int = 2, groups: int = 2, response_tokens: int = 32,
        layouts: tuple[str, ...] = ("replicate", "fsdp")) -> list[str]:
    import tempfile

    args = {"model": model, "steps": steps, "groups": groups, "response_tokens": response_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        results = {sharding: run_layout(sharding, args, Path(tmp)) for sharding in layouts}
    return fsdp_table(results, args)
