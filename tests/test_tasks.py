"""Tasks and verifiers: reproducible prompt sets, answer extraction edge cases, scoring right and wrong answers."""

import json

import pytest

from common.config import TaskConfig
from common.schemas import WorkItem
from common.tasks import (Prompt, TaskError, build_prompt_text, encode_prompt, extract_answer, load_prompts,
                          prompt_from_work_item, score_response, work_item_from_prompt)

pytestmark = pytest.mark.unit

ARITH = TaskConfig(size=12, eval_size=6)
DIGITS = TaskConfig(source="procedural", name="larger_digit", params_json="{}", size=20, eval_size=10)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", "42"),                      # trailing period is not a decimal point
        ("5 - 3 = 2", "2"),                               # last number, not the first
        ("it is -7", "-7"),                               # negative numbers keep their sign
        ("total 1,234 apples", "1234"),                   # thousands separators removed
        ("x = 3.25", "3.25"),
        ("\\boxed{12} but then 13", "12"),                # a box wins over later numbers
        ("\\boxed{1} and \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, nested braces kept
        ("\\boxed{ 8 }", "8"),
        ("\\boxed{4", "4"),                              # unclosed box (cut off): falls back to the last number
        ("-7 * 0 =", None),                              # an echoed expression: its last operand is no answer
        ("-7 * 0 equals -$-$.", None),
        ("5 - -5", None),                                # ... also a negative one
        ("8 + (-4)", None),                              # ... also in parentheses
        ("(7 * 0)", None),
        ("2^3", None),
        ("7 * 0 = 0", "0"),                              # the result after "=" is one
        ("5 - -5 equals 10.", "10"),
        ("= +45", "45"),                                 # a sign after "=" is no operator
        ("the answer is -4", "-4"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_reasoning_gym_prompts_are_reproducible_with_disjoint_eval():
    train, again, held_out = load_prompts(ARITH, "train"), load_prompts(ARITH, "train"), load_prompts(ARITH, "eval")
    assert train == again
    assert len(train) == 12 and all(p.prompt_id.startswith("basic_arithmetic-train-") for p in train)
    assert len(held_out) == 6 and held_out[0].prompt_id == "basic_arithmetic-eval-0"
    assert load_prompts(TaskConfig(size=12, eval_size=6, seed=1), "train") != train


def test_held_out_questions_are_neither_training_questions_nor_repeated():
    import reasoning_gym

    # 2-term 1-digit arithmetic has ~1,900 distinct questions: seeds alone give 512 training and 64 held-out draws
    # that share questions, and 64 held-out draws that repeat some.
    task = TaskConfig(size=512, eval_size=64)
    train, held_out = load_prompts(task, "train"), load_prompts(task, "eval")
    questions = [p.question for p in held_out]
    assert len(train) == 512 and len(held_out) == 64 and len(set(questions)) == 64
    assert not set(questions) & {p.question for p in train}
    # Each prompt is the draw its id names; some draws of each split were skipped.
    for split, prompts, seed in (("eval", held_out, task.seed + 1_000_003), ("train", train, task.seed)):
        indices = [int(p.prompt_id.rsplit("-", 1)[1]) for p in prompts]
        assert indices == sorted(indices) and indices[-1] >= len(prompts)
        draws = reasoning_gym.create_dataset(task.name, size=indices[-1] + 1, seed=seed,
                                             **json.loads(task.params_json))
        assert [p.question for p in prompts] == [draws[i]["question"] for i in indices]
    # The held-out set does not depend on how many training prompts there are.
    assert load_prompts(TaskConfig(size=12, eval_size=64), "eval") == held_out


def test_a_task_without_enough_unseen_questions_names_the_size_to_lower():
    # larger_digit has 100 questions: 101 held-out ones cannot be distinct, and 100 leave training nothing.
    digits = {"source": "procedural", "name": "larger_digit", "params_json": "{}"}
    with pytest.raises(TaskError, match="task.eval_size=101"):
        load_prompts(TaskConfig(**digits, size=10, eval_size=101), "eval")
    with pytest.raises(TaskError, match="task.size=10"):
        load_prompts(TaskConfig(**digits, size=10, eval_size=100), "train")
    train, held_out = load_prompts(DIGITS, "train"), load_prompts(DIGITS, "eval")
    assert len(train) == 20 and len(held_out) == 10 and not {p.question for p in train} & {p.question for p in held_out}


def test_reasoning_gym_scoring_right_wrong_and_partial_credit():
    prompt = next(p for p in load_prompts(ARITH, "train") if not p.answer.startswith("-"))
    assert score_response(prompt, f"The result is {prompt.answer}", ARITH) == (1.0, True)
    assert score_response(prompt, f"\\boxed{{{prompt.answer}}}", ARITH) == (1.0, True)
    assert score_response(prompt, f"{int(prompt.answer) + 1}", ARITH) == (0.0, False)
    assert score_response(prompt, "I do not know", ARITH) == (0.0, False)
    # reasoning-gym gives partial credit when the answer is a substring ("1" in "11"); it must not count.
    assert score_response(prompt, f"\\boxed{{{prompt.answer}0}}", ARITH) == (0.0, False)


def test_an_echo_of_the_question_that_ends_on_the_answer_is_not_an_answer():
    # "Calculate -7 * 0." -> "-7 * 0 =" ends on the answer 0 as an operand; a trained policy found such echoes scored
    # correct by the last-number fallback (10 of 512 greedy answers of one run) and learned to give them
    prompt = Prompt("arith-0", "Calculate -7 * 0.", "0")
    assert score_response(prompt, "-7 * 0 =", ARITH) == (0.0, False)
    assert score_response(prompt, "-7 * 0", ARITH) == (0.0, False)
    assert score_response(prompt, "-7 * 0 = 0", ARITH) == (1.0, True)
    assert score_response(prompt, "\\boxed{-7 * 0}", ARITH) == (0.0, False)  # a box is read as it is


def test_procedural_larger_digit():
    prompts = load_prompts(DIGITS, "train")
    assert prompts == load_prompts(DIGITS, "train") and prompts != load_prompts(DIGITS, "eval")
    for p in prompts:
        a, b = [int(c) for c in p.question if c.isdigit()]
        assert p.answer == str(max(a, b))
        assert score_response(p, p.answer, DIGITS) == (1.0, True)
        assert score_response(p, str((max(a, b) + 1) % 10), DIGITS) == (0.0, False)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_local_dataset_never_trains_on_a_question_it_holds_out(tmp_path):
    # 20 questions, each in two rows: holding out rows alone would leave the twin of a held-out row in training.
    path = tmp_path / "twins.jsonl"
    _write_jsonl(path, [{"prompt": f"What is {i % 20} + 1?", "answer": str(i % 20 + 1)} for i in range(40)])
    for source in ("jsonl", "hf"):
        task = TaskConfig(source=source, path=str(path), name=str(path), eval_fraction=0.25, eval_size=10)
        train, held_out = load_prompts(task, "train"), load_prompts(task, "eval")
        held_questions = {p.question for p in held_out}
        assert len(held_out) == 10 and not held_questions & {p.question for p in train}
        # Every row of a held-out question leaves the training rows: 40 - 2 per distinct held-out question.
        assert len(train) == 40 - 2 * len(held_questions)


def test_jsonl_split_ids_and_math_verify(tmp_path):
    path = tmp_path / "math.jsonl"
    _write_jsonl(path, [{"q": f"What is {i}/2?", "a": f"\\frac{{{i}}}{{2}}", "level": i} for i in range(1, 21)])
    task = TaskConfig(source="jsonl", path=str(path), question_field="q", answer_field="a", eval_fraction=0.25)
    train, held_out = load_prompts(task, "train"), load_prompts(task, "eval")
    assert len(train) == 15 and len(held_out) == 5
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert train == load_prompts(task, "train")
    three_halves = next(p for p in train + held_out if p.question == "What is 3/2?")
    assert three_halves.prompt_id.startswith("math-") and three_halves.metadata == {"level": 3}
    assert score_response(three_halves, "so \\boxed{1.5}", task) == (1.0, True)   # equivalent form
    assert score_response(three_halves, "\\boxed{\\frac{3}{2}}", task) == (1.0, True)
    assert score_response(three_halves, "\\boxed{2}", task) == (0.0, False)
    assert score_response(three_halves, "no idea", task) == (0.0, False)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "ok", "answer": "1"}, {"answer": "2"}], "row 1: field 'prompt'"),
        ([{"prompt": "ok", "answer": "1"}, {"prompt": "q", "answer": ""}], "row 1: field 'answer'"),
        ([{"prompt": "q", "answer": "1"}, {"prompt": "q2", "answer": "1"}, {"prompt": "q3", "answer": "}{"}],
         "row 2: answer"),
    ],
)
def test_bad_local_rows_fail_at_load_naming_the_row(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, rows)
    with pytest.raises(TaskError, match=message):
        load_prompts(TaskConfig(source="jsonl", path=str(path)), "train")


def test_unknown_sources_fail_clearly(tmp_path):
    with pytest.raises(TaskError, match="not_a_dataset"):
        load_prompts(TaskConfig(name="not_a_dataset"), "train")
    with pytest.raises(TaskError, match="nope"):
        load_prompts(TaskConfig(source="procedural", name="nope", params_json="{}"), "train")
    with pytest.raises(TaskError, match="file not found"):
        load_prompts(TaskConfig(source="jsonl", path=str(tmp_path / "missing.jsonl")), "train")


def test_prompt_text_uses_the_tokenizers_chat_template(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMO_RL_CACHE", str(tmp_path))
    from common.models import load_tokenizer

    tok = load_tokenizer("tiny")
    text = build_prompt_text(tok, "which is larger, 1 or 2?", DIGITS)
    assert text == ("<|system|>Answer with the final number only.<|end|><|user|>which is larger, 1 or 2?<|end|>"
                    "<|assistant|>")
    no_system = TaskConfig(source="procedural", name="larger_digit", params_json="{}", system_prompt="")
    assert build_prompt_text(tok, "q", no_system) == "<|user|>q<|end|><|assistant|>"
    raw = TaskConfig(source="procedural", name="larger_digit", params_json="{}", use_chat_template=False)
    assert build_prompt_text(tok, "q?", raw) == "q?"
    ids = encode_prompt(tok, "q", no_system)
    assert tok.decode(ids) == "<|user|>q<|end|><|assistant|>"


def test_work_item_round_trip_keeps_scoring_metadata():
    prompt = load_prompts(ARITH, "train")[3]
    item = work_item_from_prompt(prompt, n=5)
    assert isinstance(item, WorkItem) and item.n == 5
    assert prompt_from_work_item(item) == prompt
    assert score_response(prompt_from_work_item(item), prompt.answer, ARITH) == (1.0, True)


# ---------------------------------------------------------------------------------------------- the math scorer

PAPER = TaskConfig(source="jsonl", path="unused.jsonl", scorer="math", reward_correct=1.0, reward_wrong=-1.0)


def _prompt(answer):
    return Prompt("p-0", "question", answer, {})


@pytest.mark.parametrize(
    "gold, response, reward",
    [
        ("\\frac{1}{6}", "so the probability is \\boxed{\\frac{1}{6}}.", 1.0),
        ("\\frac{1}{6}", "\\boxed{1/6}", 1.0),                          # another way to write the fraction
        ("\\frac{1}{6}", "\\boxed{\\dfrac{2}{12}}", 1.0),                # unreduced, \dfrac
        ("\\frac{1}{6}", "\\boxed{0.17}", -1.0),                         # 1/6 = 0.1666..., not 0.17
        ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", 1.0),                      # sqrt(12) = sqrt(4 * 3) = 2 sqrt(3)
        ("2\\sqrt{3}", "\\boxed{3\\sqrt{2}}", -1.0),                     # sqrt(18) != sqrt(12)
        ("(-\\infty, 2]", "\\boxed{(-\\infty,2]}", 1.0),                 # same interval, spacing differs
        ("(-\\infty, 2]", "\\boxed{(-\\infty, 2)}", -1.0),               # open at 2: another interval
        ("12", "first \\boxed{13}, no: \\boxed{12}", 1.0),               # the last box counts
        ("12", "\\boxed{12} or maybe \\boxed{13}", -1.0),                # ... also when it is the wrong one
        ("12", "the answer is 12", -1.0),                                # no box: wrong (no number fallback)
        ("12", "\\boxed{}", -1.0),                                       # empty box
        ("12", "\\boxed{12", -1.0),                                      # cut off inside the box
    ],
)
def test_math_scorer_uses_the_last_box_and_math_verify_with_paper_rewards(gold, response, reward):
    assert score_response(_prompt(gold), response, PAPER) == (reward, reward > 0)


def test_math_scorer_serves_every_source_and_default_rewards_stay_binary():
    prompt = _prompt("8")
    digits_math = TaskConfig(source="procedural", name="larger_digit", params_json="{}", scorer="math")
    assert score_response(prompt, "\\boxed{8}", digits_math) == (1.0, True)
    assert score_response(prompt, "8", digits_math) == (0.0, False)        # math scorer needs the box
    assert score_response(prompt, "8", DIGITS) == (1.0, True)              # auto: exact match of the last number
    arith_math = TaskConfig(size=12, eval_size=6, scorer="math", reward_wrong=-1.0)
    arith = next(p for p in load_prompts(ARITH, "train") if not p.answer.startswith("-"))
    assert score_response(arith, f"\\boxed{{{arith.answer}}}", arith_math) == (1.0, True)
    assert score_response(arith, f"{arith.answer}", arith_math) == (-1.0, False)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(reward_correct=1.0, reward_wrong=1.0), "task.reward_wrong"),
        (dict(reward_correct=-1.0, reward_wrong=0.0), "task.reward_wrong"),
        (dict(reward_correct=float("nan")), "task.reward_correct"),
        (dict(reward_wrong=float("-inf")), "task.reward_correct"),
        (dict(source="hf", name=" "), "task.name"),
    ],
)
def test_reward_scale_and_hf_source_are_validated(kwargs, field):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        TaskConfig(**kwargs)
