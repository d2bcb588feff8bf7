"""Score the greedy answers that `python -m learner.evaluate_heldout ... --out F.json` saved again, with the scorer
as it is now: what a change of the scorer does to measured runs, without generating anything.

    python bench/rescore_heldout.py runs/*/heldout512.json

The task of each file is its run's (`config.json` in the file's directory, else in the run directory of the
checkpoint it names). One line per file: pass@1 as saved and as rescored, and how many answers stopped or started
counting as correct.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402 (after the path)
from common.tasks import Prompt, score_response  # noqa: E402


def run_config_path(results_path: Path, results: dict[str, Any]) -> Path:
    beside = results_path.parent / "config.json"
    return beside if beside.exists() else Path(results["checkpoint"]).parents[1] / "config.json"


def rescore(results_path: Path) -> dict[str, Any]:
    """{"saved", "now"} pass@1 and the answers `lost` / `gained` (correct before / after only) of one saved file."""
    results = json.loads(results_path.read_text())
    task = load_config(run_config_path(results_path, results)).task
    rows = results["per_prompt"]
    saved = [bool(r["greedy_correct"]) for r in rows]
    now = [score_response(Prompt(r["prompt_id"], r["question"], r["answer"]), r["greedy_response"], task)[1]
           for r in rows]
    return {"prompts": len(rows), "saved": sum(saved) / len(rows), "now": sum(now) / len(rows),
            "lost": sum(s and not n for s, n in zip(saved, now)),
            "gained": sum(n and not s for s, n in zip(saved, now))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="JSON files written by learner.evaluate_heldout --out")
    for path in parser.parse_args(argv).files:
        r = rescore(path)
        print(f"{path}: pass@1 on {r['prompts']} saved {r['saved']:.3f}, rescored {r['now']:.3f} "
              f"({r['lost']} no longer correct, {r['gained']} newly correct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
