"""The learner's memory settings: the chunked loss head by default, glibc's heap trimmed after each step."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.learner_memory import TensorBytes
from common.config import LearnerConfig
from learner.batch import MicroBatch
from learner.step import build_state, token_outputs

VOCAB = 49152  # SmolLM2's


@pytest.mark.integration
def test_the_default_loss_head_never_holds_a_micro_batchs_whole_logits():
    torch.set_num_threads(1)
    rows, resp_len = 256, 16  # 4096 response positions
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(1, VOCAB, (rows, resp_len + 1))
    mb = MicroBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                    logit_index=torch.arange(resp_len).expand(rows, -1).contiguous(), targets=ids[:, 1:].contiguous(),
                    mask=torch.ones(rows, resp_len, dtype=torch.bool), behav_logp=torch.zeros(rows, resp_len),
                    adv=torch.ones(rows), sample_index=torch.arange(rows))
    policy = build_state(model, LearnerConfig()).policy
    with TensorBytes() as counter:
        token_outputs(policy, mb, 0.7)[0].sum().backward()
    logits_bytes = rows * resp_len * VOCAB * 4  # [B, R, V] float32: 805 MB, which the unchunked head holds (or more)
    # chunks of 1024 positions: two [1024, V] float32 buffers = 403 MB, plus [V, H] gradients (3 MB each) and the
    # one-layer body's activations (< 5 MB)
    assert counter.peak < 0.55 * logits_bytes, f"peak {counter.peak / 2**20:.0f} MiB"


@pytest.mark.unit
def test_after_each_step_the_learner_gives_glibc_held_freed_memory_back():
    """glibc raises its mmap threshold to the size of a freed large block, so later blocks below it come from the
    heap; freed, they stay resident while a live block sits above them (as a step's activations do). Run in a fresh
    interpreter: the heap and the threshold are process-wide, and earlier tests of a session leave them in any
    state."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", _HEAP_SCENARIO], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    freed = int(out.stdout.split()[-1])
    assert freed > 300 * 2**20, f"{freed / 2**20:.0f} MiB"  # most of the 400 MiB left the process


_HEAP_SCENARIO = """
import torch
from learner.train import return_freed_heap

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

big = torch.ones(24 * 2**20 // 4)
del big  # the mmap threshold is now 24 MiB
blocks = [torch.ones(2 * 2**20 // 4) for _ in range(201)]  # 402 MiB, written, from the heap
# the live block above the freed ones: the highest of them (a block allocated after them can land in a hole lower
# in the heap, and then freeing them shrinks the heap's top without any trim)
pin = blocks.pop(max(range(len(blocks)), key=lambda i: blocks[i].data_ptr()))
assert all(b.data_ptr() < pin.data_ptr() for b in blocks)
del blocks
held = rss()
return_freed_heap()
assert pin.sum() == 2**19
print(held - rss())
"""
