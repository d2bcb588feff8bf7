"""HFEngine on the tiny random model: shapes, exact behaviour log-probs, finish reasons, determinism, weight swaps."""

import threading

import numpy as np
import pytest
import torch

from actor.engines.base import GeneratedSample, SamplingParams
from actor.engines.hf import HFEngine, _top_p_filter, stop_token_ids_of
from common.models import load_model, load_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tok = load_tokenizer("tiny", cache_dir=cache)
    model = load_model("tiny", dtype=torch.float32, device="cpu", cache_dir=cache)
    return tok, model


def _engine(tiny, **kwargs):
    tok, model = tiny
    return HFEngine(model, pad_token_id=tok.pad_token_id, **kwargs)


def _prompts(tok):
    # Different lengths, so left padding and position ids matter.
    texts = ["which is larger, 3 or 8?", "hi", "1+2=", "a much longer prompt about numbers 1 2 3"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _reference_logprobs(model, prompt, sample, temperature):
    """Log-probs of the sampled tokens from one separate full forward pass (no cache, no padding)."""
    seq = torch.tensor([prompt + sample.token_ids.tolist()])
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt) - 1:-1].float() / temperature       # [T, V]
    return torch.log_softmax(logits, -1).gather(-1, seq[0, len(prompt):, None]).squeeze(-1).numpy()


def test_shapes_counts_and_types(tiny):
    tok, _ = tiny
    engine = _engine(tiny, max_batch_sequences=3)  # 9 sequences -> batches of 3, 3, 3
    out = engine.generate(_prompts(tok)[:3], [2, 4, 3], SamplingParams(max_new_tokens=7))
    assert [len(group) for group in out] == [2, 4, 3]
    for sample in (s for group in out for s in group):
        assert isinstance(sample, GeneratedSample)
        assert sample.token_ids.dtype == np.int32 and sample.logprobs.dtype == np.float32
        assert sample.versions.dtype == np.int32
        assert 1 <= len(sample.token_ids) <= 7
        assert np.all(sample.logprobs <= 0) and np.all(sample.versions == 0)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_match_a_separate_forward_pass(tiny, temperature, top_p):
    tok, model = tiny
    prompts = _prompts(tok)
    engine = _engine(tiny, max_batch_sequences=16)
    sampling = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p, seed=3)
    out = engine.generate(prompts, [3, 3, 3, 3], sampling)
    for prompt, group in zip(prompts, out):
        for sample in group:
            expected = _reference_logprobs(model, prompt, sample, temperature)
            np.testing.assert_allclose(sample.logprobs, expected, atol=1e-4, rtol=0)


def test_stop_and_length_finish_reasons(tiny):
    tok, model = tiny
    engine = _engine(tiny, max_batch_sequences=64)
    prompts = _prompts(tok)
    # Make a common token a stop token, so some rows stop early and the batch gets compacted mid-generation.
    probe = engine.generate(prompts, [16] * 4, SamplingParams(max_new_tokens=6, seed=0))
    common = int(np.bincount(np.concatenate([s.token_ids for g in probe for s in g])).argmax())
    out = engine.generate(prompts, [16] * 4, SamplingParams(max_new_tokens=6, stop_token_ids=(common,), seed=0))
    reasons = {s.finish_reason for g in out for s in g}
    assert reasons == {"stop", "length"}
    for prompt, group in zip(prompts, out):
        for s in group:
            if s.finish_reason == "stop":
                assert s.token_ids[-1] == common and common not in s.token_ids[:-1]
            else:
                assert len(s.token_ids) == 6 and common not in s.token_ids
            # Rows that kept going after others stopped (compacted batch) still have exact log-probs.
            np.testing.assert_allclose(s.logprobs, _reference_logprobs(model, prompt, s, 1.0), atol=1e-4)


def test_same_seed_same_samples_other_seed_differs(tiny):
    tok, _ = tiny
    prompts = _prompts(tok)
    a = _engine(tiny, seed=7).generate(prompts, [4] * 4, SamplingParams(max_new_tokens=8))
    b = _engine(tiny, seed=7).generate(prompts, [4] * 4, SamplingParams(max_new_tokens=8))
    c = _engine(tiny, seed=8).generate(prompts, [4] * 4, SamplingParams(max_new_tokens=8))
    flat = lambda out: [s.token_ids.tolist() for g in out for s in g]  # noqa: E731
    assert flat(a) == flat(b)
    assert flat(a) != flat(c)


def test_greedy_is_argmax_and_top_p_keeps_the_nucleus(tiny):
    tok, model = tiny
    prompt = _prompts(tok)[0]
    out = _engine(tiny).generate([prompt], [2], SamplingParams(max_new_tokens=5, temperature=0.0))
    assert out[0][0].token_ids.tolist() == out[0][1].token_ids.tolist()
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1]
    assert out[0][0].token_ids[0] == int(first.argmax())
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the two best (0.5 < 0.6 before adding the second).
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    kept = torch.isfinite(_top_p_filter(logits, 0.6))
    assert kept.tolist() == [[False, True, True]]
    assert torch.isfinite(_top_p_filter(logits, 0.4)).tolist() == [[False, True, False]]


def test_swapped_weights_change_outputs_and_versions(tiny):
    tok, model = tiny
    prompts = _prompts(tok)
    engine = HFEngine(load_model("tiny", dtype=torch.float32, device="cpu"), pad_token_id=tok.pad_token_id)
    before = engine.generate(prompts, [2] * 4, SamplingParams(max_new_tokens=6, seed=1))
    generator = torch.Generator().manual_seed(0)
    new_state = {name: t + 0.5 * torch.randn(t.shape, generator=generator)
                 for name, t in engine.state_dict_template().items() if t.is_floating_point()}
    engine.load_weights(new_state, version=5)
    after = engine.generate(prompts, [2] * 4, SamplingParams(max_new_tokens=6, seed=1))
    assert engine.policy_version == 5
    assert all(np.all(s.versions == 5) for g in after for s in g)
    assert [s.token_ids.tolist() for g in before for s in g] != [s.token_ids.tolist() for g in after for s in g]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(engine.model.state_dict()[name], new_state[name])


def test_weights_swapped_during_generation_tag_later_tokens(tiny):
    tok, _ = tiny
    engine = HFEngine(load_model("tiny", dtype=torch.float32, device="cpu"), pad_token_id=tok.pad_token_id)
    state = {k: v.clone() for k, v in engine.state_dict_template().items()}
    engine.pause()  # blocks the decode loop before its first step
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        out=engine.generate([_prompts(tok)[0]], [1], SamplingParams(max_new_tokens=5))))
    worker.start()
    engine.load_weights(state, version=3)
    engine.resume()
    worker.join(timeout=30)
    assert np.all(result["out"][0][0].versions == 3)


def test_load_weights_rejects_unknown_names_and_bad_shapes(tiny):
    engine = _engine(tiny)
    with pytest.raises(KeyError, match="not.a.param"):
        engine.load_weights({"not.a.param": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights({"model.norm.weight": torch.zeros(3)}, 1)
    assert engine.policy_version == 0


def test_stop_token_ids_come_from_tokenizer_and_generation_config(tiny):
    tok, model = tiny
    assert stop_token_ids_of(tok, model) == (tok.eos_token_id,)


def test_each_distinct_prompt_is_prefilled_once_and_samples_continue_from_its_cache(tiny):
    tok, model = tiny
    prompts = _prompts(tok)
    engine = _engine(tiny, max_batch_sequences=16)
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: rows_seen.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        greedy = engine.generate(prompts, [3, 3, 3, 3], SamplingParams(max_new_tokens=6, temperature=0.0))
    finally:
        hook.remove()
    width = max(len(p) for p in prompts)
    assert rows_seen[0] == (4, width)              # the prefill: 4 distinct prompts, not 12 rows
    assert all(shape[1] == 1 for shape in rows_seen[1:]) and rows_seen[1][0] == 12
    # Each copy decodes as the prompt alone would: greedy samples equal one-sample generation per prompt.
    for prompt, group in zip(prompts, greedy):
        alone = engine.generate([prompt], [1], SamplingParams(max_new_tokens=6, temperature=0.0))[0][0]
        for sample in group:
            assert sample.token_ids.tolist() == alone.token_ids.tolist()
            np.testing.assert_allclose(sample.logprobs, alone.logprobs, atol=1e-5, rtol=0)
