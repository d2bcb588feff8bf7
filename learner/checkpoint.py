"""Atomic learner checkpoints under <run_dir>/checkpoints/step_<version>/, resumable at any number of ranks.

Each checkpoint holds `trainer/` (the model weights and the AdamW state, written with torch.distributed.checkpoint
(DCP) from `get_state_dict`: one `.distcp` file per writing rank plus `.metadata`), `trainer.pt` (scheduler,
version and RNG states: tensors, numbers and plain containers only, so it loads with `torch.load(weights_only=True)`)
and `meta.json`. DCP records every tensor by name and index range, so any number of ranks can read what they hold
whatever number of ranks wrote it, and the same code serves the replicated learner and an FSDP2-sharded one (whose
`get_state_dict` returns DTensor shards). An optimizer that has taken no step is saved without state: DCP would
otherwise create its moments with a zero step, and the resumed AdamW would count its first step as its second.

Two ways to save. `collective=False` (the replicated learner: rank 0 alone, or a single process) writes without a
process group. `collective=True` is called by every rank of the default group: each writes its share of the tensors
(replicated tensors once), then rank 0 alone writes trainer.pt and renames. Loading is the same: `collective=True`
when every rank loads together, `collective=False` when each process reads the full state on its own. The
sharded (FSDP) learner saves and loads collectively only (`state.sharded`; a rank alone holds part of each tensor).

The weights are not written a second time as safetensors: `learner.export` loads the model's part of `trainer/`
straight into a model built from the run's base model (DCP reads a subset of keys without reading the AdamW
state), so a checkpoint costs no extra disk, while `dcp_to_torch_save` would first copy everything, optimizer
included, into one torch file. Checkpoints of the previous format (`model.safetensors` + `trainer.pt` holding the
optimizer) still load, for resuming older runs.

A checkpoint is written into a hidden temporary directory, flushed to disk and renamed into place with
`os.replace`, so a directory named `step_*` is always complete: a crash mid-write leaves a `.tmp-*` directory that
is ignored (and removed by the next save), and the previous checkpoint stays the latest. Older checkpoints are
deleted only after the new one is in place (the newest `keep` stay).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model

from learner.step import LearnerState

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINER_DIR = "trainer"
"""The DCP directory of a checkpoint: model weights under `model.`, AdamW state under `optimizer.`."""
FORMAT = 2


def _fsync_tree(path: Path) -> None:
    """Flush the files of `path` and its sub-directories, and the directory entries (so a later rename is durable)."""
    for file in path.iterdir():
        if file.is_dir():
            _fsync_tree(file)
        elif file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_trainer_state(path: Path, state: LearnerState) -> None:
    """Scheduler, version and RNG states; the weights and the AdamW state are in the DCP directory."""
    torch.save({"format": FORMAT, "optimizer_in_dcp": bool(state.optimizer.state),
                "scheduler": state.scheduler.state_dict(), "version": state.version, "rng": rng_state()}, path)


def _distinct(model_state: dict[str, Any]) -> dict[str, Any]:
    """`model_state` without the later names of a tied tensor (lm_head.weight = embed_tokens.weight): DCP would
    store it once per name, and loading the first name in place fills the shared storage of both."""
    seen, out = set(), {}
    for name, value in model_state.items():
        local = getattr(value, "_local_tensor", value)  # an FSDP2 DTensor's shard on this rank
        if isinstance(local, torch.Tensor) and local.numel() > 0:
            where = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
            if where in seen:
                continue
            seen.add(where)
        out[name] = value
    return out


def _dcp_state(state: LearnerState) -> dict[str, Any]:
    """What DCP saves: the model and, once AdamW has taken a step, its state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not state.optimizer.state:
        return {"model": _distinct(get_model_state_dict(state.model))}
    model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
    return {"model": _distinct(model_state), "optimizer": optimizer_state}


def _load_model_part(loaded: dict[str, Any], path: Path, collective: bool) -> None:
    """DCP-load into `loaded` (in place), reading each tied tensor once."""
    model_state = loaded["model"]
    loaded["model"] = _distinct(model_state)
    _dcp("load", loaded, path, collective)
    model_state.update(loaded["model"])
    loaded["model"] = model_state


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (each failing rank's error in the message)."""


def _check_collective(state: LearnerState, collective: bool, action: str) -> None:
    """A sharded learner's rank holds a part of each tensor: alone it would write or fill only that part."""
    if state.sharded and not collective:
        raise ValueError(f"{action} a sharded (FSDP) learner needs collective=True, called on every rank")


def _dcp(action: str, state_dict: dict[str, Any], path: Path, collective: bool) -> None:
    """dcp.save or dcp.load (`action`). DCP raises a CheckpointException, a BaseException that `except Exception`
    handlers would not see, so it becomes a CheckpointError. Without `collective` DCP warns on every call that it
    runs in one process, which is what was asked for here. Imported here: DCP adds seconds to the learner's start."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            getattr(dcp, action)(state_dict, checkpoint_id=path, no_dist=not collective)
        except CheckpointException as exc:
            failures = "; ".join(f"rank {rank}: {error[0] if isinstance(error, tuple) else error!r}"
                                 for rank, error in sorted(exc.failures.items()))
            raise CheckpointError(f"{path}: {failures}") from None


def _from_rank0(value: Any, collective: bool) -> Any:
    if not collective:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(run_dir: str | Path, state: LearnerState, keep: int = 2, collective: bool = False) -> Path:
    """Write the checkpoint of `state.version` atomically; returns its directory.

    collective=True: every rank of the default process group calls this; each writes its share of the tensors into
    rank 0's temporary directory, then rank 0 writes the rest and renames it into place. A sharded learner
    (`state.sharded`) must save collectively."""
    _check_collective(state, collective, "saving")
    lead = not collective or dist.get_rank() == 0
    root = checkpoint_dir(run_dir)
    final = root / f"step_{state.version:08d}"
    tmp = None
    if lead and not final.exists():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-step_{state.version:08d}-{os.getpid()}"
        tmp.mkdir()
    tmp = _from_rank0(tmp, collective)
    if tmp is None:
        return final  # the same version: identical weights and optimizer state are already on disk
    _dcp("save", _dcp_state(state), tmp / TRAINER_DIR, collective)
    if not collective:
        _complete(tmp, final, state, keep, writers=1)
        return final
    failure = None
    if lead:
        try:
            _complete(tmp, final, state, keep, writers=dist.get_world_size())
        except BaseException as exc:  # re-raised below, after the other ranks were told (they wait for rank 0)
            failure = exc
    told = _from_rank0(None if failure is None else repr(failure), collective)
    if failure is not None:
        raise failure
    if told is not None:
        raise RuntimeError(f"checkpoint {final}: rank 0 could not complete it: {told}")
    return final


def _complete(tmp: Path, final: Path, state: LearnerState, keep: int, writers: int) -> None:
    """Rank 0, after every rank wrote its tensors: the small files, flush, rename, drop the oldest checkpoints."""
    write_trainer_state(tmp / "trainer.pt", state)
    (tmp / "meta.json").write_text(json.dumps({"version": state.version, "time": time.time(), "format": FORMAT,
                                               "writers": writers}) + "\n")
    _fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_weights(path: str | Path, model: torch.nn.Module, collective: bool = False) -> None:
    """Only the model weights of checkpoint `path` (either format) into `model`; the AdamW state is not read."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    path = Path(path)
    if (path / TRAINER_DIR).is_dir():
        loaded = {"model": get_model_state_dict(model)}
        _load_model_part(loaded, path / TRAINER_DIR, collective)
        set_model_state_dict(model, loaded["model"])
        return
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} holds neither {TRAINER_DIR}/ nor model.safetensors: not a checkpoint")
    device = next(model.parameters()).device
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))


def load_checkpoint(path: str | Path, state: LearnerState, collective: bool = False) -> None:
    """Restore weights, optimizer, scheduler, version and RNG states into `state` (built the same way).

    collective=True: every rank of the default process group loads together; False: this process reads alone.
    A checkpoint of the previous format (model.safetensors, optimizer inside trainer.pt) loads as well. A sharded
    learner (`state.sharded`) must load collectively."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _check_collective(state, collective, "loading into")
    path = Path(path)
    # The optimizer moves its state onto the parameters' device itself; RNG states must stay on the CPU.
    trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    if "optimizer" in trainer:  # the previous format
        load_weights(path, state.model)
        state.optimizer.load_state_dict(trainer["optimizer"])
    elif trainer["optimizer_in_dcp"]:
        # get_state_dict gives a fresh AdamW zero moments to load into (state the checkpoint then overwrites)
        loaded = dict(zip(("model", "optimizer"), get_state_dict(state.model, state.optimizer)))
        _load_model_part(loaded, path / TRAINER_DIR, collective)
        set_state_dict(state.model, state.optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
    else:  # saved before the first step: AdamW starts without state, as it did then
        load_weights(path, state.model, collective)
        state.optimizer.state.clear()
    state.scheduler.load_state_dict(trainer["scheduler"])
    for group, lr in zip(state.optimizer.param_groups, state.scheduler.get_last_lr()):
        group["lr"] = lr
    state.version = int(trainer["version"])
    set_rng_state(trainer["rng"])
