"""The learner step on a tiny random Llama with hand-built batches: reference loss, modulation, IS, invariance."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.config import ActorConfig, AlgorithmConfig, Config, LearnerConfig, with_overrides
from common.schemas import Batch, Group, ServedGroup, encode_array, make_sample, TOKEN_DTYPE
from learner.advantages import group_advantages
from learner.batch import pack_micro_batches, rollouts_from_batch
from learner.loss import policy_loss
from learner.modulation import modulate_advantages, token_logprob_entropy
from learner.step import ResponseLogits, accumulate_gradients, build_state, prepare_step, token_outputs, train_step

pytestmark = pytest.mark.unit
VOCAB = 64


def tiny_model(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2))


def make_batch(groups, *, behav=None, staleness=0) -> Batch:
    """groups: list of (prompt tokens, [(response tokens, reward)]); behav(prompt, response) -> log-probs."""
    served = []
    for g, (prompt, samples) in enumerate(groups):
        built = []
        for response, reward in samples:
            logprobs = behav(prompt, response) if behav else [-1.0] * len(response)
            built.append(make_sample(response, logprobs, [0] * len(response), reward, reward > 0, "stop"))
        group = Group(prompt_id=f"p{g}", prompt_tokens=encode_array(prompt, TOKEN_DTYPE), samples=built)
        served.append(ServedGroup(group=group, staleness=staleness, arrival=g))
    return Batch(groups=served, policy_version=0)


def example_groups(seed: int = 0, n_groups: int = 2, group_size: int = 4, equal_lengths: bool = False):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        prompt = torch.randint(1, VOCAB, (5 + (0 if equal_lengths else g),), generator=gen).tolist()
        samples = []
        for j in range(group_size):
            length = 6 if equal_lengths else 3 + (j * 2 + g) % 5
            samples.append((torch.randint(1, VOCAB, (length,), generator=gen).tolist(), float(j % 2)))
        groups.append((prompt, samples))
    return groups


def make_cfg(**algo) -> Config:
    # temperature 0.7: behaviour log-probs are at the sampling temperature, so the step must divide by it
    return Config(algo=AlgorithmConfig(**algo), actor=ActorConfig(temperature=0.7),
                  learner=LearnerConfig(lr=1e-2, micro_batch_tokens=4096))


@torch.no_grad()
def model_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist()


def reference_loss(model, groups, cfg: Config, behav_logp) -> float:
    """The step's loss rebuilt from the pure functions, one unpadded sequence at a time."""
    logits, targets, behav, rewards, sizes = [], [], [], [], []
    resp_len = max(len(r) for _, samples in groups for r, _ in samples)
    for prompt, samples in groups:
        sizes.append(len(samples))
        for response, reward in samples:
            with torch.no_grad():
                full = model(input_ids=torch.tensor([prompt + response])).logits[0]
            seq = full[len(prompt) - 1:len(prompt) - 1 + len(response)] / cfg.actor.temperature  # [r, V]
            pad = resp_len - len(response)
            logits.append(torch.cat([seq, torch.zeros(pad, VOCAB)]))
            targets.append(torch.tensor(response + [0] * pad))
            behav.append(torch.tensor(behav_logp(prompt, response) + [0.0] * pad))
            rewards.append(reward)
    logits, targets, behav = torch.stack(logits), torch.stack(targets), torch.stack(behav)
    mask = torch.stack([torch.arange(resp_len) < len(r) for _, s in groups for r, _ in s])
    logp, entropy, expect = token_logprob_entropy(logits, targets)
    adv, _ = group_advantages(torch.tensor(rewards), sizes)
    final, _ = modulate_advantages(adv[:, None], torch.ones_like(logp), logp, entropy, expect, mask, cfg.algo)
    loss, _ = policy_loss(logp, logp.detach(), behav, final, mask, token_denominator=float(mask.sum()),
                          cfg=cfg.algo, seq_denominator=float(len(rewards)))
    return float(loss)


def test_one_step_matches_reference_parameters_change_version_increments():
    torch.set_num_threads(1)
    model = tiny_model()
    groups = example_groups()
    cfg = make_cfg()
    behav = lambda p, r: [x - 0.1 for x in model_logprobs(model, p, r, 0.7)]  # noqa: E731 - mu slightly off pi
    expected = reference_loss(model, groups, cfg, behav)
    state = build_state(model, cfg.learner)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_step(state, make_batch(groups, behav=behav), cfg)
    assert metrics["loss/policy"] == pytest.approx(expected, abs=1e-5)
    assert state.version == 1
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed)  # every tensor gets a gradient through the response tokens
    assert metrics["optim/grad_norm"] > 0 and metrics["optim/lr"] == pytest.approx(1e-2)
    assert metrics["loss/valid_tokens"] == sum(len(r) for _, s in groups for r, _ in s)


def test_zero_variance_groups_are_dropped_and_counted():
    groups = example_groups(n_groups=3)
    groups[1] = (groups[1][0], [(r, 1.0) for r, _ in groups[1][1]])  # all correct: no signal
    prepared = prepare_step(make_batch(groups), make_cfg())
    assert prepared.metrics["reward/zero_variance_groups_dropped"] == 1
    assert prepared.denominators[0][1] == 8  # two groups of four sequences remain


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("scope", ["minibatch", "microbatch"])
def test_gradients_do_not_depend_on_the_micro_batch_split(scope):
    """1 micro-batch of 8 rows vs 4 micro-batches of 2 rows: same gradient (the minibatch scope makes it so)."""
    torch.set_num_threads(1)
    groups = example_groups(seed=3, n_groups=2, group_size=4, equal_lengths=True)
    seq_len = len(groups[0][0]) + len(groups[0][1][0][0])  # every sequence has this length
    grads = []
    for budget in (8 * seq_len, 2 * seq_len):
        model = tiny_model(seed=1)
        cfg = with_overrides(make_cfg(modulation_scope=scope), learner={"micro_batch_tokens": budget})
        prepared = prepare_step(make_batch(groups), cfg)
        assert len(prepared.mini_batches[0]) == 8 * seq_len // budget
        accumulate_gradients(build_state(model, cfg.learner), prepared.mini_batches[0], prepared.denominators[0], cfg)
        grads.append(_grads(model))
    diffs = [float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(*grads)]
    if scope == "minibatch":
        assert max(diffs) < 1e-5
    else:  # the reference's micro-batch scope changes H_max/H_min/max Xi with the split: the check can fail
        assert max(diffs) > 1e-4


def _logit_grads(model, batch, cfg):
    """d loss / d (LM head input) at each response position [N_valid, H], in sample order, for one micro-batch
    step. The head is linear, so this is W^T (d loss / d logits) position by position: a per-token factor on the
    logit gradient shows up unchanged here. Taken at the head's input, it reads the chunked head (the default,
    whose logits never exist whole) and the unchunked one alike."""
    captured = {}
    state = build_state(model, cfg.learner)

    def keep_grad(method):
        def wrapped(*args):
            hidden = method(*args)  # [B, R, H]
            hidden.retain_grad()
            captured["hidden"] = hidden
            return hidden
        return wrapped

    state.policy.response_hidden = keep_grad(state.policy.response_hidden)
    state.policy.shared_prompt_hidden = keep_grad(state.policy.shared_prompt_hidden)
    prepared = prepare_step(batch, cfg)
    (mb,) = prepared.mini_batches[0]
    metrics = accumulate_gradients(state, [mb], prepared.denominators[0], cfg)
    order = torch.argsort(mb.sample_index)
    grad = captured["hidden"].grad[order][mb.mask[order]]  # [N_valid, H]
    return grad, metrics


def test_modulation_scales_each_token_gradient_by_its_beta_factors():
    torch.set_num_threads(1)
    groups = example_groups(seed=5)
    model = tiny_model(seed=2, layers=1)
    behav = lambda p, r: model_logprobs(model, p, r, 0.7)  # noqa: E731 - on-policy: IS weight 1
    batch = make_batch(groups, behav=behav)
    grad_off, _ = _logit_grads(model, batch, make_cfg(modulation=False))
    grad_on, metrics = _logit_grads(model, batch, make_cfg(modulation=True))
    # beta per token from the pure function on the same inputs (ratio 1 at the start of the step)
    cfg = make_cfg(modulation=True)
    rollouts = rollouts_from_batch(batch)
    adv, _ = group_advantages(rollouts.rewards, rollouts.group_sizes)
    (mb,) = pack_micro_batches(rollouts, adv, 4096)
    with torch.no_grad():
        logp, entropy, expect = token_outputs(ResponseLogits(model), mb, cfg.actor.temperature)
    final, _ = modulate_advantages(mb.adv[:, None], torch.ones_like(logp), logp, entropy, expect, mb.mask, cfg.algo)
    order = torch.argsort(mb.sample_index)
    beta = (final / mb.adv[:, None])[order][mb.mask[order]]  # [N_valid]; every advantage here is non-zero
    assert (beta - 1).abs().max() > 0.01  # the factors are not all 1, so the check has teeth
    torch.testing.assert_close(grad_on, grad_off * beta[:, None], rtol=1e-4, atol=1e-7)
    assert metrics["modulation/beta_comp/max"] > 1.0


def test_stale_behaviour_logprobs_are_importance_weighted_and_truncated():
    """mu from an 'older version': log mu = log pi - delta, so w = min(exp(delta), 2) per token."""
    torch.set_num_threads(1)
    groups = example_groups(seed=7)
    model = tiny_model(seed=4, layers=1)
    cfg = make_cfg(modulation=False, is_mode="truncate", is_cap=2.0)
    def delta(i: int) -> float:
        # even positions: delta 0.3 (w = e^0.3 = 1.35, kept); odd: 1.5 (w = e^1.5 = 4.48, truncated to 2)
        return 0.3 if i % 2 == 0 else 1.5

    def stale(p, r):
        return [x - delta(i) for i, x in enumerate(model_logprobs(model, p, r, cfg.actor.temperature))]

    fresh = lambda p, r: model_logprobs(model, p, r, cfg.actor.temperature)  # noqa: E731
    grad_fresh, _ = _logit_grads(model, make_batch(groups, behav=fresh), cfg)
    grad_stale, metrics = _logit_grads(model, make_batch(groups, behav=stale), cfg)
    weights = torch.tensor([min(math.exp(delta(i)), 2.0) for _, samples in groups for r, _ in samples
                            for i in range(len(r))])  # [N_valid] in sample order
    n_valid = sum(len(r) for _, s in groups for r, _ in s)
    n_truncated = sum(len(r) // 2 for _, s in groups for r, _ in s)  # odd positions
    assert metrics["loss/is_truncated_fraction"] == pytest.approx(n_truncated / n_valid, abs=1e-6)
    assert metrics["loss/is_weight/max"] == pytest.approx(2.0, abs=1e-5)
    assert metrics["loss/is_weight/min"] == pytest.approx(math.exp(0.3), abs=1e-4)
    torch.testing.assert_close(grad_stale, grad_fresh * weights[:, None], rtol=1e-4, atol=1e-7)


def test_later_mini_batches_use_the_step_start_weights_as_pi_prox():
    """Two optimizer steps per batch: the second mini-batch's ratio pi_theta/pi_prox moves away from 1."""
    torch.set_num_threads(1)
    model = tiny_model(seed=6)
    cfg = with_overrides(make_cfg(), learner={"mini_batches": 2, "groups_per_step": 2, "lr": 5e-2})
    behav = lambda p, r: model_logprobs(model, p, r, cfg.actor.temperature)  # noqa: E731
    metrics = train_step(build_state(model, cfg.learner), make_batch(example_groups(seed=8), behav=behav), cfg)
    assert metrics["optim/steps"] == 2
    # first mini-batch: ratio exactly 1; second: the weights moved after step 1 while pi_prox did not
    assert abs(metrics["loss/ratio/token_mean"] - 1.0) > 1e-4


def test_learning_rate_warms_up_then_follows_a_half_cosine_down_to_the_final_ratio():
    """warmup 1, 5 steps, final ratio 0.1, lr 1e-2. By hand: step 0 is warm-up (1/1); then p = 0, 1/3, 2/3, 1 over
    steps 1..4: 0.1 + 0.9 (1 + cos(pi p)) / 2 = 1, 0.775, 0.325, 0.1; a sixth step stays at 0.1."""
    torch.set_num_threads(1)
    model = tiny_model(seed=3)
    cfg = with_overrides(make_cfg(), learner={"warmup_steps": 1, "total_steps": 5, "lr_final_ratio": 0.1})
    state = build_state(model, cfg.learner)
    rates = [train_step(state, make_batch(example_groups(seed=s)), cfg)["optim/lr"] for s in range(6)]
    assert rates == pytest.approx([1e-2, 1e-2, 7.75e-3, 3.25e-3, 1e-3, 1e-3], rel=1e-9)
    constant = with_overrides(make_cfg(), learner={"warmup_steps": 2, "total_steps": 5})
    state = build_state(tiny_model(seed=3), constant.learner)
    rates = [train_step(state, make_batch(example_groups(seed=s)), constant)["optim/lr"] for s in range(4)]
    assert rates == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2], rel=1e-9)  # the default ratio 1.0: constant after warm-up


@pytest.mark.gpu
def test_step_on_one_gpu_matches_the_cpu_reference():
    model = tiny_model()
    groups = example_groups()
    cfg = with_overrides(make_cfg(), learner={"device": "cuda"})
    behav = lambda p, r: model_logprobs(model, p, r, cfg.actor.temperature)  # noqa: E731
    expected = reference_loss(model, groups, cfg, behav)
    batch = make_batch(groups, behav=behav)  # behaviour log-probs from the CPU model, before it moves
    state = build_state(model.cuda(), cfg.learner)
    metrics = train_step(state, batch, cfg)
    assert metrics["loss/policy"] == pytest.approx(expected, abs=1e-4)
    assert metrics["perf/peak_memory_mb"] > 0 and state.version == 1
