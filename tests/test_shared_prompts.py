"""Shared-prompt micro-batches (learner.shared_prompt_forward): packing keeps groups together under the token
budget, and the prompt-once forward (prompt KV cache copied to each sample) gives the log-probs, entropies,
gradients and optimizer step of running every prompt + response separately."""

import numpy as np
import pytest
import torch

from common.config import with_overrides
from learner.batch import Rollouts, pack_micro_batches, rollouts_from_batch
from learner.step import build_state, token_outputs, train_step
from test_learner_step import example_groups, make_batch, make_cfg, tiny_model

pytestmark = pytest.mark.unit


def rollouts_of(prompt_lengths, response_lengths) -> Rollouts:
    prompts, responses = [], []
    for g, (p, lengths) in enumerate(zip(prompt_lengths, response_lengths)):
        for r in lengths:
            prompts.append(np.arange(1, p + 1, dtype=np.int64) + 10 * g)
            responses.append(np.arange(1, r + 1, dtype=np.int64))
    n = len(responses)
    return Rollouts(prompts=prompts, responses=responses, behav_logprobs=[np.full(len(r), -1.0, np.float32)
                                                                         for r in responses],
                    rewards=torch.zeros(n), correct=torch.zeros(n, dtype=torch.bool),
                    lengths=torch.tensor([len(r) for r in responses]), truncated=torch.zeros(n, dtype=torch.bool),
                    group_sizes=[len(lengths) for lengths in response_lengths], staleness=[0] * len(prompt_lengths))


@pytest.mark.parametrize("budget, packs", [
    # cost = distinct prompts x longest prompt + rows x longest response. Group A: prompt 4, responses 2, 3, 1;
    # group B: prompt 6, responses 2, 2.
    (20, [[0, 1, 2], [3, 4]]),       # A: 1x4 + 3x3 = 13; adding B's first row: 2x6 + 4x3 = 24 > 20
    (24, [[0, 1, 2, 3], [4]]),       # 24 fits; B's second row: 2x6 + 5x3 = 27 > 24
    (9, [[0], [1], [2], [3], [4]]),  # A's second row alone would cost 1x4 + 2x3 = 10: every row on its own
])
def test_packing_keeps_a_groups_rows_together_and_splits_a_group_over_the_budget(budget, packs):
    rollouts = rollouts_of([4, 6], [[2, 3, 1], [2, 2]])
    mbs = pack_micro_batches(rollouts, torch.zeros(5), budget, shared_prompts=True)
    assert [mb.sample_index.tolist() for mb in mbs] == packs
    first = mbs[0]
    assert first.input_ids is None and first.owner is not None
    if packs[0] == [0, 1, 2, 3]:
        assert first.owner.tolist() == [0, 0, 0, 1]
        assert first.prompt_ids.tolist() == [[1, 2, 3, 4, 0, 0], [11, 12, 13, 14, 15, 16]]
        assert first.prompt_mask.sum(1).tolist() == [4, 6]
        assert first.targets.tolist() == [[1, 2, 0], [1, 2, 3], [1, 0, 0], [1, 2, 0]]
        # every sample's prompt + response, as the unshared layout would run them: (4+2)+(4+3)+(4+1)+(6+2)
        assert first.sequence_tokens == 26


def _outputs_and_grads(model, mb, temperature=0.7):
    from learner.step import ResponseLogits

    model.zero_grad()
    policy = ResponseLogits(model, loss_chunk_tokens=0)
    logp, entropy, expect = token_outputs(policy, mb, temperature)
    order = torch.argsort(mb.sample_index)
    weights = torch.linspace(-1.0, 2.0, logp.numel()).reshape(logp.shape)  # a different weight per token
    (logp * weights[order.argsort()] * mb.mask).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logp[order][mb.mask[order]], entropy[order][mb.mask[order]], expect[order][mb.mask[order]], grads


def test_prompt_once_forward_equals_separate_sequences_with_gradients():
    # Prompts of different lengths (right padding), responses from 1 to 7 tokens, and the same prompt in two groups.
    groups = example_groups(seed=3, n_groups=3, group_size=4)
    groups.append((groups[0][0], [([5], 1.0), ([9, 9, 9, 9, 9, 9, 9], 0.0)]))
    rollouts = rollouts_from_batch(make_batch(groups))
    adv = torch.zeros(rollouts.num_samples)
    (separate,) = pack_micro_batches(rollouts, adv, 4096)
    (shared,) = pack_micro_batches(rollouts, adv, 4096, shared_prompts=True)
    assert shared.prompt_ids.shape[0] == 3  # the repeated prompt is run once
    model = tiny_model(seed=1)
    want = _outputs_and_grads(model, separate)
    got = _outputs_and_grads(model, shared)
    for name, a, b in zip(("logp", "entropy", "E[pi Lambda]"), want[:3], got[:3]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5, msg=name)
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], atol=2e-5, rtol=1e-4, msg=name)
    assert shared.sequence_tokens == separate.sequence_tokens


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_steps_gradient_with_shared_prompts_equals_the_one_without(chunk):
    """Several micro-batches (split groups) and the minibatch-scope modulation pre-pass; gradients compared (not
    the AdamW step, whose first update is lr x sign(g) for float-noise-sized g)."""
    from learner.step import accumulate_gradients, prepare_step

    batch = make_batch(example_groups(seed=5, n_groups=3, group_size=4))
    grads = []
    for shared in (False, True):
        cfg = with_overrides(make_cfg(), learner={"shared_prompt_forward": shared, "loss_chunk_tokens": chunk,
                                                  "micro_batch_tokens": 40})
        state = build_state(tiny_model(seed=2), cfg.learner)
        prepared = prepare_step(batch, cfg)
        assert len(prepared.mini_batches[0]) >= 3
        metrics = accumulate_gradients(state, prepared.mini_batches[0], prepared.denominators[0], cfg)
        grads.append({n: p.grad.clone() for n, p in state.model.named_parameters()})
        assert metrics["loss/valid_tokens"] > 0
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-4 * float(want.abs().max()), rtol=0, msg=name)


def test_a_train_step_runs_with_shared_prompts_and_counts_every_samples_tokens():
    batch = make_batch(example_groups(seed=5, n_groups=3, group_size=4))
    cfg = make_cfg()
    state = build_state(tiny_model(seed=2), cfg.learner)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    metrics = train_step(state, batch, cfg)
    assert state.version == 1 and any(not torch.equal(p, before[n]) for n, p in state.model.named_parameters())
    rollouts = rollouts_from_batch(batch)
    tokens = sum(len(p) + len(r) for p, r in zip(rollouts.prompts, rollouts.responses))
    assert metrics["perf/tokens_per_s"] == pytest.approx(tokens / metrics["time/forward_backward_s"])


def test_activation_checkpointing_runs_every_sequence_separately():
    from learner.step import prepare_step, shared_prompts

    cfg = with_overrides(make_cfg(), learner={"activation_checkpointing": True})
    assert not shared_prompts(cfg.learner) and shared_prompts(make_cfg().learner)
    prepared = prepare_step(make_batch(example_groups()), cfg)
    assert all(mb.owner is None and mb.input_ids is not None for mbs in prepared.mini_batches for mb in mbs)
