"""HFEngine: batched sampling with a transformers model in-process (CPU or GPU), returning behaviour log-probs.

Its own decode loop instead of `model.generate`, because RL needs, per sampled token, the log-prob under the
sampling distribution and the policy version that produced it, and because weights can be swapped between decode
steps. Each batch: left-padded prompts with an attention mask and position ids, one prefill, then one forward per
new token through a DynamicCache. The prefill runs once per distinct prompt of the batch, and its KV-cache rows are
copied to each of that prompt's samples: a group of n samples costs one prompt forward, not n (what SGLang's
shared-prefix cache does for it). The log-prob of a sampled token is log_softmax(logits / temperature) taken before
top-p filtering (SGLang's convention, so both engines feed the learner the same quantity). A row that samples a
stop token is finished: later tokens are not recorded, and the batch is compacted (rows dropped from the KV cache)
once enough rows have finished. Batches hold at most `max_batch_sequences` sequences. Sampling uses a seeded
torch.Generator, so a run is reproducible for a fixed seed, batch composition and dtype.

    engine = HFEngine.from_config(cfg)          # loads cfg.run.model at cfg.actor.dtype on cfg.actor.device
    samples = engine.generate([[1, 2, 3]], [4], SamplingParams(max_new_tokens=8))
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np
import torch

from actor.engines.base import GeneratedSample, SamplingParams
from common.models import kv_cache_kwargs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Compact the batch when fewer than this fraction of its rows are still generating; copying the KV cache on
# every single finished row would cost more than the wasted compute it saves.
_COMPACT_BELOW = 0.75


class EngineError(RuntimeError):
    """Generation failed; the batch's prompts should be released."""


def stop_token_ids_of(tokenizer: Any, model: Any | None = None) -> tuple[int, ...]:
    """EOS ids from the tokenizer and the model's generation config (chat models often end turns with both)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return tuple(sorted(ids))


class HFEngine:
    """Engine protocol over a causal LM; thread-safe between `generate` (decode steps) and `load_weights`."""

    def __init__(self, model: Any, *, pad_token_id: int, max_batch_sequences: int = 64, seed: int = 0,
                 policy_version: int = 0):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.pad_token_id = int(pad_token_id)
        self.max_batch_sequences = int(max_batch_sequences)
        self.policy_version = int(policy_version)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._params = dict(model.state_dict(keep_vars=True))
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Any, seed: int | None = None) -> "HFEngine":
        from common.models import load_model, load_tokenizer, resolve_device

        tokenizer = load_tokenizer(cfg.run.model)
        model = load_model(cfg.run.model, dtype=_DTYPES[cfg.actor.dtype], device=resolve_device(cfg.actor.device))
        engine = cls(model, pad_token_id=tokenizer.pad_token_id, max_batch_sequences=cfg.actor.max_batch_sequences,
                     seed=cfg.run.seed if seed is None else seed)
        engine.tokenizer = tokenizer
        engine.stop_token_ids = stop_token_ids_of(tokenizer, model)
        return engine

    # ------------------------------------------------------------------------------------------ Engine API

    def generate(self, prompt_token_ids: list[list[int]], n: list[int],
                 sampling: SamplingParams) -> list[list[GeneratedSample]]:
        if len(prompt_token_ids) != len(n):
            raise ValueError(f"generate: {len(prompt_token_ids)} prompts but {len(n)} sample counts")
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate: empty prompt")
        if self._closed:
            raise EngineError("generate: engine is closed")
        generator = self._generator
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        owners = [i for i, count in enumerate(n) for _ in range(count)]
        results: list[list[GeneratedSample]] = [[] for _ in prompt_token_ids]
        for start in range(0, len(owners), self.max_batch_sequences):
            chunk = owners[start:start + self.max_batch_sequences]
            samples = self._sample_batch([prompt_token_ids[i] for i in chunk], sampling, generator)
            for owner, sample in zip(chunk, samples):
                results[owner].append(sample)
        return results

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy tensors into the model's parameters in place (between decode steps), then set policy_version."""
        unknown = [name for name in state_dict if name not in self._params]
        if unknown:
            raise KeyError(f"load_weights: names not in the model: {unknown[:5]}")
        with self._lock:
            for name, tensor in state_dict.items():
                target = self._params[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"load_weights: {name} has shape {tuple(tensor.shape)}, model has "
                                     f"{tuple(target.shape)}")
                target.copy_(tensor)
            self.policy_version = int(version)

    def state_dict_template(self) -> dict[str, torch.Tensor]:
        """name -> tensor (shapes/dtypes) of everything load_weights accepts."""
        return {name: t.detach() for name, t in self.model.state_dict().items()}

    def pause(self) -> None:
        """Decode loops block before their next step until resume()."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def health(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
        self._running.set()

    # ------------------------------------------------------------------------------------------ decoding

    def _sample_batch(self, prompts: list[list[int]], sampling: SamplingParams,
                      generator: torch.Generator) -> list[GeneratedSample]:
        from transformers import DynamicCache

        batch, steps, dev = len(prompts), sampling.max_new_tokens, self.device
        distinct: dict[tuple[int, ...], int] = {}
        owner = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=dev)  # [B]
        input_ids, attention_mask = self._left_pad([list(p) for p in distinct])   # [U, L], [U, L]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)            # [U, L]
        cache = DynamicCache()
        logits, version = self._forward(input_ids, attention_mask, position_ids, cache)      # [U, V]
        if len(distinct) < batch:  # each sample continues from a copy of its prompt's cache rows
            cache.batch_select_indices(owner)
        logits, attention_mask, position_ids = logits[owner], attention_mask[owner], position_ids[owner]
        rows = torch.arange(batch, device=dev)              # [b] original index of each row still in the batch
        active = torch.ones(batch, dtype=torch.bool, device=dev)               # [b] row has not stopped yet
        tokens = torch.full((batch, steps), self.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=dev)
        versions = torch.zeros(batch, steps, dtype=torch.int32, device=dev)
        lengths = torch.zeros(batch, dtype=torch.long, device=dev)
        stopped = torch.zeros(batch, dtype=torch.bool, device=dev)
        stop_ids = torch.tensor(sampling.stop_token_ids or [-1], device=dev)
        for step in range(steps):
            if step:
                logits, version = self._forward(next_input, attention_mask, position_ids, cache)   # [b, V]
            token, logprob = _sample(logits, sampling, generator)                              # [b], [b]
            live_rows = rows[active]
            tokens[live_rows, step] = token[active]
            logprobs[live_rows, step] = logprob[active]
            versions[live_rows, step] = version
            lengths[live_rows] = step + 1
            done = active & torch.isin(token, stop_ids)
            stopped[rows[done]] = True
            active = active & ~done
            if not bool(active.any()):
                break
            # Stopped rows ride along (fed padding, never recorded) until enough of them justify a compaction.
            next_input = torch.where(active, token, self.pad_token_id)[:, None]                # [b, 1]
            attention_mask = torch.cat([attention_mask, active[:, None].long()], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            if int(active.sum()) < _COMPACT_BELOW * len(rows):
                keep = active.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, active, attention_mask = rows[keep], active[keep], attention_mask[keep]
                position_ids, next_input = position_ids[keep], next_input[keep]
        tokens, logprobs, versions = tokens.cpu().numpy(), logprobs.cpu().numpy(), versions.cpu().numpy()
        lengths, stopped = lengths.cpu().tolist(), stopped.cpu().tolist()
        return [GeneratedSample(token_ids=tokens[i, :lengths[i]].astype(np.int32),
                                logprobs=logprobs[i, :lengths[i]].astype(np.float32),
                                versions=versions[i, :lengths[i]].astype(np.int32),
                                finish_reason="stop" if stopped[i] else "length")
                for i in range(batch)]

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, int]:
        """Last-position logits [b, V] (float32) and the policy version of the weights that produced them."""
        self._running.wait()
        with self._lock, torch.no_grad():
            if self._closed:
                raise EngineError("generate: engine closed during generation")
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **kv_cache_kwargs(self.model, cache))
            return out.logits[:, -1, :].float(), self.policy_version


def _sample(logits: torch.Tensor, sampling: SamplingParams,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled token [b] and its log-prob [b] at the sampling temperature, before top-p renormalisation."""
    if sampling.temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)                              # [b, V]
        token = logits.argmax(dim=-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)
    scaled = logits / sampling.temperature                                    # [b, V]
    logp = torch.log_softmax(scaled, dim=-1)
    if sampling.top_p < 1.0:
        scaled = _top_p_filter(scaled, sampling.top_p)
    probs = torch.softmax(scaled, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)      # [b]
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _top_p_filter(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest set of mass >= top_p set to -inf (the top token always stays)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs                  # mass of strictly better tokens
    remove_sorted = mass_before >= top_p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return scaled.masked_fill(remove, float("-inf"))
