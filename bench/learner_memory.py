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

The learner process as a whole (`--learner-step PRESET`, e.g. `cpu-demo`; use `--threads 1` as cpu-demo's learner
does, and set MALLOC_* variables on the command line to try glibc settings):

    python -m bench.learner_memory --learner-step cpu-demo --threads 1 [--steps 3] [--loss-chunk-tokens N]
        [--micro-batch-tokens N] [--sync-bucket-mb N] [--adamw default|for-loop|foreach|fused] [--malloc-trim]
        [--selective-checkpointing] [--activation-checkpointing] [--separate-prompts] [--account] [--no-eval]
        [--json FILE]

builds the learner as learner/train.py does (load_model float32, build_state), runs --steps train steps on synthetic
batches shaped like the preset's (groups of n_max, n_mean, n_mean, n_min samples, ~40-token prompts, responses up
to max_new_tokens), fills the weight sender's two staging buffers (the two largest buckets of its plan) and runs
the in-learner evaluation's generation; after each phase it records VmRSS and the phase's peak (VmHWM, reset
between phases through /proc/self/clear_refs). `--account` adds a step under `TensorBytes` (the bytes of the
tensors a step allocates). Prints a table and the arithmetic (weights, gradients, AdamW moments, logits, staging).
Step times are wall and CPU seconds: on a shared machine the CPU time is the one to compare.

The sharded learner (`--fsdp`, bench/fsdp_memory.py): the SmolLM2-135M learner step on 2 gloo ranks, replicated vs
FSDP2: per rank, the float32 parameter, gradient and AdamW bytes held, the peak resident memory and the step time.

    python -m bench.learner_memory --fsdp [--fsdp-model smollm2] [--fsdp-steps 2] [--fsdp-groups 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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


# ------------------------------------------------------------------------------- the learner process (--learner-step)

LEARNER_PROMPT_TOKENS = 40
"""Prompt length of the synthetic batches (cpu-demo's chat-templated arithmetic questions are ~40 tokens)."""


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM (the peak resident set) to the current RSS: Linux's clear_refs value 5."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhaseLog:
    """Resident memory after each phase of the learner's life and the peak within it (VmRSS, VmHWM)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def mark(self, phase: str, seconds: float = float("nan"), cpu_seconds: float = float("nan")) -> None:
        self.rows.append({"phase": phase, "rss": _proc_status_bytes("VmRSS"), "peak": _proc_status_bytes("VmHWM"),
                          "seconds": seconds, "cpu_seconds": cpu_seconds})
        _reset_peak_rss()


def synthetic_learner_batch(cfg, vocab: int, seed: int):
    """A batch shaped like the preset's: groups_per_step groups of sizes cycling n_max, n_mean, n_mean, n_min,
    prompts of ~40 tokens, responses of 4..max_new_tokens tokens (one per group at the limit), rewards 0/1 with
    variance in every group (nothing is dropped), behaviour log-prob -1 per token."""
    from common.schemas import TOKEN_DTYPE, Batch, Group, ServedGroup, encode_array, make_sample

    gen = torch.Generator().manual_seed(seed)
    algo, limit = cfg.algo, cfg.actor.max_new_tokens
    sizes = [(algo.n_max, algo.n_mean, algo.n_mean, algo.n_min)[g % 4] for g in range(cfg.learner.groups_per_step)]
    served = []
    for g, size in enumerate(sizes):
        prompt = torch.randint(3, vocab, (LEARNER_PROMPT_TOKENS - 2 + g % 5,), generator=gen).tolist()
        samples = []
        for j in range(size):
            length = limit if j == 0 else int(torch.randint(min(4, limit), limit + 1, (1,), generator=gen))
            tokens = torch.randint(3, vocab, (length,), generator=gen).tolist()
            samples.append(make_sample(tokens, [-1.0] * length, [0] * length, float(j % 2), j % 2 == 1,
                                       "length" if length == limit else "stop"))
        group = Group(prompt_id=f"p{g}", prompt_tokens=encode_array(prompt, TOKEN_DTYPE), samples=samples)
        served.append(ServedGroup(group=group, staleness=0, arrival=g))
    return Batch(groups=served, policy_version=0)


def staging_plan_bytes(model: torch.nn.Module, cfg) -> int:
    """Bytes of the weight sender's two reused staging buffers (the two largest buckets of its plan)."""
    from common.weight_protocol import flat_offsets, plan_buckets, unique_named_tensors

    named = unique_named_tensors(model, getattr(torch, cfg.actor.dtype))
    totals = sorted(flat_offsets(b)[1] for b in plan_buckets(named, cfg.learner.sync_bucket_mb * 2**20))
    return sum(totals[-2:])


def _malloc_trim() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _learner_setup(args: argparse.Namespace, log: PhaseLog):
    """The learner as learner/train.py builds it (float32 weights, build_state), with the bench's overrides."""
    from common.config import PRESETS, with_overrides

    overrides = {"threads": args.threads}
    if args.loss_chunk_tokens is not None:
        overrides["loss_chunk_tokens"] = args.loss_chunk_tokens
    if args.micro_batch_tokens is not None:
        overrides["micro_batch_tokens"] = args.micro_batch_tokens
    if args.sync_bucket_mb is not None:
        overrides["sync_bucket_mb"] = args.sync_bucket_mb
    if args.activation_checkpointing:
        overrides["activation_checkpointing"] = True
    if args.separate_prompts:
        overrides["shared_prompt_forward"] = False
    if args.learner_dtype:
        overrides["dtype"] = args.learner_dtype
    cfg = with_overrides(PRESETS[args.learner_step](), learner=overrides)
    torch.set_num_threads(args.threads)
    from common.models import load_model
    from learner.step import build_state

    log.mark("imports (torch, transformers, learner)")
    start = time.perf_counter()
    model = load_model(cfg.run.model, dtype=torch.float32, device="cpu")
    log.mark("model loaded (float32)", time.perf_counter() - start)
    state = build_state(model, cfg.learner)
    if args.activation_checkpointing:
        model.config.use_cache = False  # the learner's forward writes a KV cache, which a recomputed layer extends
    if args.selective_checkpointing:
        selective_checkpointing(model)
    if args.adamw != "default":
        choice = {args.adamw: True} if args.adamw != "for-loop" else {"foreach": False}
        state.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr,
                                            weight_decay=cfg.learner.weight_decay, **choice)
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 1.0)
    return cfg, state


def selective_checkpointing(model: torch.nn.Module) -> None:
    """Each decoder layer keeps its matmul and attention outputs and recomputes only the cheap elementwise ops
    (norms, rotary embedding, SiLU, products, the key/value head repeat) in backward: torch.utils.checkpoint with a
    selective policy. An experiment of this benchmark (--selective-checkpointing), not a learner setting."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from learner.sharding import decoder_layers

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    model.config.use_cache = False  # a KV cache written in forward would differ when the layer is recomputed
    for layer in decoder_layers(model):
        forward = layer.forward
        layer.forward = partial(checkpoint, forward, use_reentrant=False,
                                context_fn=partial(create_selective_checkpoint_contexts, policy))


def _learner_steps(args: argparse.Namespace, cfg, state, log: PhaseLog) -> list[tuple[float, float, float]]:
    """(wall, CPU, system CPU) seconds of each step, malloc_trim included; CPU time is the steadier one on a shared
    machine, and page faults (fresh mappings) show up in the system share."""
    from learner.step import train_step

    vocab = state.model.get_output_embeddings().weight.shape[0]
    times = []
    for step in range(args.steps):
        batch = synthetic_learner_batch(cfg, vocab, seed=step)
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        train_step(state, batch, cfg)
        del batch
        if args.malloc_trim:
            _malloc_trim()
        end = resource.getrusage(resource.RUSAGE_SELF)
        times.append((time.perf_counter() - start, end.ru_utime - usage.ru_utime + end.ru_stime - usage.ru_stime,
                      end.ru_stime - usage.ru_stime))
        log.mark(f"train step {step + 1}" + (" (AdamW state created)" if step == 0 else ""), *times[-1][:2])
    return times


def _step_tensor_peak(cfg, state) -> int:
    """Peak bytes of the tensors a step allocates (grads, activations, logits, optimizer temporaries)."""
    from learner.step import train_step

    batch = synthetic_learner_batch(cfg, state.model.get_output_embeddings().weight.shape[0], seed=99)
    with TensorBytes() as counter:
        train_step(state, batch, cfg)
    return counter.peak


def _weight_staging(cfg, state, log: PhaseLog) -> torch.Tensor:
    """Two filled staging buffers of the sender's plan (what a flat broadcast holds from its first send on)."""
    from common.weight_protocol import unique_named_tensors

    nbytes = staging_plan_bytes(state.model, cfg)
    staging = torch.empty(nbytes, dtype=torch.uint8)
    offset = 0
    for _, tensor in unique_named_tensors(state.model, getattr(torch, cfg.actor.dtype)):
        if offset >= nbytes:
            break
        raw = tensor.reshape(-1).view(torch.uint8)[:nbytes - offset]
        staging[offset:offset + raw.numel()].copy_(raw)
        offset += raw.numel()
    log.mark(f"weight sender staging ({_gib(nbytes)} GiB held)")
    return staging


def _evaluation_generate(cfg, state, log: PhaseLog) -> None:
    """The in-learner evaluation's generation: eval_size prompts, greedy then eval_samples sampled each (random
    prompt ids, so responses run to max_new_tokens: the largest KV cache)."""
    from common.models import load_tokenizer
    from learner.evaluate import generate_batched

    vocab = state.model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (LEARNER_PROMPT_TOKENS,), generator=gen).tolist()
               for _ in range(cfg.task.eval_size)]
    tok = load_tokenizer(cfg.run.model)
    k, seqs = cfg.run.eval_samples, cfg.actor.max_batch_sequences
    start = time.perf_counter()
    common = dict(max_new_tokens=cfg.actor.max_new_tokens, temperature=cfg.actor.temperature)
    generate_batched(state.model, tok, prompts, do_sample=False, num_return_sequences=1, batch_size=seqs, **common)
    generate_batched(state.model, tok, prompts, do_sample=True, num_return_sequences=k, batch_size=max(1, seqs // k),
                     **common)
    log.mark(f"evaluation generate ({len(prompts)} prompts, greedy + {k} samples)", time.perf_counter() - start)


def learner_step_memory(args: argparse.Namespace) -> dict:
    """Run the learner's phases in this process; rows of RSS/peak per phase plus the arithmetic breakdown."""
    log = PhaseLog()
    _reset_peak_rss()
    cfg, state = _learner_setup(args, log)
    times = _learner_steps(args, cfg, state, log)
    params = sum(p.numel() for p in state.model.parameters())
    logits = _learner_logits_bytes(cfg, state)
    tensor_peak = _step_tensor_peak(cfg, state) if args.account else 0
    if args.account:
        log.mark("accounted step (TensorBytes)")
    staging = _weight_staging(cfg, state, log)  # held from here on, as the sender holds it
    if args.eval:
        _evaluation_generate(cfg, state, log)
    return {"rows": log.rows, "step_s": times, "params": params, "logits_bytes": logits,
            "staging_bytes": staging.numel(),
            "step_tensor_peak": tensor_peak, "loss_chunk_tokens": cfg.learner.loss_chunk_tokens,
            "micro_batch_tokens": cfg.learner.micro_batch_tokens, "threads": args.threads, "adamw": args.adamw,
            "sync_bucket_mb": cfg.learner.sync_bucket_mb, "selective_checkpointing": args.selective_checkpointing,
            "activation_checkpointing": args.activation_checkpointing,
            "malloc_trim": args.malloc_trim, "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def _learner_logits_bytes(cfg, state) -> int:
    """float32 bytes of one [B, R, V] response-logits tensor of the largest micro-batch of the synthetic batch."""
    from learner.step import prepare_step

    prepared = prepare_step(synthetic_learner_batch(cfg, state.model.get_output_embeddings().weight.shape[0], 0), cfg)
    vocab = state.model.get_output_embeddings().weight.shape[0]
    return max(mb.targets.numel() for mbs in prepared.mini_batches for mb in mbs) * vocab * 4


def learner_step_table(result: dict) -> list[str]:
    p = result["params"]
    lines = [f"Learner process RSS by phase (GiB; peak = VmHWM within the phase), loss_chunk_tokens "
             f"{result['loss_chunk_tokens']}, micro_batch_tokens {result['micro_batch_tokens']}, AdamW "
             f"{result['adamw']}, malloc_trim {result['malloc_trim']}, sync_bucket_mb {result['sync_bucket_mb']}, "
             f"selective checkpointing {result['selective_checkpointing']}, activation checkpointing "
             f"{result['activation_checkpointing']}, env {result['env'] or '-'}, "
             f"{result['threads']} thread(s):", "", "| phase | RSS after | peak within | wall s | CPU s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {_gib(r['rss'])} | {_gib(r['peak'])} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |"
              for r in result["rows"]]
    steps = result["step_s"][1:] or result["step_s"]
    wall, cpu, system = (statistics.median(t[i] for t in steps) for i in range(3))
    lines += ["", f"Step time (median of steps after the first): wall {wall:.2f} s, CPU {cpu:.2f} s "
              f"(system {system:.2f} s)", "",
              f"Arithmetic ({p / 1e6:.1f} M parameters): weights {_gib(4 * p)}, gradients {_gib(4 * p)}, AdamW "
              f"moments {_gib(8 * p)}, one [B, R, V] float32 logits {_gib(result['logits_bytes'])}, weight staging "
              f"{_gib(result['staging_bytes'])}" + (f", tensors a step allocates (peak) "
                                                   f"{_gib(result['step_tensor_peak'])}" if result["step_tensor_peak"]
                                                   else "") + " GiB"]
    return lines


def add_learner_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learner-step", metavar="PRESET", default="",
                        help="measure the learner process's RSS by phase on this preset (e.g. cpu-demo)")
    parser.add_argument("--steps", type=int, default=3, help="--learner-step: train steps")
    parser.add_argument("--learner-dtype", choices=["float32", "bfloat16"], default="",
                        help="--learner-step: override the preset's learner.dtype (compute dtype)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None, help="--learner-step: override the preset's")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="--learner-step: override the preset's")
    parser.add_argument("--adamw", choices=("default", "for-loop", "foreach", "fused"), default="default",
                        help="--learner-step: AdamW implementation (default: what build_state makes)")
    parser.add_argument("--malloc-trim", action="store_true", help="--learner-step: malloc_trim(0) after each step")
    parser.add_argument("--sync-bucket-mb", type=int, default=None, help="--learner-step: override the preset's")
    parser.add_argument("--selective-checkpointing", action="store_true",
                        help="--learner-step: decoder layers recompute their elementwise ops in backward")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="--learner-step: learner.activation_checkpointing (whole decoder layers recomputed)")
    parser.add_argument("--separate-prompts", action="store_true",
                        help="--learner-step: learner.shared_prompt_forward off (every prompt + response separately)")
    parser.add_argument("--account", action="store_true",
                        help="--learner-step: one more step under TensorBytes (the tensor bytes it allocates)")
    parser.add_argument("--no-eval", dest="eval", action="store_false",
                        help="--learner-step: skip the evaluation's generate phase")
    parser.add_argument("--json", default="", help="--learner-step: also write the result to this file")


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
    add_learner_step_arguments(parser)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure_cell(*args.cell, repeats=args.repeats, threads=args.threads)))
        return
    if args.fsdp:
        from bench.fsdp_memory import run

        print("\n".join(run(args.fsdp_model, args.fsdp_steps, args.fsdp_groups, args.fsdp_response_tokens)))
        return
    if args.learner_step:
        result = learner_step_memory(args)
        print("\n".join(learner_step_table(result)))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return
    print(f"# bench.learner_memory {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}\n")
    print("\n".join(accounted_table(args)) + "\n")
    print("\n".join(measured_table(args)))


if __name__ == "__main__":
    main()
