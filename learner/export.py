"""Export a learner checkpoint as a Hugging Face model directory.

    python -m learner.export RUN_DIR --out DIR [--step N] [--dtype float32|bfloat16|float16] [--force]

Reads the run's config.json for its base model (`run.model`), builds that model, loads the weights of the chosen
checkpoint into it (default: the newest; either checkpoint format, see learner/checkpoint.py: only the model's part
of the DCP directory is read, not the AdamW state) and writes `config.json`, `model.safetensors` (sharded with an
index above 5 GB), `generation_config.json` when the base model has one, and the base model's tokenizer files.
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it as it is, and so does
an SGLang server (`--model-path DIR`), which reads the same layout. The learner's float32 master weights are
written unchanged unless `--dtype` asks for a smaller type. The directory is written under a temporary name beside
DIR and renamed into place, so DIR is never half-written; a DIR that exists and is not empty is refused unless
`--force` (then it is replaced). Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


class ExportError(RuntimeError):
    """The export cannot be done as asked (no checkpoint, unknown step, occupied output directory...)."""


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step`, or the newest one."""
    from learner.checkpoint import checkpoint_dir, list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        raise ExportError(f"no checkpoint in {checkpoint_dir(run_dir)}")
    if step is None:
        return found[-1]
    wanted = checkpoint_dir(run_dir) / f"step_{step:08d}"
    if wanted not in found:
        have = ", ".join(str(int(p.name.removeprefix("step_"))) for p in found)
        raise ExportError(f"step {step} not found (have: {have}) in {checkpoint_dir(run_dir)}")
    return wanted


def base_model_name(run_dir: Path) -> str:
    from common.config import ConfigError, load_config

    try:
        return load_config(run_dir / "config.json").run.model
    except ConfigError as exc:
        raise ExportError(f"{run_dir} is not a run directory: {exc}") from None


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty (--force replaces it)")


class Progress:
    """One line per stage on stderr, with the time since the start (large models take minutes)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"export [{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "float32",
                      force: bool = False, progress: Progress | None = None) -> Path:
    """Write checkpoint `step` (default: the newest) of `run_dir` as a HF model directory `out`; returns the
    checkpoint it read."""
    run_dir, out, progress = Path(run_dir), Path(out), progress or Progress()
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    check_out_dir(out, force)
    name = base_model_name(run_dir)
    checkpoint = find_checkpoint(run_dir, step)

    import torch  # after the checks: a refusal answers at once
    from transformers import AutoTokenizer

    from common.models import load_model, resolve_model_path
    from learner.checkpoint import CheckpointError, load_weights

    progress(f"base model {name}; reading {checkpoint}")
    model = load_model(name, dtype=torch.float32, device="cpu")
    try:
        load_weights(checkpoint, model)
    except CheckpointError as exc:
        raise ExportError(f"cannot load {checkpoint} into base model {name}: {exc}") from None
    model = model.to(getattr(torch, dtype))
    size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    progress(f"loaded {sum(p.numel() for p in model.parameters()):,} parameters ({size_gb:.2f} GB as {dtype})")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), local_files_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        progress(f"writing {out}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)  # check_out_dir allowed it: empty, or --force
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"done: {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m learner.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (holds config.json and checkpoints/)")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face model directory to write")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint's version (default: the newest)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight type written (default float32)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export_checkpoint(args.run_dir, args.out, step=args.step, dtype=args.dtype, force=args.force)
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
