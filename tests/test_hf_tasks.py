"""source = hf: the named field maps of common math RL sets on fixtures in each dataset card's schema.

tests/data/hf/<org>/<name>/ hold a handful of hand-written rows laid out like the hub repositories (column names and
answer formats from the dataset cards) and are read through `datasets.load_dataset` on the local path.
"""

import json
from pathlib import Path

import pytest

from common.config import ConfigError, TaskConfig
from common.tasks import DAPO_PREFIX, TaskError, describe_task, load_hf_prompts, load_prompts, score_response

pytestmark = pytest.mark.unit
HF = Path(__file__).resolve().parent / "data" / "hf"
DAPO = str(HF / "BytedTsinghua-SIA" / "DAPO-Math-17k")
MATH = str(HF / "DigitalLearningGmbH" / "MATH-lighteval")
MATH500 = str(HF / "HuggingFaceH4" / "MATH-500")


def test_dapo_math_chat_prompt_loses_its_answer_line_instructions_and_keeps_the_ground_truth():
    task = TaskConfig(source="hf", name=DAPO, eval_fraction=0.0, eval_size=0)
    prompts = load_prompts(task, "train")
    assert [p.answer for p in prompts] == ["28", "2", "14", "13", "29", "15"]
    assert prompts[0].question == "What is the sum of the positive divisors of $12$?"
    assert all("Answer:" not in p.question and not p.question.startswith(DAPO_PREFIX[:20]) for p in prompts)
    assert prompts[0].prompt_id == "DAPO-Math-17k-train-0"
    assert prompts[0].metadata == {"data_source": "math_dapo", "ability": "MATH"}  # scalars; nested structs dropped


def test_math_answers_come_from_the_solutions_last_box_and_the_test_split_evaluates():
    task = TaskConfig(source="hf", name=MATH, eval_split="test")
    train, held_out = load_prompts(task, "train"), load_prompts(task, "eval")
    assert [p.answer for p in train] == ["\\frac{1}{6}", "2\\sqrt{3}", "(-\\infty, 2]", "12", "12"]
    assert [p.answer for p in held_out] == ["\\frac{1}{8}", "9\\pi"]
    assert [p.prompt_id for p in held_out] == ["MATH-lighteval-eval-0", "MATH-lighteval-eval-1"]
    assert held_out[0].metadata == {"level": "Level 1", "type": "Algebra"}
    paper = TaskConfig(source="hf", name=MATH, scorer="math", reward_wrong=-1.0)
    assert score_response(train[1], "so it is \\boxed{\\sqrt{12}}", paper) == (1.0, True)
    assert score_response(train[1], "2\\sqrt{3}", paper) == (-1.0, False)  # no box


def test_training_on_dapo_evaluating_on_math500_with_an_eval_size_cap():
    task = TaskConfig(source="hf", name=DAPO, eval_name=MATH500, eval_split="test", eval_size=2)
    assert len(load_prompts(task, "train")) == 6          # another dataset evaluates: nothing held out
    held_out = load_prompts(task, "eval")
    assert len(held_out) == 2 and held_out == load_prompts(task, "eval")  # seeded sample of the 3 rows
    by_answer = {p.answer: p for p in load_prompts(TaskConfig(source="hf", name=DAPO, eval_name=MATH500,
                                                              eval_split="test"), "eval")}
    assert set(by_answer) == {"\\left( 3, \\frac{\\pi}{2} \\right)", "3\\sqrt{2}", "\\frac54"}
    assert by_answer["3\\sqrt{2}"].metadata["unique_id"] == "test/algebra/100.json"


def test_training_drops_the_questions_another_evaluation_dataset_asks(tmp_path):
    evaluation = tmp_path / "reprint.jsonl"  # a dataset that reprints one DAPO problem, spaced and cased otherwise
    rows = [{"prompt": "What is the sum of the positive  divisors of\n$12$?", "answer": "28"},
            {"prompt": "What is 1 + 1?", "answer": "2"}]
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskConfig(source="hf", name=DAPO, eval_name=str(evaluation), eval_split="test", eval_size=1)
    loaded = load_hf_prompts(task, "train")
    assert (len(loaded.prompts), loaded.held_out_dropped) == (5, 1)
    assert "What is the sum of the positive divisors of $12$?" not in {p.question for p in loaded.prompts}
    assert describe_task(task)[0] == (f"train: 5 prompts from {DAPO} [train] "
                                      f"(6 rows, 1 dropped: their question is evaluated)")
    assert len(load_prompts(TaskConfig(source="hf", name=DAPO, eval_name=str(evaluation), eval_size=0), "train")) == 6


def test_one_split_holds_out_eval_fraction_disjointly():
    task = TaskConfig(source="hf", name=DAPO, eval_fraction=0.5)
    train, held_out = load_prompts(task, "train"), load_prompts(task, "eval")
    assert len(train) == 3 and len(held_out) == 3        # round(0.5 * 6) = 3 held out
    assert not {p.prompt_id.rsplit("-", 1)[1] for p in train} & {p.prompt_id.rsplit("-", 1)[1] for p in held_out}


def test_a_local_parquet_file_with_explicit_fields(tmp_path):
    path = HF / "DigitalLearningGmbH" / "MATH-lighteval" / "data" / "train-00000-of-00001.parquet"
    task = TaskConfig(source="hf", name=str(path), question_field="problem", answer_field="solution",
                      answer_format="boxed", eval_fraction=0.0)
    assert [p.answer for p in load_prompts(task, "train")][:2] == ["\\frac{1}{6}", "2\\sqrt{3}"]
    named = TaskConfig(source="hf", name=str(path), field_map="math", eval_fraction=0.0)
    assert load_prompts(named, "train") == load_prompts(task, "train")


def test_a_missing_column_is_named_with_the_columns_there_are():
    task = TaskConfig(source="hf", name=MATH, question_field="question")
    with pytest.raises(TaskError, match=r"no column 'question'.*\['problem', 'level', 'solution', 'type'\]"):
        load_prompts(task, "train")
    with pytest.raises(TaskError, match="no column 'answer'"):
        load_prompts(TaskConfig(source="hf", name=DAPO, answer_field="answer"), "train")
    with pytest.raises(TaskError, match="no usable rows of 6.*field 'reward_model.label' is missing"):
        load_prompts(TaskConfig(source="hf", name=DAPO, answer_field="reward_model.label"), "train")


def test_unusable_rows_are_skipped_and_counted_and_a_dataset_without_any_is_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"problem": "ok", "solution": "so \\boxed{3}", "notes": "x" * 201, "level": 2},
            {"problem": "no box", "solution": "it is 3"},
            {"problem": "", "solution": "\\boxed{1}"}, {"problem": "bad", "solution": "\\boxed{}{"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_hf_prompts(TaskConfig(source="hf", name=str(path), field_map="math", eval_fraction=0.0),
                             "train")
    assert [p.answer for p in loaded.prompts] == ["3"] and loaded.rows == 4
    assert loaded.prompts[0].metadata == {"level": 2}    # long text stays out of the metadata every lease carries
    assert [s.split(":")[0] for s in loaded.skipped] == ["row 1", "row 2", "row 3"]
    assert "no \\boxed{} answer" in loaded.skipped[0] and "question 'problem'" in loaded.skipped[1]
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(TaskError, match="no usable rows of 1"):
        load_prompts(TaskConfig(source="hf", name=str(path), field_map="math"), "train")


def test_unknown_datasets_maps_and_splits_fail_clearly(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_prompts(TaskConfig(source="hf", name="no-such-org/no-such-dataset"), "train")
    with pytest.raises(TaskError, match="task.field_map='gsm9k'"):
        load_prompts(TaskConfig(source="hf", name=DAPO, field_map="gsm9k"), "train")
    with pytest.raises(TaskError, match="split 'validation'"):
        load_prompts(TaskConfig(source="hf", name=DAPO, split="validation"), "train")


def test_describe_task_reports_both_splits():
    lines = describe_task(TaskConfig(source="hf", name=DAPO, eval_name=MATH500, eval_split="test", eval_size=2))
    assert lines == [f"train: 6 prompts from {DAPO} [train] (6 rows)",
                     f"eval: 2 prompts from {MATH500} [test] (3 rows)"]


def test_task_size_keeps_a_seeded_sample_of_the_training_rows():
    everything = load_prompts(TaskConfig(source="hf", name=DAPO, eval_fraction=0.0, eval_size=0, size=0), "train")
    assert len(everything) == 6                          # size 0: every row
    task = TaskConfig(source="hf", name=DAPO, eval_fraction=0.0, eval_size=0, size=4)
    sample = load_prompts(task, "train")
    assert len(sample) == 4 and sample == load_prompts(task, "train")  # reproducible
    ids = [p.prompt_id for p in everything]
    assert all(p in everything for p in sample)          # whole prompts, ids unchanged
    assert [ids.index(p.prompt_id) for p in sample] == sorted(ids.index(p.prompt_id) for p in sample)  # file order
    other_seeds = {tuple(p.prompt_id for p in load_prompts(TaskConfig(source="hf", name=DAPO, eval_fraction=0.0,
                                                                      eval_size=0, size=4, seed=s), "train"))
                   for s in range(1, 6)}
    assert len(other_seeds | {tuple(p.prompt_id for p in sample)}) > 1  # the seed picks the sample
    larger = TaskConfig(source="hf", name=DAPO, eval_fraction=0.0, eval_size=0, size=100)
    assert load_prompts(larger, "train") == everything   # a cap above the row count keeps every row


def test_task_size_caps_the_training_rows_left_after_the_held_out_fraction():
    task = TaskConfig(source="hf", name=DAPO, eval_fraction=0.5, size=2)
    train, held_out = load_prompts(task, "train"), load_prompts(task, "eval")
    assert len(train) == 2 and len(held_out) == 3       # round(0.5 * 6) = 3 held out; 2 of the other 3 trained on
    assert not {p.prompt_id.rsplit("-", 1)[1] for p in train} & {p.prompt_id.rsplit("-", 1)[1] for p in held_out}
    assert describe_task(task)[0] == f"train: 2 prompts from {DAPO} [train] (6 rows)"


def test_task_size_caps_the_training_rows_of_a_local_jsonl_file(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(10)))
    whole = TaskConfig(source="jsonl", path=str(path), eval_fraction=0.2, size=0)
    train_all, held_out = load_prompts(whole, "train"), load_prompts(whole, "eval")
    assert len(train_all) == 8 and len(held_out) == 2    # round(0.2 * 10) = 2 held out
    capped = TaskConfig(source="jsonl", path=str(path), eval_fraction=0.2, size=3)
    train = load_prompts(capped, "train")
    assert len(train) == 3 and all(p in train_all for p in train) and train == load_prompts(capped, "train")
    assert load_prompts(capped, "eval") == held_out       # the held-out rows do not depend on size


def test_task_size_zero_means_every_row_only_for_dataset_sources():
    assert TaskConfig(source="hf", name=DAPO, size=0).size == 0
    assert TaskConfig(source="jsonl", path="rows.jsonl", size=0).size == 0
    with pytest.raises(ConfigError, match="task.size"):
        TaskConfig(source="reasoning_gym", size=0)
    with pytest.raises(ConfigError, match="task.size"):
        TaskConfig(source="hf", name=DAPO, size=-1)
