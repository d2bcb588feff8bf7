"""Model loading: the tiny model is built once and bit-identical everywhere; SmolLM2 converts once and reloads fast."""

import time
from pathlib import Path

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
def test_smollm2_converts_once_then_loads_fast_and_answers(tmp_path):
    # A cache of its own, so the GGUF conversion of a clean install runs every time (~30 s): with the shared cache
    # built once, a missing conversion requirement (transformers reads GGUF only with accelerate) went unnoticed.
    resolve_model_path("smollm2", tmp_path)
    start = time.monotonic()
    model = load_model("smollm2", dtype=torch.float32, device="cpu", cache_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    tok = load_tokenizer("smollm2", cache_dir=tmp_path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1]:])


# ---------------------------------------------------------------------------------------------- hub models

HUB_ID = "Qwen/Qwen2.5-Math-1.5B"


@pytest.fixture
def online_hub(tmp_path, monkeypatch):
    """An online hub (HF_HUB_OFFLINE off) served by tests/hub_double.py from the tiny model, cache in tmp_path."""
    import huggingface_hub
    from huggingface_hub import constants

    from tests.hub_double import make_snapshot_download

    calls = tmp_path / "calls.log"
    calls.touch()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_model_path("tiny")  # the shared cache: built once per machine
    monkeypatch.setattr(huggingface_hub, "snapshot_download", make_snapshot_download(source, calls))
    return calls


@pytest.mark.unit
def test_hub_model_downloads_when_online_then_loads_from_the_cache(online_hub, tmp_path):
    path = resolve_model_path(HUB_ID, tmp_path / "dynamo")
    assert path == tmp_path / "hub" / "models--Qwen--Qwen2.5-Math-1.5B" / "snapshots" / path.name
    assert (path / "config.json").is_file()
    # The second resolve finds the host's marker: no second download, no network call at all.
    assert resolve_model_path(HUB_ID, tmp_path / "dynamo") == path
    lines = online_hub.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"download {HUB_ID}") and "original/*" in lines[0]


@pytest.mark.unit
def test_offline_hub_reads_only_the_cache_and_names_the_reason(online_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"Qwen/Qwen2.5-Math-1.5B.*offline \(HF_HUB_OFFLINE\)"):
        resolve_model_path(HUB_ID, tmp_path / "dynamo")
    assert online_hub.read_text().split()[0] == "cache"  # asked the cache only, never downloaded


@pytest.mark.unit
def test_check_model_loads_config_and_tokenizer_and_refuses_a_broken_model(tmp_path):
    from common.models import check_model

    info = check_model("tiny")
    assert (info.model_type, info.context, info.vocabulary) == ("llama", 512, 61)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config or tokenizer cannot be loaded") as exc:
        check_model(str(broken))
    assert "\n" not in str(exc.value)


_DOWNLOAD_SCRIPT = """
import sys, time
from pathlib import Path
import huggingface_hub
from tests.hub_double import make_snapshot_download
calls, source = Path(sys.argv[1]), Path(sys.argv[2])
huggingface_hub.snapshot_download = make_snapshot_download(source, calls, delay_s=2.0)
from common.models import resolve_model_path
print("ready", flush=True)
while not (calls.parent / "go").exists():  # both processes have imported everything: start together
    time.sleep(0.05)
path = resolve_model_path("Qwen/Qwen2.5-Math-1.5B")
print(path, time.time(), flush=True)
"""


@pytest.mark.integration
def test_two_processes_of_a_host_download_once(tmp_path):
    # Both start at once against an empty cache: one downloads (2 s), the other waits on the lock and then finds
    # the finished snapshot; the double counts one download in total.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = resolve_model_path("tiny")  # the shared cache: built once per machine
    calls = tmp_path / "calls.log"
    calls.touch()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "PYTHONPATH": str(root)}
    env.pop("HF_HUB_CACHE", None)
    procs = [subprocess.Popen([sys.executable, "-c", _DOWNLOAD_SCRIPT, str(calls), str(source)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.split()[0] for out, _ in outs}
    assert paths == {str(tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-Math-1.5B" / "snapshots"
                         / "0123456789abcdef0123456789abcdef01234567")}
    assert [line.split()[0] for line in calls.read_text().splitlines()] == ["download"]
    stderr = "".join(err for _, err in outs)
    assert stderr.count("downloading into") == 1 and stderr.count("is downloading it; waiting") == 1


@pytest.mark.unit
@pytest.mark.parametrize("name", ["not a model", "../../x", "a\x00b"])
def test_a_name_that_is_neither_a_directory_nor_a_hub_id_is_refused_before_any_cache_file(online_hub, tmp_path,
                                                                                          name):
    with pytest.raises(ModelError, match="a local directory or a valid hub id"):
        resolve_model_path(name, tmp_path / "dynamo")
    assert online_hub.read_text() == "" and not (tmp_path / "hub").exists()  # no lock file, no hub call


def test_native_bf16_probe_agrees_with_the_cpu_flags():
    """cpu_has_native_bf16 is what decides the bf16 warning; on Linux x86 it must agree with the kernel's CPU flags."""
    from common.models import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "flags" not in cpuinfo.read_text():
        pytest.skip("no x86 /proc/cpuinfo flags here")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_bf16_on_a_cpu_without_bf16_instructions_is_a_warning_naming_the_fields(monkeypatch):
    import common.models
    from common.config import PRESETS, with_overrides
    from common.plan import dtype_warnings

    cfg = with_overrides(PRESETS["cpu-demo"](), actor={"dtype": "bfloat16", "device": "cpu"},
                         learner={"dtype": "bfloat16", "device": "cpu"})
    monkeypatch.setattr(common.models, "cpu_has_native_bf16", lambda: False)
    [line] = dtype_warnings(cfg)
    assert "actor.dtype, learner.dtype bfloat16" in line and "--actor.dtype float32 --learner.dtype float32" in line
    fp32_learner = with_overrides(cfg, learner={"dtype": "float32"})
    assert "learner" not in dtype_warnings(fp32_learner)[0]
    assert dtype_warnings(with_overrides(fp32_learner, actor={"dtype": "float32"})) == []
    monkeypatch.setattr(common.models, "cpu_has_native_bf16", lambda: True)
    assert dtype_warnings(cfg) == []
