"""Tasks and verifiers: where prompts come from, how a response is scored, how a question becomes prompt tokens.

Sources (`TaskConfig.source`):
- `reasoning_gym`: a reasoning-gym dataset by name with `params_json`; training prompts use `task.seed`, evaluation
  prompts the disjoint seed `task.seed + 1_000_003`. Ids are `f"{name}-{split}-{index}"`, so every process that
  loads the same config gets the same prompts under the same ids. Scored by the dataset's own `score_answer` on the
  answer extracted from the response.
- `procedural`: small built-in generators (`PROCEDURAL_TASKS`), seeded and id'd like reasoning-gym, scored by exact
  match of the extracted answer. `larger_digit` ("Which is larger, 3 or 8?" -> "8") is the `tiny` preset's task:
  its answers are skewed (9 is the answer of 19% of pairs, 0 of 1%), so even a random tiny model learns first the
  answer format, then the frequent answers, then the comparison, and per-prompt success is very uneven.
- `jsonl`: a local .jsonl/.json/.parquet file read with `datasets`; `prompt_field`/`answer_field` name the columns.
  The whole file is used (size/eval_size do not apply); a seeded permutation holds out `eval_fraction` of the rows.
  Ids are `f"{file stem}-{split}-{row index in the file}"`. Graded with math-verify. A row with a missing/empty
  field or an answer math-verify cannot parse raises `TaskError` naming the row at load time.

Answer extraction (`extract_answer`): the content of the last `\\boxed{...}` if there is one, else the last number
in the text (optional minus sign, thousands commas removed, optional decimals), else None.

Rewards are binary: 1.0 when correct, 0.0 otherwise (including "no answer found"). reasoning-gym scorers can give
partial credit (e.g. a substring match); only a full score (>= 1) counts as correct, because the allocation models
each prompt's success as a Bernoulli variable.
"""

from __future__ import annotations

import functools
import json
import random
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from common.config import TaskConfig

Split = Literal["train", "eval"]
EVAL_SEED_OFFSET = 1_000_003

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


class TaskError(ValueError):
    """Prompts could not be loaded (unknown dataset, bad row); the message names the dataset and row."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    question: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- loading


def load_prompts(task: TaskConfig, split: Split) -> list[Prompt]:
    """The prompts of `split` ("train" or "eval"), in a fixed order with reproducible ids."""
    if split not in ("train", "eval"):
        raise TaskError(f"split must be 'train' or 'eval', got {split!r}")
    if task.source == "jsonl":
        return _load_local(task, split)
    size = task.size if split == "train" else task.eval_size
    seed = task.seed if split == "train" else task.seed + EVAL_SEED_OFFSET
    if task.source == "procedural":
        return _load_procedural(task, split, size, seed)
    return _load_reasoning_gym(task, split, size, seed)


def _load_reasoning_gym(task: TaskConfig, split: Split, size: int, seed: int) -> list[Prompt]:
    if size == 0:
        return []
    dataset = _reasoning_gym_dataset(task.name, task.params_json, size, seed)
    prompts = []
    for index in range(size):
        entry = dataset[index]
        prompt_id = f"{task.name}-{split}-{index}"
        prompts.append(Prompt(prompt_id, str(entry["question"]), str(entry["answer"]),
                              _json_metadata(entry.get("metadata", {}), prompt_id)))
    return prompts


def _reasoning_gym_dataset(name: str, params_json: str, size: int, seed: int) -> Any:
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **json.loads(params_json))
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskError(f"task.name={name!r} task.params_json={params_json}: reasoning-gym could not create "
                        f"the dataset ({type(exc).__name__}: {exc})") from None


@functools.lru_cache(maxsize=8)
def _reasoning_gym_scorer(name: str, params_json: str) -> Any:
    # score_answer reads only the entry passed to it, so a one-item dataset is enough to score any prompt.
    return _reasoning_gym_dataset(name, params_json, 1, 0)


def _json_metadata(metadata: Any, prompt_id: str) -> dict[str, Any]:
    """Metadata as it will look after a trip through WorkItem.metadata_json (tuples become lists)."""
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as exc:
        raise TaskError(f"{prompt_id}: metadata is not JSON-serialisable ({exc})") from None


def _larger_digit(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


PROCEDURAL_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"larger_digit": _larger_digit}


def _load_procedural(task: TaskConfig, split: Split, size: int, seed: int) -> list[Prompt]:
    generator = PROCEDURAL_TASKS.get(task.name)
    if generator is None:
        raise TaskError(f"task.name={task.name!r}: unknown procedural task; choose from {sorted(PROCEDURAL_TASKS)}")
    rng = random.Random(seed)
    prompts = []
    for index in range(size):
        question, answer = generator(rng)
        prompts.append(Prompt(f"{task.name}-{split}-{index}", question, answer, {}))
    return prompts


def _load_local(task: TaskConfig, split: Split) -> list[Prompt]:
    import numpy as np

    path = Path(task.path)
    rows = _read_local_rows(path)
    stem = path.stem
    prompts = [_local_row_to_prompt(row, index, task, stem) for index, row in enumerate(rows)]
    order = np.random.default_rng(task.seed).permutation(len(prompts))
    n_eval = int(round(task.eval_fraction * len(prompts)))
    chosen = sorted(order[:n_eval] if split == "eval" else order[n_eval:])
    return [_with_split_id(prompts[i], f"{stem}-{split}-{i}") for i in chosen]


def _read_local_rows(path: Path) -> list[dict[str, Any]]:
    import datasets

    if not path.is_file():
        raise TaskError(f"task.path={str(path)!r}: file not found")
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kind = kinds.get(path.suffix.lower())
    if kind is None:
        raise TaskError(f"task.path={str(path)!r}: expected a .jsonl, .json or .parquet file")
    try:
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
    except (ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        raise TaskError(f"task.path={str(path)!r}: could not be read as {kind} ({exc})") from None
    return list(dataset)


def _local_row_to_prompt(row: dict[str, Any], index: int, task: TaskConfig, stem: str) -> Prompt:
    where = f"{task.path} row {index}"
    question = row.get(task.prompt_field)
    if not isinstance(question, str) or not question.strip():
        raise TaskError(f"{where}: field {task.prompt_field!r} is missing or not a non-empty string "
                        f"(got {question!r})")
    answer = row.get(task.answer_field)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise TaskError(f"{where}: field {task.answer_field!r} is missing or empty")
    answer = str(answer)
    # math-verify always falls back to the raw string; an answer it turns into no expression cannot be graded.
    if not [x for x in _math_verify_parse(_as_math(answer)) if not isinstance(x, str)]:
        raise TaskError(f"{where}: answer {answer!r} cannot be parsed by math-verify")
    metadata = {k: v for k, v in row.items() if k not in (task.prompt_field, task.answer_field)}
    return Prompt(f"{stem}-row-{index}", question, answer, _json_metadata(metadata, where))


def _with_split_id(prompt: Prompt, prompt_id: str) -> Prompt:
    return Prompt(prompt_id, prompt.question, prompt.answer, prompt.metadata)


# ---------------------------------------------------------------------------------------------- scoring


def extract_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), else the last number in `text`, else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for pos in range(begin, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            if depth == 0:
                return text[begin:pos]
            depth -= 1
    return None  # unclosed: the response was cut off inside the box


def score_response(prompt: Prompt, response_text: str, task: TaskConfig) -> tuple[float, bool]:
    """(reward, correct) of one response: 1.0/True when the extracted answer is right, else 0.0/False."""
    extracted = extract_answer(response_text)
    if extracted is None:
        return 0.0, False
    if task.source == "reasoning_gym":
        entry = {"question": prompt.question, "answer": prompt.answer, "metadata": prompt.metadata}
        correct = _reasoning_gym_scorer(task.name, task.params_json).score_answer(extracted, entry) >= 1.0
    elif task.source == "procedural":
        correct = extracted == prompt.answer
    else:
        correct = _math_verify_equal(prompt.answer, extracted)
    return (1.0 if correct else 0.0), correct


def _as_math(text: str) -> str:
    # math-verify's LaTeX extractor needs delimiters; a bare "1/2" or "\frac12" parses once wrapped.
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def _math_timeouts() -> dict[str, Any]:
    # math-verify enforces its timeouts with SIGALRM, which only works in the main thread.
    return {} if threading.current_thread() is threading.main_thread() else {"parsing_timeout": None}


def _math_verify_parse(text: str) -> list[Any]:
    from math_verify import parse

    return parse(text, **_math_timeouts())


def _math_verify_equal(gold: str, predicted: str) -> bool:
    from math_verify import verify

    gold_parsed, pred_parsed = _math_verify_parse(_as_math(gold)), _math_verify_parse(_as_math(predicted))
    if not pred_parsed:
        return False
    timeout = {} if not _math_timeouts() else {"timeout_seconds": None}
    return bool(verify(gold_parsed, pred_parsed, **timeout))


# ---------------------------------------------------------------------------------------------- prompts as tokens


def build_prompt_text(tokenizer: Any, question: str, task: TaskConfig) -> str:
    """The text the model is conditioned on: the tokenizer's chat template (with task.system_prompt as a system
    message when non-empty) when task.use_chat_template, else the raw question."""
    if not task.use_chat_template:
        return question
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError("task.use_chat_template is set but the tokenizer has no chat template")
    messages = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, question: str, task: TaskConfig) -> list[int]:
    """Prompt token ids; a chat template already contains any BOS token, so none is added a second time."""
    text = build_prompt_text(tokenizer, question, task)
    return list(tokenizer(text, add_special_tokens=not task.use_chat_template)["input_ids"])


def prompt_from_work_item(item: Any) -> Prompt:
    """The Prompt a buffer WorkItem carries (metadata travels as JSON)."""
    return Prompt(item.prompt_id, item.prompt, item.answer, json.loads(item.metadata_json or "{}"))


def work_item_from_prompt(prompt: Prompt, n: int) -> Any:
    """The WorkItem that leases `n` responses to `prompt`."""
    from common.schemas import WorkItem

    return WorkItem(prompt_id=prompt.prompt_id, prompt=prompt.question, n=n, answer=prompt.answer,
                    metadata_json=json.dumps(prompt.metadata))
