"""Tasks and verifiers: where prompts come from, how a response is scored, how a question becomes prompt tokens.

Sources (`TaskConfig.source`):
- `reasoning_gym`: a reasoning-gym dataset by name with `params_json`; training prompts use `task.seed`, evaluation
  prompts the seed `task.seed + 1_000_003`; held-out questions never repeat, and training draws skip them (`_draw`:
  small tasks repeat questions). Ids are `f"{name}-{split}-{index of the draw}"`, so every process that loads the
  same config gets the same prompts under the same ids. Scored by the dataset's own `score_answer` on the answer
  extracted from the response.
- `procedural`: small built-in generators (`PROCEDURAL_TASKS`), seeded, id'd and held out like reasoning-gym, scored
  by exact match of the extracted answer. `larger_digit` ("Which is larger, 3 or 8?" -> "8") is the `tiny` preset's
  task: its answers are skewed (9 is the answer of 19% of pairs, 0 of 1%), so even a random tiny model learns first
  the answer format, then the frequent answers, then the comparison, and per-prompt success is very uneven.
- `jsonl`: a local .jsonl/.json/.parquet file read with `datasets`; `question_field`/`answer_field` name the
  columns (default `prompt`/`answer`). A seeded permutation holds out `eval_fraction` of the rows (eval_size does
  not apply; training drops rows that repeat a held-out question); training keeps at most `size` of the others (a
  seeded sample; size 0: all of them). Ids are `f"{file stem}-{split}-{row index in the file}"`. Graded with
  math-verify. A row with a missing/empty field or an answer math-verify cannot parse raises `TaskError` naming the
  row at load time.
- `hf`: a dataset read with `datasets.load_dataset` (a hub id, downloaded when online and cached; a local dataset
  directory; or a local .parquet/.jsonl/.json file), split `task.split`, at most `size` rows (a seeded sample in
  row order; size 0: all rows). Columns come from a named field
  map (`HF_FIELD_MAPS`, picked by `task.field_map` or by the dataset id) or from `task.question_field` /
  `task.answer_field` / `task.answer_format`. Evaluation reads `task.eval_name` / `task.eval_split` (default: the
  training split with `eval_fraction` held out, as for jsonl), at most `eval_size` rows (a seeded sample); training
  then drops every row whose question a row of that whole evaluation split also has (whitespace and case aside: one
  dataset often reprints another's problems), counted (`HfLoad.held_out_dropped`) and logged. Ids are
  `f"{dataset name}-{split}-{row index}"`. A missing column raises `TaskError` naming it and the columns there
  are; a row without a usable question or answer is skipped, counted and logged (`HfLoad.skipped`).

Answer extraction (`extract_answer`): the content of the last `\\boxed{...}` if there is one, else the last number
in the text (optional minus sign, thousands commas removed, optional decimals), else None. A last number that is the
right operand of a binary operator (`+ - * / × ÷ ^` after a number or `)`) is no answer: "-7 * 0 =" echoes the
question "Calculate -7 * 0." and would otherwise score 0 as correct; a policy learns to give such echoes. The `math`
scorer (`task.scorer`, the paper's) uses the last box only: a response without one is wrong.

Rewards are `task.reward_correct` when correct and `task.reward_wrong` otherwise (including "no answer found");
defaults 1 / 0, the paper's -1 for wrong is a config value. reasoning-gym scorers can give partial credit (e.g. a
substring match); only a full score (>= 1) counts as correct, because the allocation models each prompt's success
as a Bernoulli variable.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

from common.config import TaskConfig

Split = Literal["train", "eval"]
Asking = TypeVar("Asking")  # a Prompt, a buffer PromptRecord: anything with a `.question`
EVAL_SEED_OFFSET = 1_000_003
_DRAW_LIMIT = 64

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# A binary operator after a number or ")" and before the end (opening parentheses and spaces aside): a number
# there is the operator's right operand, as in an echoed "-7 * 0 =".
_OPERAND_BEFORE = re.compile(r"[\d)]\s*[-+*/×÷^][\s(]*$")
_log = logging.getLogger(__name__)


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
    if task.source == "hf":
        loaded = load_hf_prompts(task, split)
        if loaded.skipped:
            _log.warning("%s (%s): %d row(s) skipped, e.g. %s", loaded.name, loaded.split, len(loaded.skipped),
                         "; ".join(loaded.skipped[:3]))
        return loaded.prompts
    held_out = _draw(task, "eval", task.eval_size, set(), distinct=True)
    if split == "eval":
        return held_out
    return _draw(task, "train", task.size, {p.question for p in held_out}, distinct=False)


def _draw(task: TaskConfig, split: Split, count: int, excluded: set[str], distinct: bool) -> list[Prompt]:
    """The first `count` draws of `split`'s seed whose question is not in `excluded` (with `distinct`, nor an earlier
    draw's).

    Small generated tasks repeat questions: 2-term 1-digit arithmetic has ~1,900 distinct ones, so seeds alone put
    6 of cpu-demo's 64 held-out questions among its 256 training prompts (40 of 64 with 2,048) and 5 twice in the
    held-out set. The held-out set is drawn first, without repeats, and depends only on the task, its seed and
    eval_size; training draws skip its questions (they may repeat each other). An id keeps its draw's index, so ids
    can have gaps. A task with too few questions left after `_DRAW_LIMIT` × count draws raises TaskError."""
    if count == 0:
        return []
    seed = task.seed if split == "train" else task.seed + EVAL_SEED_OFFSET
    limit = _DRAW_LIMIT * count
    draws = _procedural_draws if task.source == "procedural" else _reasoning_gym_draws
    excluded, chosen = set(excluded), []
    for prompt in draws(task, split, limit, seed):
        if prompt.question not in excluded:
            chosen.append(prompt)
            if distinct:
                excluded.add(prompt.question)
            if len(chosen) == count:
                return chosen
    which = "task.size" if split == "train" else "task.eval_size"
    wanted = "outside the held-out set" if split == "train" else "without repeats"
    raise TaskError(f"{which}={count}: {task.name} gave only {len(chosen)} {split} questions {wanted} in {limit} "
                    f"draws; lower task.eval_size or task.size")


def _reasoning_gym_draws(task: TaskConfig, split: Split, limit: int, seed: int) -> Iterator[Prompt]:
    """Up to `limit` prompts of the reasoning-gym dataset with `seed`, in order (entries are made when read)."""
    dataset = _reasoning_gym_dataset(task.name, task.params_json, limit, seed)
    for index in range(limit):
        entry = dataset[index]
        prompt_id = f"{task.name}-{split}-{index}"
        yield Prompt(prompt_id, str(entry["question"]), str(entry["answer"]),
                     _json_metadata(entry.get("metadata", {}), prompt_id))


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


def _procedural_draws(task: TaskConfig, split: Split, limit: int, seed: int) -> Iterator[Prompt]:
    """Up to `limit` prompts of a built-in generator seeded with `seed`, in order."""
    generator = PROCEDURAL_TASKS.get(task.name)
    if generator is None:
        raise TaskError(f"task.name={task.name!r}: unknown procedural task; choose from {sorted(PROCEDURAL_TASKS)}")
    rng = random.Random(seed)
    for index in range(limit):
        question, answer = generator(rng)
        yield Prompt(f"{task.name}-{split}-{index}", question, answer, {})


def _load_local(task: TaskConfig, split: Split) -> list[Prompt]:
    path = Path(task.path)
    rows = _read_local_rows(path)
    stem = path.stem
    prompts = [_local_row_to_prompt(row, index, task, stem) for index, row in enumerate(rows)]
    chosen = _hold_out_rows(prompts, task, split)
    prompts = [_with_split_id(prompts[i], f"{stem}-{split}-{i}") for i in chosen]
    return seeded_sample(prompts, task.size, task.seed) if split == "train" and task.size else prompts


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
    question_field, answer_field = task.question_field or "prompt", task.answer_field or "answer"
    question = row.get(question_field)
    if not isinstance(question, str) or not question.strip():
        raise TaskError(f"{where}: field {question_field!r} is missing or not a non-empty string "
                        f"(got {question!r})")
    answer = row.get(answer_field)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise TaskError(f"{where}: field {answer_field!r} is missing or empty")
    answer = str(answer)
    if not gradable(answer):
        raise TaskError(f"{where}: answer {answer!r} cannot be parsed by math-verify")
    metadata = {k: v for k, v in row.items() if k not in (question_field, answer_field)}
    return Prompt(f"{stem}-row-{index}", question, answer, _json_metadata(metadata, where))


def gradable(answer: str) -> bool:
    """math-verify turns `answer` into an expression (it always falls back to the raw string; an answer that gives
    nothing else cannot be graded). Plain numbers, most answers of math RL sets, skip the ~5 ms parse."""
    if _PLAIN_NUMBER.fullmatch(answer.strip()):
        return True
    return bool([x for x in _math_verify_parse(_as_math(answer)) if not isinstance(x, str)])


def _hold_out_rows(prompts: list[Prompt], task: TaskConfig, split: Split) -> list[int]:
    """Row indices of `split` when a seeded permutation holds out `eval_fraction` of the rows; training rows whose
    question a held-out row has are dropped too (datasets repeat questions across rows)."""
    import numpy as np

    order = np.random.default_rng(task.seed).permutation(len(prompts))
    n_eval = int(round(task.eval_fraction * len(prompts)))
    if split == "eval":
        return sorted(int(i) for i in order[:n_eval])
    held_out = {question_key(prompts[i].question) for i in order[:n_eval]}
    return sorted(int(i) for i in order[n_eval:] if question_key(prompts[i].question) not in held_out)


def _with_split_id(prompt: Prompt, prompt_id: str) -> Prompt:
    return Prompt(prompt_id, prompt.question, prompt.answer, prompt.metadata)


# ---------------------------------------------------------------------------------------------- hf datasets

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


@dataclass(frozen=True)
class FieldMap:
    """Where a dataset row keeps its question and answer."""

    question: str
    """Column (dotted path for a nested field) of the question; a chat-message list gives its last user message."""
    answer: str
    """Column (dotted path) of the reference answer."""
    answer_format: Literal["raw", "boxed", "list"] = "raw"
    """`raw`: the answer itself; `boxed`: a worked solution whose last \\boxed{} holds the answer; `list`: a list of
    answers (OlympiadBench's final_answer), $ delimiters removed, joined with ", " (graded as a set when several)."""
    strip_prefix: str = ""
    """Instruction text removed from the start of the question when present."""
    strip_suffix: str = ""
    """Instruction text removed from the end of the question when present."""


# Column names and answer formats as the dataset cards give them.
HF_FIELD_MAPS: dict[str, FieldMap] = {
    # DAPO-Math-17k: prompt = [{"role": "user", "content": <DAPO "Answer:" instructions around the problem>}],
    # reward_model = {"ground_truth": "<integer>", "style": "rule-lighteval/MATH_v2"}. The instructions ask for an
    # "Answer:" line; they are removed so that the system prompt's \boxed{} request is the only format asked for.
    "dapo-math": FieldMap("prompt", "reward_model.ground_truth", "raw", DAPO_PREFIX, DAPO_SUFFIX),
    # MATH (hendrycks/competition_math and its lighteval copy): problem, level, type, solution (answer boxed).
    "math": FieldMap("problem", "solution", "boxed"),
    # MATH-500: problem, solution, answer, subject, level, unique_id.
    "math-500": FieldMap("problem", "answer", "raw"),
}
HF_DATASET_FIELD_MAPS = {
    "bytedtsinghua-sia/dapo-math-17k": "dapo-math",
    "digitallearninggmbh/math-lighteval": "math",
    "hendrycks/competition_math": "math",
    "huggingfaceh4/math-500": "math-500",
}


@dataclass(frozen=True)
class HfLoad:
    """Prompts read from one dataset split, with the rows that could not be used."""

    name: str
    split: str
    rows: int
    prompts: list[Prompt]
    skipped: list[str]
    """One line per unusable row: its index and what was wrong."""
    held_out_dropped: int = 0
    """Training rows left out because the evaluation split asks the same question."""


def field_map(task: TaskConfig, name: str) -> FieldMap:
    """The field map of dataset `name` under `task` (named map, then per-field overrides)."""
    key = task.field_map or _known_map_key(name)
    if key and key not in HF_FIELD_MAPS:
        raise TaskError(f"task.field_map={key!r}: unknown; choose from {sorted(HF_FIELD_MAPS)}")
    base = HF_FIELD_MAPS[key] if key else FieldMap("prompt", "answer")
    return FieldMap(task.question_field or base.question, task.answer_field or base.answer,
                    base.answer_format if task.answer_format == "auto" else task.answer_format,
                    base.strip_prefix, base.strip_suffix)


def _known_map_key(name: str) -> str:
    parts = Path(name.rstrip("/")).parts
    return HF_DATASET_FIELD_MAPS.get("/".join(parts[-2:]).lower(), "")


def load_hf_prompts(task: TaskConfig, split: Split) -> HfLoad:
    """Prompts of `split` from the training or evaluation dataset of a source = hf task."""
    shared = not task.eval_split and task.eval_name in ("", task.name)  # evaluation holds out training rows
    eval_name, eval_split = task.eval_name or task.name, task.eval_split or task.split
    name, dataset_split = (eval_name, eval_split) if split == "eval" else (task.name, task.split)
    loaded = _hf_rows_to_prompts(task, name, dataset_split, split)
    prompts, dropped = loaded.prompts, 0
    if shared:
        prompts = [prompts[i] for i in _hold_out_rows(prompts, task, split)]
    elif split == "train" and task.eval_size:
        evaluation = _hf_rows_to_prompts(task, eval_name, eval_split, "eval").prompts  # the whole split
        kept = without_questions(prompts, (p.question for p in evaluation))
        prompts, dropped = kept, len(prompts) - len(kept)
        if dropped:
            _log.info("%s [%s]: %d training row(s) dropped: their question is in the evaluation split %s [%s]",
                      name, dataset_split, dropped, eval_name, eval_split)
    if split == "eval":
        prompts = seeded_sample(prompts, task.eval_size, task.seed + EVAL_SEED_OFFSET)
    elif task.size:
        prompts = seeded_sample(prompts, task.size, task.seed)
    return HfLoad(loaded.name, loaded.split, loaded.rows, prompts, loaded.skipped, dropped)


def question_key(question: str) -> str:
    """What two questions share when they are the same question: the text with runs of whitespace made one space,
    case folded."""
    return " ".join(question.split()).casefold()


def without_questions(items: list[Asking], questions: Iterable[str]) -> list[Asking]:
    """`items` (each with a `.question`) less those that ask one of `questions`, compared by `question_key`."""
    asked = {question_key(q) for q in questions}
    return [item for item in items if question_key(item.question) not in asked]


def seeded_sample(prompts: list[Prompt], size: int, seed: int) -> list[Prompt]:
    """At most `size` of `prompts`: a seeded sample kept in their order (all of them when there are no more)."""
    import numpy as np

    if len(prompts) <= size:
        return prompts
    keep = np.random.default_rng(seed).permutation(len(prompts))[:size]
    return [prompts[i] for i in sorted(keep)]


def _hf_rows_to_prompts(task: TaskConfig, name: str, dataset_split: str, split: Split) -> HfLoad:
    return read_hf_prompts(name, dataset_split, field_map(task, name), split)


def read_hf_prompts(name: str, dataset_split: str, fields: FieldMap, split: Split) -> HfLoad:
    """Every usable row of `dataset_split` of dataset `name` read through `fields`; ids carry `split`."""
    dataset = _load_hf_dataset(name, dataset_split)
    for column in (fields.question, fields.answer):
        top = column.split(".")[0]
        if top not in dataset.column_names:
            raise TaskError(f"dataset {name!r} split {dataset_split!r}: no column {top!r} (for {column!r}); its "
                            f"columns are {dataset.column_names}. Set task.question_field / task.answer_field "
                            f"or task.field_map ({sorted(HF_FIELD_MAPS)})")
    label = Path(name.rstrip("/")).name
    prompts, skipped = [], []
    for index, row in enumerate(dataset):
        try:
            question, answer = _hf_question(row, fields), _hf_answer(row, fields)
        except TaskError as exc:
            skipped.append(f"row {index}: {exc}")
            continue
        used = {fields.question.split(".")[0], fields.answer.split(".")[0]}
        # Short scalar columns only (level, subject, ids): metadata travels with every lease of the prompt.
        metadata = {k: v for k, v in row.items()
                    if k not in used and (isinstance(v, (int, float, bool)) or isinstance(v, str) and len(v) <= 200)}
        prompts.append(Prompt(f"{label}-{split}-{index}", question, answer, metadata))
    if not prompts:
        raise TaskError(f"dataset {name!r} split {dataset_split!r}: no usable rows of {len(dataset)} "
                        f"({'; '.join(skipped[:3])})")
    return HfLoad(name, dataset_split, len(dataset), prompts, skipped)


def _load_hf_dataset(name: str, split: str) -> Any:
    import datasets

    path = Path(name).expanduser()
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    try:
        if path.is_file():
            if path.suffix.lower() not in kinds:
                raise TaskError(f"task.name={name!r}: a local file must be .parquet, .jsonl or .json")
            return datasets.load_dataset(kinds[path.suffix.lower()], data_files={split: str(path)}, split=split)
        return datasets.load_dataset(str(path) if path.is_dir() else name, split=split)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError) as exc:
        raise TaskError(f"dataset {name!r}: not found (hub id, local directory or file; offline and not in the "
                        f"cache?): {_first_line(exc)}") from None
    except ValueError as exc:  # an unknown split, or files datasets cannot read
        raise TaskError(f"dataset {name!r} split {split!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _field(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TaskError(f"field {path!r} is missing")
        value = value[part]
    return value


def _hf_question(row: dict[str, Any], fields: FieldMap) -> str:
    value = _field(row, fields.question)
    if isinstance(value, list):  # chat messages: the last user turn is the question
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"question {fields.question!r} is empty or not text")
    if fields.strip_prefix and value.startswith(fields.strip_prefix):
        value = value[len(fields.strip_prefix):]
    if fields.strip_suffix and value.endswith(fields.strip_suffix):
        value = value[:-len(fields.strip_suffix)]
    return value.strip()


def _hf_answer(row: dict[str, Any], fields: FieldMap) -> str:
    value = _field(row, fields.answer)
    if fields.answer_format == "list":
        value = _joined_answers(value, fields.answer)
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        raise TaskError(f"answer {fields.answer!r} is empty or not a value")
    answer = str(value).strip()
    if fields.answer_format == "boxed":
        boxed = _last_boxed(answer)
        if boxed is None or not boxed.strip():
            raise TaskError(f"answer {fields.answer!r} has no \\boxed{{}} answer")
        answer = boxed.strip()
    if not gradable(answer):
        raise TaskError(f"answer {answer!r} cannot be parsed by math-verify")
    return answer


def _joined_answers(value: Any, column: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip("$ ") for v in value):
        raise TaskError(f"answer {column!r} is not a non-empty list of answers")
    return ", ".join(v.strip().strip("$").strip() for v in value)


def describe_task(task: TaskConfig) -> list[str]:
    """Loads the training and evaluation prompts once (every column and row check runs) and says what was found;
    TaskError names what is wrong. For the run plan of `run_async.py --dry-run`."""
    lines = []
    for split in ("train", "eval"):
        if split == "eval" and task.eval_size == 0:
            lines.append("eval: none (task.eval_size 0)")
            continue
        if task.source == "hf":
            loaded = load_hf_prompts(task, split)
            skipped = f", {len(loaded.skipped)} row(s) skipped (e.g. {loaded.skipped[0]})" if loaded.skipped else ""
            if loaded.held_out_dropped:
                skipped += f", {loaded.held_out_dropped} dropped: their question is evaluated"
            lines.append(f"{split}: {len(loaded.prompts)} prompts from {loaded.name} [{loaded.split}] "
                         f"({loaded.rows} rows{skipped})")
        else:
            prompts = load_prompts(task, split)
            lines.append(f"{split}: {len(prompts)} prompts ({task.source} {task.path or task.name})")
    return lines


# ---------------------------------------------------------------------------------------------- scoring


def extract_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), else the last number in `text` unless it is the right
    operand of a binary operator (the response ends in an expression, not a result), else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = list(_NUMBER.finditer(text))
    if not numbers or _OPERAND_BEFORE.search(text, 0, numbers[-1].start()):
        return None
    return numbers[-1].group().replace(",", "")


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
    """(reward, correct) of one response: (task.reward_correct, True) when its answer is right, else
    (task.reward_wrong, False)."""
    if task.scorer == "math" or task.source == "hf":
        correct = math_score(prompt.answer, response_text)
    else:
        correct = _source_score(prompt, response_text, task)
    return (task.reward_correct if correct else task.reward_wrong), correct


def math_score(gold: str, response_text: str) -> bool:
    """The paper's math scorer: the content of the response's last \\boxed{} equals `gold` under math-verify."""
    boxed = _last_boxed(response_text)
    if boxed is None or not boxed.strip():
        return False
    return _math_verify_equal(gold, boxed.strip())


def _source_score(prompt: Prompt, response_text: str, task: TaskConfig) -> bool:
    extracted = extract_answer(response_text)
    if extracted is None:
        return False
    if task.source == "reasoning_gym":
        entry = {"question": prompt.question, "answer": prompt.answer, "metadata": prompt.metadata}
        return _reasoning_gym_scorer(task.name, task.params_json).score_answer(extracted, entry) >= 1.0
    if task.source == "procedural":
        return extracted == prompt.answer
    return _math_verify_equal(prompt.answer, extracted)


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
