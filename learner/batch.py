"""From a buffer `Batch` to padded training tensors.

`rollouts_from_batch` flattens the served groups into one entry per response (groups stay consecutive, so
`group_sizes` describes the layout the advantage functions expect). `split_groups` cuts them into optimizer
mini-batches along group boundaries, and `pack_micro_batches` packs a mini-batch into forward/backward
micro-batches under the `learner.micro_batch_tokens` budget (rows x padded length).

A micro-batch holds right-padded prompt+response sequences `input_ids` [B, L] with `attention_mask`, and, aligned
to *response positions* [B, R] (R = longest response): the sampled `targets`, the response `mask`, the behaviour
log-probs `behav_logp`, and `logit_index`, the sequence position whose logits predict each response token
(prompt_len - 1 + j). The model's hidden states are gathered at `logit_index` before the LM head, so only
response positions ever get vocabulary-sized logits.

With `shared_prompts` (`learner.shared_prompt_forward`, the default) a micro-batch holds each of its prompts once:
`prompt_ids` [U, P] (right-padded) with `prompt_mask`, and `owner` [B], the prompt row of each response. The
policy runs the prompts, then the responses as a continuation of their prompt's KV cache (learner/step.py,
`ResponseLogits`), so a group of n samples costs one prompt forward and backward instead of n. Packing keeps a
group's samples together; a group over the budget is split, each part carrying the prompt once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.schemas import Batch


@dataclass
class Rollouts:
    """One entry per response, groups consecutive in `group_sizes` order."""

    prompts: list[np.ndarray]
    responses: list[np.ndarray]
    behav_logprobs: list[np.ndarray]
    rewards: Tensor  # [S] float32
    correct: Tensor  # [S] bool
    lengths: Tensor  # [S] int64, response tokens
    truncated: Tensor  # [S] bool, finish_reason == "length"
    group_sizes: list[int]
    staleness: list[int]  # per group

    @property
    def num_samples(self) -> int:
        return len(self.responses)

    def sample_slices(self) -> list[slice]:
        """The slice of samples belonging to each group."""
        bounds = np.cumsum([0, *self.group_sizes])
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def select_groups(self, keep: list[int]) -> "Rollouts":
        """The rollouts of the groups with these indices, in this order."""
        slices = self.sample_slices()
        idx = [i for g in keep for i in range(slices[g].start, slices[g].stop)]
        index = torch.as_tensor(idx, dtype=torch.long)
        return Rollouts(
            prompts=[self.prompts[i] for i in idx], responses=[self.responses[i] for i in idx],
            behav_logprobs=[self.behav_logprobs[i] for i in idx], rewards=self.rewards[index],
            correct=self.correct[index], lengths=self.lengths[index], truncated=self.truncated[index],
            group_sizes=[self.group_sizes[g] for g in keep], staleness=[self.staleness[g] for g in keep])


def rollouts_from_batch(batch: Batch) -> Rollouts:
    """Decode and check every sample of the batch (a malformed array raises WireError naming the field)."""
    prompts, responses, logprobs, rewards, correct, truncated, sizes, staleness = [], [], [], [], [], [], [], []
    for served in batch.groups:
        prompt = served.group.prompt_array().astype(np.int64)
        if prompt.size == 0:
            raise ValueError(f"group {served.group.prompt_id}: empty prompt (the first token needs a context)")
        for sample in served.group.samples:
            tokens, behav, _ = sample.arrays()
            prompts.append(prompt)
            responses.append(tokens.astype(np.int64))
            logprobs.append(behav.astype(np.float32))
            rewards.append(sample.reward)
            correct.append(sample.correct)
            truncated.append(sample.finish_reason == "length")
        sizes.append(len(served.group.samples))
        staleness.append(served.staleness)
    return Rollouts(prompts=prompts, responses=responses, behav_logprobs=logprobs,
                    rewards=torch.tensor(rewards, dtype=torch.float32), correct=torch.tensor(correct, dtype=torch.bool),
                    lengths=torch.tensor([len(r) for r in responses], dtype=torch.long),
                    truncated=torch.tensor(truncated, dtype=torch.bool), group_sizes=sizes, staleness=staleness)


def split_groups(num_groups: int, parts: int) -> list[list[int]]:
    """Group indices cut into `parts` consecutive, near-equal, non-empty chunks (fewer if there are fewer groups)."""
    return [chunk.tolist() for chunk in np.array_split(np.arange(num_groups), min(parts, num_groups)) if chunk.size]


@dataclass
class MicroBatch:
    """Padded tensors of one forward/backward pass: the [B, R] response grid, and either the [B, L] sequence grid
    (input_ids, attention_mask, logit_index) or each prompt once (prompt_ids, prompt_mask, owner)."""

    targets: Tensor  # [B, R] int64: response tokens (0 at padding)
    mask: Tensor  # [B, R] bool: valid response tokens
    behav_logp: Tensor  # [B, R] float32: behaviour log-probs (0 at padding)
    adv: Tensor  # [B] float32: sequence advantages
    sample_index: Tensor  # [B] int64: row of each sequence in its mini-batch's Rollouts
    input_ids: Tensor | None = None  # [B, L] int64, right-padded with 0
    attention_mask: Tensor | None = None  # [B, L] int64
    logit_index: Tensor | None = None  # [B, R] int64: position whose logits predict response token j
    prompt_ids: Tensor | None = None  # [U, P] int64: the distinct prompts, right-padded with 0
    prompt_mask: Tensor | None = None  # [U, P] int64
    owner: Tensor | None = None  # [B] int64: prompt row of each response
    prox_logp: Tensor | None = None  # [B, R] pi_prox log-probs when they differ from the current weights

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def sequence_tokens(self) -> int:
        """Prompt + response tokens of every sample (padding excluded), whether or not prompts are shared."""
        if self.owner is None:
            return int(self.attention_mask.sum())
        return int(self.prompt_mask.sum(1)[self.owner].sum()) + int(self.mask.sum())

    def to(self, device: torch.device | str) -> "MicroBatch":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def _rows_by_budget(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Greedy packing of rows (longest first) so that rows x longest length <= budget (one row minimum)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    for i in order:
        if packs and (len(packs[-1]) + 1) * lengths[packs[-1][0]] <= token_budget:
            packs[-1].append(i)
        else:
            packs.append([i])
    return packs


def pack_micro_batches(rollouts: Rollouts, adv: Tensor, token_budget: int,
                       shared_prompts: bool = False) -> list[MicroBatch]:
    """Micro-batches under `token_budget` padded tokens each (a longer sequence goes alone): whole sequences, or
    with `shared_prompts` groups' samples in order with each prompt once (see the module docstring)."""
    if shared_prompts:
        return [_pad_shared(rollouts, adv, rows) for rows in _rows_by_group(rollouts, token_budget)]
    seq_lengths = [len(p) + len(r) for p, r in zip(rollouts.prompts, rollouts.responses)]
    return [_pad_rows(rollouts, adv, rows) for rows in _rows_by_budget(seq_lengths, token_budget)]


def _rows_by_group(rollouts: Rollouts, token_budget: int) -> list[list[int]]:
    """Consecutive rows (groups stay together) while the padded cost, distinct prompts x longest prompt + rows x
    longest response, stays <= budget (one row minimum)."""
    packs: list[list[int]] = []
    pack: list[int] = []
    groups, prompt_len, response_len = 0, 0, 0
    for rows in rollouts.sample_slices():
        for i in range(rows.start, rows.stop):
            new_group = not pack or i == rows.start
            p = max(prompt_len, len(rollouts.prompts[i]))
            r = max(response_len, len(rollouts.responses[i]), 1)
            if pack and (groups + new_group) * p + (len(pack) + 1) * r > token_budget:
                packs.append(pack)
                pack, groups, new_group = [], 0, True
                p, r = len(rollouts.prompts[i]), max(len(rollouts.responses[i]), 1)
            pack.append(i)
            groups, prompt_len, response_len = groups + new_group, p, r
    return packs + ([pack] if pack else [])


def _response_grid(rollouts: Rollouts, adv: Tensor, rows: list[int]) -> dict[str, Tensor]:
    """The [B, R] response grid of a micro-batch (targets, mask, behaviour log-probs) and its per-row fields."""
    resp_len = max(1, max(len(rollouts.responses[i]) for i in rows))
    targets = torch.zeros(len(rows), resp_len, dtype=torch.long)
    mask = torch.zeros(len(rows), resp_len, dtype=torch.bool)
    behav = torch.zeros(len(rows), resp_len, dtype=torch.float32)
    for b, i in enumerate(rows):
        r = len(rollouts.responses[i])
        targets[b, :r] = torch.from_numpy(rollouts.responses[i])
        mask[b, :r] = True
        behav[b, :r] = torch.from_numpy(rollouts.behav_logprobs[i])
    index = torch.as_tensor(rows, dtype=torch.long)
    return dict(targets=targets, mask=mask, behav_logp=behav, adv=adv[index].float(), sample_index=index)


def _pad_shared(rollouts: Rollouts, adv: Tensor, rows: list[int]) -> MicroBatch:
    prompt_row: dict[bytes, int] = {}
    firsts: list[int] = []  # the first row of each distinct prompt, in prompt-row order
    owner: list[int] = []
    for i in rows:
        key = rollouts.prompts[i].tobytes()
        if key not in prompt_row:
            prompt_row[key] = len(firsts)
            firsts.append(i)
        owner.append(prompt_row[key])
    prompt_len = max(len(rollouts.prompts[i]) for i in firsts)
    prompt_ids = torch.zeros(len(firsts), prompt_len, dtype=torch.long)
    prompt_mask = torch.zeros(len(firsts), prompt_len, dtype=torch.long)
    for u, i in enumerate(firsts):
        prompt_ids[u, :len(rollouts.prompts[i])] = torch.from_numpy(rollouts.prompts[i])
        prompt_mask[u, :len(rollouts.prompts[i])] = 1
    return MicroBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, owner=torch.as_tensor(owner, dtype=torch.long),
                      **_response_grid(rollouts, adv, rows))


def _pad_rows(rollouts: Rollouts, adv: Tensor, rows: list[int]) -> MicroBatch:
    seq_len = max(len(rollouts.prompts[i]) + len(rollouts.responses[i]) for i in rows)
    resp_len = max(1, max(len(rollouts.responses[i]) for i in rows))
    input_ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    attention = torch.zeros(len(rows), seq_len, dtype=torch.long)
    logit_index = torch.zeros(len(rows), resp_len, dtype=torch.long)
    for b, i in enumerate(rows):
        prompt, response = rollouts.prompts[i], rollouts.responses[i]
        p, r = len(prompt), len(response)
        input_ids[b, :p] = torch.from_numpy(prompt)
        input_ids[b, p:p + r] = torch.from_numpy(response)
        attention[b, :p + r] = 1
        # Padding positions point at the last prompt position: a valid index whose value is masked out.
        logit_index[b] = p - 1 + torch.arange(resp_len).clamp(max=max(r - 1, 0))
    return MicroBatch(input_ids=input_ids, attention_mask=attention, logit_index=logit_index,
                      **_response_grid(rollouts, adv, rows))
