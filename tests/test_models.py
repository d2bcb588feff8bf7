"""Model loading: the tiny model is built once and bit-identical everywhere; SmolLM2 converts once and reloads fast."""

import time

import pytest
import torch

from common.models import ModelError, load_model, load_tokenizer, resolve_model_path


@pytest.mark.unit
def test_tiny_model_is_small_and_identical_across_cache_dirs(tmp_path):
    # Two separate caches build the model independently from the fixed seed: the weights must match bit for bit,
    # or actors and learner would start from different policies.
    a = load_model("tiny", dtype=torch.float32, device="cpu", cache_dir=tmp_path / "a")
    b = load_model("tiny", dtype=torch.float32, device="cpu", cache_dir=tmp_path / "b")
    n_params = sum(p.numel() for p in a.parameters())
    assert 100_000 < n_params < 1_000_000
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


@pytest.mark.unit
def test_tiny_tokenizer_round_trips_text_and_has_chat_template(tmp_path):
    tok = load_tokenizer("tiny", cache_dir=tmp_path)
    ids = tok("which is larger, 3 or 8?", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("which is larger, 3 or 8?")  # one token per character
    assert tok.decode(ids) == "which is larger, 3 or 8?"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id


@pytest.mark.unit
def test_cache_entry_is_reused_not_rebuilt(tmp_path):
    first = resolve_model_path("tiny", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-built leftovers


@pytest.mark.unit
def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not-a-model"):
        resolve_model_path("not-a-model", tmp_path)


@pytest.mark.unit
def test_local_directory_loads_like_a_named_model(tmp_path):
    path = resolve_model_path("tiny", tmp_path)
    model = load_model(str(path), dtype=torch.bfloat16, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_fast_and_answers():
    # Uses the shared cache (~/.cache/dynamo-rl or $DYNAMO_RL_CACHE): the first run converts (~30 s).
    resolve_model_path("smollm2")
    start = time.monotonic()
    model = load_model("smollm2", dtype=torch.float32, device="cpu")
    assert time.monotonic() - start < 5.0
    tok = load_tokenizer("smollm2")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1]:])
