"""Evaluation suites: named sets of math benchmarks, how each is read, and the metrics reported over them.

`math6` is the six-benchmark suite the DynaMO paper reports (P@1 / P@32). Each benchmark names a Hugging Face dataset
id, its split and its columns as the dataset card gives them; answers are graded by the paper's math scorer (the
response's last \\boxed{} against the reference under math-verify, `common.tasks.math_score`). The ids were chosen as
the copies that RL-for-reasoning evaluation code reads most often (one organisation, `math-ai`, for four of them, so
their formats agree), with the plain problem statement and the final answer in separate columns:

- `aime24`: HuggingFaceH4/aime_2024 [train] — problem / answer (30 problems of AIME 2024 I and II; answers are
  integers as text, some zero-padded such as "024").
- `aime25`: math-ai/aime25 [test] — problem / answer (30 problems of AIME 2025 I and II).
- `amc23`: math-ai/amc23 [test] — question / answer (40 problems of AMC 12 2023; the answer is a number).
- `math500`: HuggingFaceH4/MATH-500 [test] — problem / answer (the 500-problem MATH subset of "Let's Verify Step by
  Step").
- `minerva`: math-ai/minervamath [test] — question / answer (272 undergraduate STEM problems of Minerva).
- `olympiad`: math-ai/olympiadbench [test] — question / final_answer (675 English text-only open-ended math
  problems of OlympiadBench; `final_answer` is a list, one element for most rows, several when
  `is_multiple_answer`; the elements are joined with ", " and graded as a set).

A suite can also come from a JSON file (`load_suite(path)`):

    {"name": "my-suite", "benchmarks": [
        {"name": "aime24", "dataset": "HuggingFaceH4/aime_2024", "split": "train",
         "question": "problem", "answer": "answer", "answer_format": "raw"}, ...]}

`answer_format` is `raw` (default), `boxed` (a worked solution whose last \\boxed{} holds the answer) or `list`.

Metrics, per benchmark from k samples per prompt at temperature 1.0: `avg@k`, the mean accuracy over all samples
(what the paper reports as P@1), and `pass@k`, the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over prompts
(n = samples drawn, c = correct ones). The suite's average is the unweighted mean over benchmarks, as the paper's
"avg" column is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from common.tasks import FieldMap, HfLoad, TaskError, read_hf_prompts


class SuiteError(ValueError):
    """A suite could not be read; the message names the file, benchmark and field that is wrong."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a suite: where its prompts come from."""

    name: str
    """Short name, the key of its results (`aime24`)."""
    dataset: str
    """Hugging Face dataset id, local dataset directory or .parquet/.jsonl/.json file."""
    split: str
    """Split of `dataset` that is evaluated."""
    fields: FieldMap
    """Columns of the question and the reference answer, and the answer's format."""


@dataclass(frozen=True)
class Suite:
    name: str
    benchmarks: tuple[Benchmark, ...]


MATH6 = Suite("math6", (
    Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", FieldMap("problem", "answer")),
    Benchmark("aime25", "math-ai/aime25", "test", FieldMap("problem", "answer")),
    Benchmark("amc23", "math-ai/amc23", "test", FieldMap("question", "answer")),
    Benchmark("math500", "HuggingFaceH4/MATH-500", "test", FieldMap("problem", "answer")),
    Benchmark("minerva", "math-ai/minervamath", "test", FieldMap("question", "answer")),
    Benchmark("olympiad", "math-ai/olympiadbench", "test", FieldMap("question", "final_answer", "list")),
))
SUITES = {MATH6.name: MATH6}
ANSWER_FORMATS = ("raw", "boxed", "list")
_BENCHMARK_KEYS = {"name", "dataset", "split", "question", "answer", "answer_format"}


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a suite JSON file."""
    if name_or_path in SUITES:
        return SUITES[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise SuiteError(f"--suite {name_or_path!r}: neither a built-in suite ({sorted(SUITES)}) nor a file")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SuiteError(f"suite file {path}: not readable JSON: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("benchmarks"), list) or not spec["benchmarks"]:
        raise SuiteError(f"suite file {path}: must be an object with a non-empty list 'benchmarks'")
    benchmarks = tuple(_benchmark_from_json(entry, i, path) for i, entry in enumerate(spec["benchmarks"]))
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise SuiteError(f"suite file {path}: benchmark names repeat: {names}")
    return Suite(str(spec.get("name") or path.stem), benchmarks)


def _benchmark_from_json(entry: Any, index: int, path: Path) -> Benchmark:
    where = f"suite file {path}: benchmark {index}"
    if not isinstance(entry, dict):
        raise SuiteError(f"{where}: must be an object")
    unknown = set(entry) - _BENCHMARK_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_BENCHMARK_KEYS)}")
    for key in ("name", "dataset", "split", "question", "answer"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise SuiteError(f"{where}: {key!r} is missing or not a non-empty string")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", entry["name"]):
        raise SuiteError(f"{where}: name {entry['name']!r}: 1-64 letters, digits, '_', '.' or '-' (it names the "
                         f"benchmark's metrics, eval/<name>/...)")
    answer_format = entry.get("answer_format", "raw")
    if answer_format not in ANSWER_FORMATS:
        raise SuiteError(f"{where}: answer_format {answer_format!r}: choose from {ANSWER_FORMATS}")
    dataset = entry["dataset"]
    if not Path(dataset).is_absolute() and (path.parent / dataset).exists():
        dataset = str(path.parent / dataset)  # local data beside the suite file
    return Benchmark(entry["name"], dataset, entry["split"],
                     FieldMap(entry["question"], entry["answer"], answer_format))


def load_benchmark(benchmark: Benchmark, limit: int | None = None) -> HfLoad:
    """The benchmark's prompts (ids `f"{dataset stem}-eval-{index}"`), the first `limit` of them when given;
    TaskError names a missing column or a split that is not there."""
    try:
        loaded = read_hf_prompts(benchmark.dataset, benchmark.split, benchmark.fields, "eval")
    except TaskError as exc:
        raise TaskError(f"benchmark {benchmark.name}: {exc}") from None
    prompts = loaded.prompts[:limit] if limit is not None else loaded.prompts
    return HfLoad(loaded.name, loaded.split, loaded.rows, prompts, loaded.skipped)


def load_suite_benchmarks(name_or_path: str, limit: int | None = None) -> dict[str, HfLoad]:
    """Every benchmark of a suite, loaded (benchmark name -> its prompts, the first `limit` of each when given), as
    run.eval_suite evaluates them during a run; SuiteError / TaskError name the suite file or the benchmark."""
    suite = load_suite(name_or_path)
    return {benchmark.name: load_benchmark(benchmark, limit) for benchmark in suite.benchmarks}


def describe_suite(name_or_path: str, limit: int | None = None) -> list[str]:
    """One line per benchmark of a suite, read as a run evaluates it (SuiteError / TaskError name what is wrong)."""
    lines = []
    for name, data in load_suite_benchmarks(name_or_path, limit).items():
        skipped = f", {len(data.skipped)} unusable rows" if data.skipped else ""
        lines.append(f"{name}: {data.name} [{data.split}], {len(data.prompts)} prompts of {data.rows}{skipped}")
    return lines


# ---------------------------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples is correct, from n samples of which c are:
    1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def benchmark_metrics(correct: Sequence[Sequence[bool]], k: int) -> dict[str, float]:
    """`avg@k` and `pass@k` of one benchmark from the correctness of each prompt's samples ([prompts][samples],
    at least k samples per prompt)."""
    if not correct:
        raise ValueError("benchmark_metrics needs at least one prompt")
    samples = [len(row) for row in correct]
    accuracy = sum(sum(row) for row in correct) / sum(samples)
    passed = [pass_at_k(len(row), sum(row), k) for row in correct]
    return {f"avg@{k}": accuracy, f"pass@{k}": sum(passed) / len(passed)}


def suite_average(per_benchmark: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over benchmarks of every metric they all report."""
    if not per_benchmark:
        return {}
    shared = set.intersection(*(set(m) for m in per_benchmark.values()))
    return {key: sum(m[key] for m in per_benchmark.values()) / len(per_benchmark) for key in sorted(shared)}
