"""The FSDP2-sharded learner on two real gloo ranks (CPU) with the real tiny model (tied LM head): one step equals
the single-process step, and checkpoints resume across world sizes (2 sharded ranks -> 1 process, 1 -> 2).

The rank processes are forked after the test's imports (tests/test_learner_dp_ranks.py: `run_ranks`)."""

import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from common.config import ConfigError, LearnerConfig, with_overrides
from common.models import load_model
from common.processes import free_port
from learner import checkpoint as ckpt
from learner.step import build_state, prepare_step, train_step
from test_checkpoint_reshard import assert_same_state, trainer_state
from test_learner_dp_ranks import run_ranks
from test_learner_step import make_batch, make_cfg

TINY_VOCAB = 61
PROMPT, RESPONSE = 5, 6


def tiny_groups(seed: int, n_groups: int = 4, group_size: int = 4):
    """Groups of equal-length sequences (11 tokens), alternating rewards, tokens inside the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, TINY_VOCAB, (PROMPT,), generator=gen).tolist(),
             [(torch.randint(1, TINY_VOCAB, (RESPONSE,), generator=gen).tolist(), float(j % 2))
              for j in range(group_size)]) for _ in range(n_groups)]


def scenarios():
    """(name, config, batch). 4 groups x 4 samples in 2 mini-batches of 8 sequences (the second trains against
    pi_prox). `odd`: 3 rows per micro-batch -> 3 micro-batches per mini-batch (rank 0 takes 2, rank 1 takes 1 and
    pads one neutral pass), minibatch-scope modulation, the unchunked loss head. `one`: 1 micro-batch per
    mini-batch (rank 1 has none), the chunked loss head, per-layer activation checkpointing. `shared`: each prompt
    run once (two forwards through every sharded layer per micro-batch), a budget of 5 + 3 x 6 tokens -> micro-batches
    of rows [0, 1, 2], [3, 4] (two prompts: 2 x 5 + 2 x 6), [5, 6, 7], the chunked loss head. `odd` runs every
    sequence separately. A tight grad_clip makes the clip act (the norm must be the global one)."""
    seq = PROMPT + RESPONSE
    base = with_overrides(make_cfg(modulation=True, modulation_scope="minibatch"),
                          learner={"mini_batches": 2, "groups_per_step": 4, "grad_clip": 0.05})
    odd = with_overrides(base, learner={"micro_batch_tokens": 3 * seq, "loss_chunk_tokens": 0,
                                        "shared_prompt_forward": False})
    one = with_overrides(base, learner={"micro_batch_tokens": 8 * seq, "loss_chunk_tokens": 4,
                                        "activation_checkpointing": True})
    shared = with_overrides(base, learner={"micro_batch_tokens": PROMPT + 3 * RESPONSE, "loss_chunk_tokens": 4})
    return [("odd", odd, make_batch(tiny_groups(5))), ("one", one, make_batch(tiny_groups(6))),
            ("shared", shared, make_batch(tiny_groups(9)))]


def tiny():
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head this test is about
    return model


def whole_weights(state) -> dict[str, torch.Tensor]:
    return {k: v for k, v in trainer_state(state).items() if k.startswith("param/")}


def _in_group(rank, world, port, errors, body):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        body(rank)
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc().strip()[-1500:]}")
        raise


def _step_rank(rank, port, out, errors):
    def body(rank):
        results = {}
        for name, cfg, batch in scenarios():
            state = build_state(tiny(), cfg.learner, sharded=True)
            assert state.model.lm_head.weight is state.model.model.embed_tokens.weight  # still tied when sharded
            metrics = train_step(state, batch, cfg)
            results[name] = (whole_weights(state), metrics["optim/grad_norm"])
        if rank == 0:
            torch.save(results, out)
    _in_group(rank, 2, port, errors, body)


@pytest.mark.unit
def test_config_fields_are_validated():
    assert LearnerConfig().sharding == "fsdp" and not LearnerConfig().cpu_offload
    with pytest.raises(ConfigError, match="learner.sharding"):
        LearnerConfig(sharding="zero3")
    with pytest.raises(ConfigError, match="learner.cpu_offload"):
        LearnerConfig(cpu_offload=True, sharding="replicate")
    with pytest.raises(ConfigError, match="learner.cpu_offload"):
        LearnerConfig(cpu_offload=True, device="cpu")
    with pytest.raises(ConfigError, match="learner.cpu_offload.*GPU"):  # device "auto" resolved to this CPU
        build_state(tiny(), LearnerConfig(cpu_offload=True))


@pytest.mark.integration
def test_two_sharded_ranks_take_the_single_process_step(tmp_path):
    torch.set_num_threads(1)
    counts = {name: [len(mbs) for mbs in prepare_step(batch, cfg).mini_batches] for name, cfg, batch in scenarios()}
    assert counts == {"odd": [3, 3], "one": [1, 1], "shared": [3, 3]}
    out, port = tmp_path / "fsdp.pt", free_port()
    codes, errors = run_ranks(_step_rank, lambda rank: (rank, port, out), 2, timeout_s=120)
    assert codes == [0, 0] and not errors, (codes, errors)
    sharded = torch.load(out, weights_only=True)
    for name, cfg, batch in scenarios():
        state = build_state(tiny(), cfg.learner)
        metrics = train_step(state, batch, cfg)
        weights, grad_norm = sharded[name]
        assert metrics["optim/grad_norm"] > cfg.learner.grad_clip  # the clip acted
        assert grad_norm == pytest.approx(metrics["optim/grad_norm"], rel=1e-5), name
        single = whole_weights(state)
        assert sorted(weights) == sorted(single)
        for key in single:
            # Two AdamW steps of lr 1e-2 move each weight by ~2e-2, and a missing, doubled or neutral-but-counted
            # micro-batch, or a mean instead of a sum, by ~1e-2. Summing the ranks' gradients in another order
            # moved them by at most 2e-6 here: AdamW divides by sqrt(v), so a nearly cancelling sum's rounding counts.
            torch.testing.assert_close(weights[key], single[key], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def resume_config(run_model: str = "tiny"):
    """The `odd` scenario's settings with a warm-up still rising (the scheduler state must resume too)."""
    cfg = scenarios()[0][1]
    return with_overrides(cfg, learner={"warmup_steps": 4, "threads": 1, "device": "cpu"},
                          run={"model": run_model})


def resume_batches():
    return [make_batch(tiny_groups(7)), make_batch(tiny_groups(8))]


def _save_sharded_rank(rank, port, run_dir, errors):
    """Two sharded ranks: one step, a collective save (rank 0 keeps the gathered state), then the next step."""
    def body(rank):
        cfg, data = resume_config(), resume_batches()
        state = build_state(tiny(), cfg.learner, sharded=True)
        train_step(state, data[0], cfg)
        ckpt.save_checkpoint(run_dir, state, collective=True)
        saved = trainer_state(state)
        with pytest.raises(ValueError, match="collective"):  # a lone rank holds half of each tensor
            ckpt.save_checkpoint(Path(run_dir) / "alone", state)
        train_step(state, data[1], cfg)
        after = whole_weights(state)
        if rank == 0:
            torch.save({"saved": saved, "after": after}, Path(run_dir) / "reference.pt")
    _in_group(rank, 2, port, errors, body)


def _resume_sharded_rank(rank, port, run_dir, errors):
    """Two sharded ranks started by the learner's own `build_learner` with --resume, then the next step."""
    from learner.train import build_learner

    def body(rank):
        cfg = resume_config()
        state = build_learner(cfg, Path(run_dir), True, torch.device("cpu"))
        assert state.sharded and state.version == 1
        loaded = trainer_state(state)
        train_step(state, resume_batches()[1], cfg)
        after = whole_weights(state)
        if rank == 0:
            torch.save({"loaded": loaded, "after": after}, Path(run_dir) / "resumed.pt")
    _in_group(rank, 2, port, errors, body)


def assert_close_weights(got, want):
    assert sorted(got) == sorted(want)
    for key in want:  # the sharded and the single-process step sum in another order: see the step test
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")


def perturbed_tiny():
    """The tiny model with other weights: whatever a resume restores must come from the checkpoint."""
    model = tiny()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)
    return model


@pytest.mark.integration
def test_sharded_checkpoint_resumes_on_one_process(tmp_path):
    torch.set_num_threads(1)
    port = free_port()
    codes, errors = run_ranks(_save_sharded_rank, lambda rank: (rank, port, tmp_path), 2, timeout_s=120)
    assert codes == [0, 0] and not errors, (codes, errors)
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    cfg = resume_config()
    state = build_state(perturbed_tiny(), cfg.learner)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), state)
    assert state.version == 1
    assert_same_state(trainer_state(state), reference["saved"])  # weights and AdamW moments, bit for bit
    train_step(state, resume_batches()[1], cfg)
    assert_close_weights(whole_weights(state), reference["after"])


@pytest.mark.integration
def test_single_process_checkpoint_resumes_on_two_sharded_ranks(tmp_path):
    torch.set_num_threads(1)
    cfg, data = resume_config(), resume_batches()
    state = build_state(tiny(), cfg.learner)
    train_step(state, data[0], cfg)
    ckpt.save_checkpoint(tmp_path, state)
    saved = trainer_state(state)
    train_step(state, data[1], cfg)
    port = free_port()
    codes, errors = run_ranks(_resume_sharded_rank, lambda rank: (rank, port, tmp_path), 2, timeout_s=120)
    assert codes == [0, 0] and not errors, (codes, errors)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert_same_state(resumed["loaded"], saved)
    assert_close_weights(resumed["after"], whole_weights(state))


@pytest.mark.integration
def test_activation_checkpointing_keeps_the_step_and_saves_fewer_tensors():
    """Per-layer recomputation in backward: the same step (fp32 on CPU: the recomputed forward is the same
    arithmetic), with the layers' activations not kept between forward and backward (the model is in eval mode,
    where Hugging Face's own gradient checkpointing does nothing)."""
    torch.set_num_threads(1)
    name, cfg, batch = scenarios()[0]
    results = {}
    for checkpointing in (False, True):
        state = build_state(tiny(), with_overrides(cfg, learner={"activation_checkpointing": checkpointing}).learner)
        mb = prepare_step(batch, cfg).mini_batches[0][0]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            state.policy(mb.input_ids, mb.attention_mask, mb.logit_index).sum().backward()
        train_step(state, batch, cfg)
        results[checkpointing] = (sum(saved), whole_weights(state))
    (kept_plain, plain), (kept_ckpt, ckpt_weights) = results[False], results[True]
    assert kept_ckpt < kept_plain / 2, (kept_ckpt, kept_plain)  # 4 layers: only their inputs stay
    assert_same_state(ckpt_weights, plain)


@pytest.mark.integration
def test_gpu_check_runs_its_fsdp_step_on_a_cpu():
    """scripts/gpu_check.sh check 4's Python part (scripts/fsdp_throughput.py) on the CPU, tiny Qwen2, one rank."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-smoke"], cwd=repo, capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 0 and "SUMMARY fsdp_cpu_smoke: ok" in out.stdout, (out.stdout + out.stderr)[-2000:]
    assert "tokens_per_s=" in out.stdout


@pytest.mark.unit
def test_activation_checkpointing_works_with_left_padding_and_the_models_cache_setting():
    """A Llama-architecture model whose config keeps `use_cache` on (SmolLM2's does): with padding in the attention
    mask, a layer recomputed in backward must not find its own keys already in a KV cache (the training forward
    builds none)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    assert config.use_cache
    torch.manual_seed(0)
    cfg = with_overrides(make_cfg(), learner={"activation_checkpointing": True})
    state = build_state(transformers.LlamaForCausalLM(config), cfg.learner)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as the learner packs prompts
    index = torch.arange(5, 9).expand(2, -1)
    state.policy(ids, mask, index).sum().backward()
    assert all(p.grad is not None for p in state.model.model.layers[0].parameters())
