"""The learner's memory settings: the chunked loss head by default, glibc returning freed tensors to the system."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.learner_memory import TensorBytes
from common.config import PRESETS, LearnerConfig
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
def test_the_learner_starts_with_glibc_returning_large_freed_blocks(monkeypatch, tmp_path):
    """glibc's default raises its mmap threshold to 32 MiB after the first large free, so freed activations stay
    in the heap; a fixed threshold maps every large block on its own and unmaps it when freed. A value the user
    set is kept."""
    from common.supervisor import Supervisor

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    sup = Supervisor(PRESETS["tiny"](), tmp_path)
    assert sup.learner.env["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024)
    assert all("MALLOC_MMAP_THRESHOLD_" not in actor.env for actor in sup.actors)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "MALLOC_MMAP_THRESHOLD_" not in Supervisor(PRESETS["tiny"](), tmp_path).learner.env  # inherited as set
