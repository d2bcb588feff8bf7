"""The chunked loss head: same values and gradients as the unchunked head, memory that does not grow with tokens."""

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from bench.learner_memory import TensorBytes
from common.config import ConfigError, LearnerConfig, with_overrides
from learner.batch import MicroBatch
from learner.loss_head import head_token_outputs
from learner.modulation import token_logprob_entropy
from learner.step import ResponseLogits, accumulate_gradients, build_state, prepare_step, token_outputs
from tests.test_learner_step import example_groups, make_batch, make_cfg

VOCAB = 64
TEMPERATURE = 0.7


@pytest.mark.unit
def test_two_token_vocabulary_by_hand():
    # W = [[0], [2 ln 3]], h = 1, T = 2: logits / T = [0, ln 3] -> pi = [1/4, 3/4]; target token 1.
    # log pi(1) = ln(3/4) = -0.287682
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335
    # E = 1/16 (ln 1/4 + H) + 9/16 (ln 3/4 + H) = 1/16 (-0.823959) + 9/16 (0.274653) = -0.051497 + 0.154492
    #   = 0.102995
    # d log pi(1) / d logits = (onehot - pi) / T = [-1/8, 1/8] -> dW = [[-1/8], [1/8]], dh = 2 ln 3 / 8 = 0.274653
    head = torch.nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [2 * math.log(3)]]))
    hidden = torch.ones(1, 1, 1, dtype=torch.float64, requires_grad=True)
    logp, entropy, expect = head_token_outputs(hidden, head, torch.tensor([[1]]), temperature=2.0, chunk_tokens=1)
    assert logp.item() == pytest.approx(-0.287682, abs=1e-6)
    assert entropy.item() == pytest.approx(0.562335, abs=1e-6)
    assert expect.item() == pytest.approx(0.102995, abs=1e-6)
    logp.sum().backward()
    assert_close(head.weight.grad, torch.tensor([[-0.125], [0.125]], dtype=torch.float64))
    assert hidden.grad.item() == pytest.approx(0.274653, abs=1e-6)


def _head_case(bias: bool):
    """hidden [3, 8, 5] float64, a head 5 -> 11, targets, and a mask whose row 1 is fully masked."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(5, 11, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(11, 5, generator=gen, dtype=torch.float64))
        if bias:
            head.bias.copy_(torch.randn(11, generator=gen, dtype=torch.float64))
    hidden = torch.randn(3, 8, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 8), generator=gen)
    mask = torch.arange(8)[None, :] < torch.tensor([8, 0, 5])[:, None]
    coef = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    return head, hidden, tokens, mask, coef


def _masked_loss(logp, entropy, mask, coef):
    return torch.where(mask, coef[0] * logp + coef[1] * entropy, 0.0).sum()


@pytest.mark.unit
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 24, 100])  # 24 = every token in one chunk; 5 does not divide 24
def test_head_values_and_gradients_equal_the_unchunked_head(chunk, bias):
    head, hidden, tokens, mask, coef = _head_case(bias)
    whole = token_logprob_entropy(head(hidden) / TEMPERATURE, tokens, entropy_grad=True)
    _masked_loss(whole[0], whole[1], mask, coef).backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    chunked = head_token_outputs(hidden, head, tokens, temperature=TEMPERATURE, chunk_tokens=chunk, entropy_grad=True)
    for got, want in zip(chunked, whole):
        assert_close(got, want, rtol=1e-12, atol=1e-12)
    _masked_loss(chunked[0], chunked[1], mask, coef).backward()
    got = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert hidden.grad.abs().max() > 1e-3  # not two zeros
    assert torch.equal(hidden.grad[1], torch.zeros_like(hidden.grad[1]))  # the fully masked row gets nothing


@pytest.mark.unit
def test_head_without_entropy_gradient_marks_entropy_and_expectation_constant():
    head, hidden, tokens, _, _ = _head_case(False)
    logp, entropy, expect = head_token_outputs(hidden, head, tokens, temperature=TEMPERATURE, chunk_tokens=4)
    assert logp.requires_grad and not entropy.requires_grad and not expect.requires_grad


def tiny_model(tied: bool, seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    """float64 by default, so that chunked and unchunked results agree far below any real difference."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=tied)).to(dtype)


def hand_micro_batch() -> MicroBatch:
    """Three rows of prompt + response (lengths 4+5, 3+2, and 6+0: a fully masked row), R = 5."""
    gen = torch.Generator().manual_seed(1)
    prompt_lens, resp_lens, seq_len, resp_len = [4, 3, 6], [5, 2, 0], 9, 5
    input_ids = torch.zeros(3, seq_len, dtype=torch.long)
    attention = torch.zeros(3, seq_len, dtype=torch.long)
    logit_index = torch.zeros(3, resp_len, dtype=torch.long)
    targets = torch.zeros(3, resp_len, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        input_ids[b, :p + r] = torch.randint(1, VOCAB, (p + r,), generator=gen)
        attention[b, :p + r] = 1
        logit_index[b] = p - 1 + torch.arange(resp_len).clamp(max=max(r - 1, 0))
        targets[b, :r] = input_ids[b, p:p + r]
    mask = torch.arange(resp_len)[None, :] < torch.tensor(resp_lens)[:, None]
    return MicroBatch(input_ids=input_ids, attention_mask=attention, logit_index=logit_index, targets=targets,
                      mask=mask, behav_logp=torch.zeros(3, resp_len), adv=torch.tensor([1.0, -0.5, 0.3]),
                      sample_index=torch.arange(3))


def _policy_grads(model, chunk, mb):
    """token_outputs values, and the gradients of a masked loss w.r.t. the response hidden states and every weight."""
    captured = {}

    def keep_hidden(module, inputs, output):
        output.last_hidden_state.retain_grad()
        captured["hidden"] = output.last_hidden_state

    handle = model.model.register_forward_hook(keep_hidden)
    model.zero_grad(set_to_none=True)
    outs = token_outputs(ResponseLogits(model, chunk), mb, TEMPERATURE, entropy_grad=True)
    handle.remove()
    coef = torch.linspace(-1.0, 1.0, mb.mask.numel()).view_as(mb.mask)
    torch.where(mb.mask, coef * outs[0] + 0.5 * outs[1], 0.0).sum().backward()
    return outs, captured["hidden"].grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.unit
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])  # R * B = 15 tokens: 4 and 7 leave a short last chunk
def test_token_outputs_values_and_gradients_equal_the_unchunked_path(chunk, tied):
    torch.set_num_threads(1)
    model, mb = tiny_model(tied), hand_micro_batch()
    whole, whole_hidden, whole_params = _policy_grads(model, 0, mb)
    chunked, chunked_hidden, chunked_params = _policy_grads(model, chunk, mb)
    for got, want in zip(chunked, whole):
        assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_close(chunked_hidden, whole_hidden, rtol=1e-10, atol=1e-12)
    assert chunked_params.keys() == whole_params.keys()
    for name in whole_params:
        assert_close(chunked_params[name], whole_params[name], rtol=1e-10, atol=1e-12, msg=name)
    head = model.get_output_embeddings().weight
    assert (head is model.get_input_embeddings().weight) == tied
    assert whole_params["lm_head.weight" if not tied else "model.embed_tokens.weight"].abs().max() > 1e-3
    with torch.no_grad():  # the pi_prox and scope pre-passes run without grad
        for got, want in zip(token_outputs(ResponseLogits(model, chunk), mb, TEMPERATURE), whole):
            assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.unit
@pytest.mark.parametrize("precision", ["bfloat16 weights", "bfloat16 autocast"])
def test_low_precision_chunked_head_matches_the_unchunked_one(precision):
    """bf16 logits are rounded the same way in both paths; the weight gradient is summed in float32 when chunked."""
    torch.set_num_threads(1)
    model = tiny_model(False, dtype=torch.bfloat16 if precision == "bfloat16 weights" else torch.float32)
    mb = hand_micro_batch()
    results = []
    for chunk in (0, 4):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16 autocast"):
            results.append(_policy_grads(model, chunk, mb))
    (whole, _, whole_params), (chunked, _, chunked_params) = results
    assert whole[0].dtype == torch.float32 and chunked[0].dtype == torch.float32
    for got, want in zip(chunked, whole):
        assert_close(got, want, rtol=1e-2, atol=1e-2)
    for name in whole_params:
        assert chunked_params[name].dtype == whole_params[name].dtype
        assert_close(chunked_params[name].float(), whole_params[name].float(), rtol=5e-2, atol=5e-3, msg=name)


@pytest.mark.unit
def test_learner_step_gradients_and_metrics_do_not_depend_on_chunking():
    """The whole micro-batch path (modulation, IS, entropy bonus) through accumulate_gradients."""
    torch.set_num_threads(1)
    grads, metrics = [], []
    for chunk in (0, 6):
        model = tiny_model(False, seed=3)
        cfg = with_overrides(make_cfg(entropy_coef=0.01), learner={"loss_chunk_tokens": chunk})
        prepared = prepare_step(make_batch(example_groups(seed=4)), cfg)
        state = build_state(model, cfg.learner)
        assert state.policy.loss_chunk_tokens == chunk
        metrics.append(accumulate_gradients(state, prepared.mini_batches[0], prepared.denominators[0], cfg))
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert metrics[0].keys() == metrics[1].keys()
    for key in metrics[0]:
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-9, abs=1e-12), key


@pytest.mark.unit
def test_chunk_size_is_validated():
    with pytest.raises(ConfigError, match="learner.loss_chunk_tokens"):
        LearnerConfig(loss_chunk_tokens=-1)
    head, hidden, tokens, _, _ = _head_case(False)
    with pytest.raises(ValueError, match="chunk_tokens"):
        head_token_outputs(hidden, head, tokens, temperature=1.0, chunk_tokens=0)
    with pytest.raises(ValueError, match="hidden"):
        head_token_outputs(hidden, head, tokens[:, :3], temperature=1.0, chunk_tokens=4)
    with pytest.raises(ValueError, match="nn.Linear"):
        head_token_outputs(hidden, torch.nn.Linear(4, 11), tokens, temperature=1.0, chunk_tokens=4)


def _head_peak_bytes(tokens: int, vocab: int, hidden: int, chunk: int) -> int:
    """Peak live tensor bytes of the head's forward + backward (hidden states and weight exist before)."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(1, tokens, hidden, generator=gen, requires_grad=True)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    with TensorBytes() as counter:
        head_token_outputs(states, head, ids, temperature=TEMPERATURE, chunk_tokens=chunk)[0].sum().backward()
    return counter.peak


@pytest.mark.integration
def test_chunked_head_peak_memory_does_not_grow_with_tokens():
    torch.set_num_threads(1)
    vocab, hidden, chunk = 8192, 16, 64
    # two [chunk, V] float32 buffers (2 MiB each) + the [V, H] weight gradient (0.5 MiB) + the [N, H] hidden gradient
    small, large = _head_peak_bytes(1024, vocab, hidden, chunk), _head_peak_bytes(2048, vocab, hidden, chunk)
    assert 2 * chunk * vocab * 4 < small < 3 * chunk * vocab * 4
    # doubling the tokens adds only the [N, H] hidden gradient and four [N] float32 vectors: 1024 x (16 + 4) x 4
    assert 0 <= large - small <= 1024 * (hidden + 4) * 4


@pytest.mark.integration
def test_learner_loss_head_peak_memory_stays_under_a_bound_the_unchunked_head_exceeds():
    """token_outputs on a Llama with a 16k vocabulary and 2048 response tokens, with learner.loss_chunk_tokens."""
    torch.set_num_threads(1)
    vocab, rows, resp_len, chunk = 16384, 16, 128, 128
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(1, vocab, (rows, resp_len + 1))
    mb = MicroBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                    logit_index=torch.arange(resp_len).expand(rows, -1).contiguous(), targets=ids[:, 1:].contiguous(),
                    mask=torch.ones(rows, resp_len, dtype=torch.bool), behav_logp=torch.zeros(rows, resp_len),
                    adv=torch.ones(rows), sample_index=torch.arange(rows))
    logits_bytes = rows * resp_len * vocab * 4  # [B, R, V] float32 = 128 MiB
    # chunked: 2 x [128, V] float32 (16 MiB) + [V, H] gradients (1 MiB each) + the small model's activations
    bound = logits_bytes // 4
    peaks = {}
    for setting in (0, chunk):
        policy = build_state(model, LearnerConfig(loss_chunk_tokens=setting)).policy
        with TensorBytes() as counter:
            token_outputs(policy, mb, TEMPERATURE)[0].sum().backward()
        peaks[setting] = counter.peak
        model.zero_grad(set_to_none=True)
    assert peaks[0] > logits_bytes  # the unchunked head holds at least the whole logits
    assert peaks[chunk] < bound, f"chunked head peak {peaks[chunk] / 2**20:.1f} MiB"


@pytest.mark.gpu
def test_on_a_gpu_chunked_head_matches_and_its_peak_memory_stays_flat():
    """bf16 autocast over float32 weights as on a GPU learner; CUDA's allocator counts the peak."""
    vocab, hidden, chunk = 151936, 896, 1024
    head = torch.nn.Linear(hidden, vocab, bias=False, device="cuda")
    peaks, results = {}, {}
    for setting, tokens in ((0, 8192), (chunk, 8192), (chunk, 32768)):
        torch.manual_seed(0)
        states = torch.randn(1, tokens, hidden, device="cuda", requires_grad=True)
        ids = torch.randint(0, vocab, (1, tokens), device="cuda")
        head.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if setting:
                logp = head_token_outputs(states, head, ids, temperature=TEMPERATURE, chunk_tokens=setting)[0]
            else:
                logp = token_logprob_entropy(head(states) / TEMPERATURE, ids)[0]
        logp.sum().backward()
        torch.cuda.synchronize()
        peaks[setting, tokens] = torch.cuda.max_memory_allocated() - base
        results[setting, tokens] = (logp.detach(), states.grad, head.weight.grad)
    # both bf16 results against float32 arithmetic on the same inputs: sums of 8,192 bf16 products differ from one
    # another by more than an elementwise tolerance allows, so each error is measured against the tensor's scale
    torch.manual_seed(0)
    states = torch.randn(1, 8192, hidden, device="cuda", requires_grad=True)
    ids = torch.randint(0, vocab, (1, 8192), device="cuda")
    head.zero_grad(set_to_none=True)
    exact_logp = token_logprob_entropy(head(states) / TEMPERATURE, ids)[0]
    exact_logp.sum().backward()
    exact = (exact_logp.detach(), states.grad, head.weight.grad)
    for name, got, want, ref in zip(("logp", "hidden grad", "head grad"), results[chunk, 8192], results[0, 8192],
                                    exact):
        scale = ref.abs().max().item()
        err_chunked, err_plain = ((x.float() - ref).abs().max().item() for x in (got, want))
        assert err_chunked <= 2e-2 * scale, f"{name}: chunked error {err_chunked:.3g} of scale {scale:.3g}"
        assert err_chunked <= 2 * err_plain + 1e-3 * scale, f"{name}: chunked {err_chunked:.3g}, plain {err_plain:.3g}"
    # [8192, V] bf16 logits alone are 2.3 GiB; the chunked head holds two [1024, V] float32 buffers (1.2 GiB) and
    # the [V, H] gradients (0.5 GiB float32 + 0.25 GiB bf16 products) plus the [N, H] hidden gradient
    assert peaks[chunk, 32768] < peaks[0, 8192] / 2
    assert peaks[chunk, 32768] - peaks[chunk, 8192] <= (32768 - 8192) * hidden * 4 * 1.1
