"""Loss-head memory benchmark: peak extra memory and time of the learner's loss head, chunked vs unchunked.

    python -m bench.learner_memory [--hidden 896] [--vocab 49152 151936] [--tokens 4096 32768] [--chunk 1024]
        [--measure-hidden 128] [--measure-tokens 2048 8192] [--rss-limit-gb 8] [--repeats 1]

The head is the part of a learner step after the base model: response hidden states [N, H] -> log pi(token),
entropy and E_pi[pi * Lambda] at temperature 0.7 -> backward of sum(log pi) into the hidden states and the head
weight. "Unchunked" is `token_logprob_entropy(lm_head(hidden) / T)` (the [N, V] logits exist), "chunked" is
`learner.loss_head.head_token_outputs` with --chunk tokens per chunk. Extra memory = peak minus what was live
before the head (hidden states, weight, token ids); it includes both gradient outputs. Two parts, one run:

1. Accounted, at the target sizes (--hidden, --vocab, --tokens), float32: forward + backward run on the meta
   device under `TensorBytes`, a dispatch mode that adds up the bytes of every live tensor storage. Exact for
   tensors (not for scratch space inside a kernel), no compute, so every cell fits. The last column leaves out
   the [N, H] hidden-state gradient, the one output of the head that must grow with the tokens.
2. Measured on this machine's CPU at --measure-hidden and --measure-tokens (the vocabulary-sized buffers do not
   depend on the hidden size): each cell in a fresh subprocess; peak RSS (ru_maxrss) above the RSS just before
   the head, from the first pass, and the median wall time of --repeats further passes. A cell whose accounted
   peak exceeds --rss-limit-gb is skipped, so as not to push a shared machine into swap or the OOM killer.

Prints two Markdown tables.
The sharded learner (`--fsdp`, bench/fsdp_memory.py): the SmolLM2-135M learner step on 2 gloo ranks, replicated vs
FSDP2: per rank, the float32 parameter, gradient and AdamW bytes held, the peak resident memory and the step time.

    python -m bench.learner_memory --fsdp [--fsdp-model smollm2] [--fsdp-steps 2] [--fsdp-groups 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = 0.7


class TensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active (meta tensors included).

    Each storage is counted when an op that allocates (one whose schema does not alias its result to an input)
    returns a tensor on it, and uncounted when it is freed (a finalizer on the storage object, which lives as long
    as the storage does). Views and in-place results add nothing; scratch space an op frees before returning is
    not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out  # a view or an in-place result: storage that already existed
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def head_inputs(tokens: int, hidden: int, vocab: int,
                device: str) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    """(hidden states [1, N, H] with grad, bias-free LM head [V, H], token ids [1, N]), float32."""
    gen_device = "cpu" if device == "meta" else device
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    if device != "meta":
        with torch.no_grad():
            head.weight.normal_(0, hidden ** -0.5)
    states = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    ids = torch.randint(0, vocab, (1, tokens), device=gen_device).to(device)
    return states, head, ids


def run_head(states: torch.Tensor, head: torch.nn.Linear, ids: torch.Tensor, chunk: int) -> None:
    """Forward + backward of the loss head; chunk 0 is today's unchunked path."""
    from learner.loss_head import head_token_outputs
    from learner.modulation import token_logprob_entropy
    if chunk > 0:
        logp, _, _ = head_token_outputs(states, head, ids, temperature=TEMPERATURE, chunk_tokens=chunk)
    else:
        logp, _, _ = token_logprob_entropy(head(states) / TEMPERATURE, ids)
    logp.sum().backward()


def accounted_extra_bytes(tokens: int, hidden: int, vocab: int, chunk: int) -> int:
    """Peak extra tensor bytes of one forward + backward, on the meta device."""
    states, head, ids = head_inputs(tokens, hidden, vocab, "meta")
    with TensorBytes() as counter:
        run_head(states, head, ids, chunk)
    return counter.peak


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_cell(tokens: int, hidden: int, vocab: int, chunk: int, repeats: int, threads: int) -> dict:
    """Run in a fresh process: peak RSS above the pre-head RSS (first pass) and median time of later passes."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    states, head, ids = head_inputs(tokens, hidden, vocab, "cpu")
    before = _current_rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    run_head(states, head, ids, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        states.grad, head.weight.grad = None, None
        start = time.perf_counter()
        run_head(states, head, ids, chunk)
        times.append(time.perf_counter() - start)
    return {"rss_extra": max(0, peak - max(before, peak_before)) if peak > peak_before else 0,
            "time_s": statistics.median(times) if times else float("nan")}


def _measure_in_subprocess(tokens: int, hidden: int, vocab: int, chunk: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.learner_memory", "--cell", str(tokens), str(hidden), str(vocab), str(chunk),
           "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def accounted_table(args: argparse.Namespace) -> list[str]:
    lines = [f"Accounted peak extra memory (GiB), hidden {args.hidden}, float32, chunk {args.chunk} tokens:", "",
             "| vocab | tokens | unchunked | chunked | chunked / unchunked | chunked without the hidden gradient |",
             "|---|---|---|---|---|---|"]
    for vocab in args.vocab:
        for tokens in args.tokens:
            whole = accounted_extra_bytes(tokens, args.hidden, vocab, 0)
            chunked = accounted_extra_bytes(tokens, args.hidden, vocab, args.chunk)
            working = chunked - tokens * args.hidden * 4
            lines.append(f"| {vocab} | {tokens} | {_gib(whole)} | {_gib(chunked)} | {chunked / whole:.3f} | "
                         f"{_gib(working)} |")
    return lines


def measured_table(args: argparse.Namespace) -> list[str]:
    lines = [f"Measured on CPU ({args.threads} threads), hidden {args.measure_hidden}, float32, chunk {args.chunk}: "
             "peak RSS above the pre-head RSS (GiB) and forward + backward time (s):", "",
             "| vocab | tokens | unchunked RSS | chunked RSS | unchunked s | chunked s | time ratio |",
             "|---|---|---|---|---|---|---|"]
    for vocab in args.vocab:
        for tokens in args.measure_tokens:
            cells = {}
            for chunk in (0, args.chunk):
                need = accounted_extra_bytes(tokens, args.measure_hidden, vocab, chunk)
                if need > args.rss_limit_gb * 2**30:
                    cells[chunk] = {"rss_extra": float("nan"), "time_s": float("nan"), "skipped": _gib(need)}
                    continue
                cells[chunk] = _measure_in_subprocess(tokens, args.measure_hidden, vocab, chunk, args.repeats,
                                                      args.threads)
            whole, chunked = cells[0], cells[args.chunk]
            whole_rss = f"skipped (needs {whole['skipped']})" if "skipped" in whole else _gib(whole["rss_extra"])
            lines.append(f"| {vocab} | {tokens} | {whole_rss} | {_gib(chunked['rss_extra'])} | "
                         f"{whole['time_s']:.2f} | {chunked['time_s']:.2f} | "
                         f"{chunked['time_s'] / whole['time_s']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--measure-hidden", type=int, default=128)
    parser.add_argument("--measure-tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rss-limit-gb", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fsdp", action="store_true", help="the sharded learner's memory (bench/fsdp_memory.py)")
    parser.add_argument("--fsdp-model", default="smollm2", help="--fsdp: run.model of the learner")
    parser.add_argument("--fsdp-steps", type=int, default=2, help="--fsdp: timed steps after one warm-up step")
    parser.add_argument("--fsdp-groups", type=int, default=2, help="--fsdp: groups of 4 samples per step")
    parser.add_argument("--fsdp-response-tokens", type=int, default=32, help="--fsdp: tokens per response")
    parser.add_argument("--cell", type=int, nargs=4, metavar=("TOKENS", "HIDDEN", "VOCAB", "CHUNK"),
                        help="internal: measure one cell in this process and print JSON")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure_cell(*args.cell, repeats=args.repeats, threads=args.threads)))
        return
    if args.fsdp:
        from bench.fsdp_memory import run

        print("\n".join(run(args.fsdp_model, args.fsdp_steps, args.fsdp_groups, args.fsdp_response_tokens)))
        return
    print(f"# bench.learner_memory {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}\n")
    print("\n".join(accounted_table(args)) + "\n")
    print("\n".join(measured_table(args)))


if __name__ == "__main__":
    main()
