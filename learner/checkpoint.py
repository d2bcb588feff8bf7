"""Atomic learner checkpoints under <run_dir>/checkpoints/step_<version>/.

Each checkpoint holds `model.safetensors` (weights; tied tensors stored once), `trainer.pt` (optimizer, scheduler,
version and RNG states: tensors, numbers and plain containers only, so it loads with
`torch.load(weights_only=True)`), and `meta.json`. It is written into a hidden temporary directory, flushed to
disk, and renamed into place with `os.replace`, so a directory named `step_*` is always complete: a crash
mid-write leaves a `.tmp-*` directory that is ignored (and removed by the next save), and the previous checkpoint
stays the latest. Older checkpoints are deleted only after the new one is in place (the newest `keep` stay).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

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


def _fsync_tree(path: Path) -> None:
    """Flush the files of `path` and the directory entry itself (so a rename after it is durable)."""
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_trainer_state(path: Path, state: LearnerState) -> None:
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "version": state.version, "rng": rng_state()}, path)


def save_checkpoint(run_dir: str | Path, state: LearnerState, keep: int = 2) -> Path:
    """Write the checkpoint of `state.version` atomically; returns its directory."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.version:08d}"
    if final.exists():
        return final  # the same version: identical weights and optimizer state are already on disk
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step_{state.version:08d}-{os.getpid()}"
    tmp.mkdir()
    save_model(state.model, str(tmp / "model.safetensors"))
    write_trainer_state(tmp / "trainer.pt", state)
    (tmp / "meta.json").write_text(json.dumps({"version": state.version, "time": time.time()}) + "\n")
    _fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_checkpoint(path: str | Path, state: LearnerState) -> None:
    """Restore weights, optimizer, scheduler, version and RNG states into `state` (built the same way)."""
    path = Path(path)
    device = next(state.model.parameters()).device
    load_model(state.model, str(path / "model.safetensors"), strict=True, device=str(device))
    # The optimizer moves its state onto the parameters' device itself; RNG states must stay on the CPU.
    trainer = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    state.optimizer.load_state_dict(trainer["optimizer"])
    state.scheduler.load_state_dict(trainer["scheduler"])
    state.version = int(trainer["version"])
    set_rng_state(trainer["rng"])
