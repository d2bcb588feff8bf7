"""How the learner's model is laid out over its ranks: FSDP2 sharding and per-layer activation checkpointing.

`prepare_policy(policy, cfg, sharded)` is applied once, after the float32 master weights are loaded and before
the optimizer is built (the optimizer must see the sharded parameters):

- `learner.activation_checkpointing`: each decoder layer keeps only its input in forward and recomputes its
  activations in backward (`torch.distributed._composable.checkpoint`: hooks, no wrapper module, so parameter
  names, checkpoints and the weight broadcast see the same model). It works in eval mode, where the Hugging Face
  layers' own `gradient_checkpointing_enable` does nothing, and the learner's model stays in eval mode.
- `sharded` (the learner on more than one rank with `learner.sharding = "fsdp"`): `fully_shard` on each decoder
  layer, then on the `ResponseLogits` wrapper as the root, over a 1-D mesh of every rank of the default group.
  The root is the wrapper, not the Hugging Face model, because the learner calls the base model and the output
  embedding separately (learner/step.py) and FSDP unshards a unit's parameters only when that unit's forward runs.
  The root holds the embeddings, the final norm and the LM head, so a tied LM head (SmolLM2, the tiny model,
  Qwen2.5-0.5B) stays one parameter. Each rank keeps 1/world of every float32 weight, gradient and AdamW moment;
  forward and backward all-gather one layer at a time in `learner.dtype` (MixedPrecisionPolicy), and gradients
  are reduce-scattered in float32 as a SUM (the losses already divide by the global denominators), not FSDP's
  default mean.
- `learner.cpu_offload` (GPU only): FSDP's CPUOffloadPolicy keeps the sharded weights, gradients and AdamW state
  in pinned host memory and runs the optimizer step on the CPU.

Decoder layers are found generically: the `nn.ModuleList` of the Hugging Face base model (`model.model.layers`
for Llama/SmolLM2 and Qwen2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from common.config import ConfigError, LearnerConfig


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM: the largest ModuleList directly on its base model."""
    base = model.base_model
    lists = [child for child in base.children() if isinstance(child, nn.ModuleList) and len(child) > 0]
    if not lists:
        raise ValueError(f"{type(base).__name__} has no ModuleList of decoder layers")
    return max(lists, key=len)


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed._composable import checkpoint

    for layer in decoder_layers(model):
        checkpoint(layer)


def check_sharding(cfg: LearnerConfig, device: torch.device, sharded: bool) -> None:
    """Refuse settings this process cannot honour, naming the field."""
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError(f"learner.cpu_offload: needs the learner on a GPU, it runs on {device}")
    if cfg.cpu_offload and not sharded:
        raise ConfigError("learner.cpu_offload: needs the FSDP learner (WORLD_SIZE > 1 with learner.sharding fsdp)")


def shard_policy(policy: nn.Module, cfg: LearnerConfig, device: torch.device) -> None:
    """fully_shard every decoder layer, then the `ResponseLogits` root, over all ranks of the default group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, \
        fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    compute = getattr(torch, cfg.dtype)
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
                   offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy())
    for layer in decoder_layers(policy.model):
        fully_shard(layer, **options)
    fully_shard(policy, **options)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            # SUM, not mean; forcing SUM avoids PREMUL_SUM, which gloo does not have
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def prepare_policy(policy: nn.Module, cfg: LearnerConfig, device: torch.device, sharded: bool) -> None:
    check_sharding(cfg, device, sharded)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(policy.model)
    if sharded:
        shard_policy(policy, cfg, device)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def set_gradient_sync(policy: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (off: they accumulate unsharded on this rank)."""
    if is_sharded(policy):
        policy.set_requires_gradient_sync(enabled)
