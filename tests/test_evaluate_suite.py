"""Evaluation suites: the math6 benchmarks read from fixtures in each dataset card's schema, the avg@k / pass@k
metrics worked by hand, and `python -m learner.evaluate_suite` end to end on the tiny model.

tests/data/hf/<org>/<name>/ hold a handful of hand-written rows laid out like the hub repositories (column names,
types and answer formats of the dataset cards); a suite file points each math6 benchmark at its fixture.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from common.suites import (MATH6, SuiteError, benchmark_metrics, load_benchmark, load_suite, pass_at_k,
                           suite_average)
from common.tasks import TaskError, math_score

HF = Path(__file__).resolve().parent / "data" / "hf"
FIXTURES = {
    "aime24": HF / "HuggingFaceH4" / "aime_2024",
    "aime25": HF / "math-ai" / "aime25",
    "amc23": HF / "math-ai" / "amc23",
    "math500": HF / "HuggingFaceH4" / "MATH-500",
    "minerva": HF / "math-ai" / "minervamath",
    "olympiad": HF / "math-ai" / "olympiadbench",
}


def local(benchmark):
    return replace(benchmark, dataset=str(FIXTURES[benchmark.name]))


def local_suite_file(tmp_path: Path) -> Path:
    """math6 with every dataset replaced by its fixture, as a suite JSON file."""
    entries = [dict(name=b.name, dataset=str(FIXTURES[b.name]), split=b.split, question=b.fields.question,
                    answer=b.fields.answer, answer_format=b.fields.answer_format) for b in MATH6.benchmarks]
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"name": "math6-local", "benchmarks": entries}))
    return path


@pytest.mark.unit
def test_math6_names_the_six_benchmarks_with_their_card_columns():
    assert [(b.name, b.dataset, b.split, b.fields.question, b.fields.answer) for b in MATH6.benchmarks] == [
        ("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer"),
        ("aime25", "math-ai/aime25", "test", "problem", "answer"),
        ("amc23", "math-ai/amc23", "test", "question", "answer"),
        ("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer"),
        ("minerva", "math-ai/minervamath", "test", "question", "answer"),
        ("olympiad", "math-ai/olympiadbench", "test", "question", "final_answer"),
    ]
    assert load_suite("math6") is MATH6


@pytest.mark.integration  # the first datasets.load_dataset of a session takes seconds
def test_each_benchmark_reads_its_fixture_with_the_reference_answers():
    answers = {b.name: [p.answer for p in load_benchmark(local(b)).prompts] for b in MATH6.benchmarks}
    rows = [json.loads(line) for line in (FIXTURES["math500"] / "test.jsonl").read_text().splitlines() if line]
    assert answers == {
        "aime24": ["024", "24", "7"],
        "aime25": ["10", "1", "32"],
        "amc23": ["21.0", "5.0", "6.0"],          # the card's answer column is a number
        "math500": [r["answer"] for r in rows],  # the fixture tests/test_hf_tasks.py reads as well
        "minerva": ["60", "2", "9"],
        "olympiad": ["2^{1009}", "2, 3", "\\frac{5}{6}"],  # final_answer lists: $ removed, elements joined
    }
    assert load_benchmark(local(MATH6.benchmarks[0]), limit=2).prompts[1].prompt_id == "aime_2024-eval-1"


@pytest.mark.unit
def test_olympiad_list_answers_grade_under_the_math_scorer():
    olympiad = load_benchmark(local(MATH6.benchmarks[5])).prompts
    assert math_score(olympiad[0].answer, "so \\boxed{2^{1009}}")
    assert math_score(olympiad[1].answer, "the primes are \\boxed{3, 2}")    # a set: order does not matter
    assert not math_score(olympiad[1].answer, "\\boxed{2}")
    assert math_score(olympiad[2].answer, "\\boxed{5/6}")
    amc = load_benchmark(local(MATH6.benchmarks[2])).prompts
    assert math_score(amc[0].answer, "\\boxed{21}")                         # 21.0 in the dataset


@pytest.mark.unit
def test_a_missing_column_is_an_error_naming_it(tmp_path):
    aime = local(MATH6.benchmarks[0])
    wrong = replace(aime, fields=replace(aime.fields, question="question"))
    with pytest.raises(TaskError, match=r"benchmark aime24: .*no column 'question'.*'problem'"):
        load_benchmark(wrong)
    with pytest.raises(TaskError, match="benchmark aime24: .*split 'test'"):
        load_benchmark(replace(aime, split="test"))


@pytest.mark.unit
def test_suite_files_are_checked_field_by_field(tmp_path):
    suite = load_suite(str(local_suite_file(tmp_path)))
    assert suite.name == "math6-local" and [b.name for b in suite.benchmarks][-1] == "olympiad"
    assert suite.benchmarks[-1].fields.answer_format == "list"
    cases = {
        "[1]": "must be an object with a non-empty list 'benchmarks'",
        '{"benchmarks": [{"name": "a", "dataset": "d", "split": "test", "question": "q"}]}': "'answer' is missing",
        '{"benchmarks": [{"name": "a", "dataset": "d", "split": "s", "question": "q", "answer": "a", "x": 1}]}':
            r"unknown key\(s\) \['x'\]",
        '{"benchmarks": [{"name": "a", "dataset": "d", "split": "s", "question": "q", "answer": "a", '
        '"answer_format": "csv"}]}': "answer_format 'csv'",
        "{not json": "not readable JSON",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(SuiteError, match=message):
            load_suite(str(path))
    with pytest.raises(SuiteError, match="neither a built-in suite"):
        load_suite("math7")


@pytest.mark.unit
def test_pass_at_k_worked_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)    # 1 - C(4,1)/C(5,1) = 1 - 4/5 = c/n
    assert pass_at_k(4, 0, 4) == 0.0                   # nothing correct
    assert pass_at_k(4, 1, 4) == 1.0                   # n = k: any correct sample passes
    assert pass_at_k(32, 3, 2) == pytest.approx(1 - math.comb(29, 2) / math.comb(32, 2))  # 1 - 406/496
    for bad in ((2, 3, 1), (2, 1, 3), (2, 1, 0)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


@pytest.mark.unit
def test_avg_and_pass_at_k_of_a_benchmark_and_the_suite_average():
    correct = [[True, False], [False, False], [True, True]]
    # avg@2 = 3 correct of 6 = 0.5; pass@2 with n = k = 2: (1 + 0 + 1) / 3
    assert benchmark_metrics(correct, 2) == pytest.approx({"avg@2": 0.5, "pass@2": 2 / 3})
    other = benchmark_metrics([[False, True], [False, False]], 2)          # avg 1/4, pass 1/2
    assert suite_average({"a": benchmark_metrics(correct, 2), "b": other}) == pytest.approx(
        {"avg@2": (0.5 + 0.25) / 2, "pass@2": (2 / 3 + 0.5) / 2})


@pytest.mark.integration
def test_cli_evaluates_the_local_suite_on_the_tiny_model(tmp_path, capsys):
    from learner import evaluate_suite

    out = tmp_path / "results.json"
    rc = evaluate_suite.main(["--model", "tiny", "--suite", str(local_suite_file(tmp_path)), "--k", "2",
                              "--limit", "2", "--max-new-tokens", "4", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["suite"] == "math6-local" and results["k"] == 2 and results["temperature"] == 1.0
    assert list(results["benchmarks"]) == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiad"]
    for name, bench in results["benchmarks"].items():
        assert bench["prompts"] == 2 and len(bench["correct"]) == 2 and all(0 <= c <= 2 for c in bench["correct"])
        assert bench["avg@2"] == pytest.approx(sum(bench["correct"]) / 4)
        assert 0.0 <= bench["pass@2"] <= 1.0
    per = results["benchmarks"].values()
    assert results["average"]["avg@2"] == pytest.approx(sum(b["avg@2"] for b in per) / 6)
    printed = capsys.readouterr().out
    assert "average" in printed and "olympiad" in printed


@pytest.mark.integration
def test_cli_reads_a_run_checkpoint_and_refuses_bad_arguments(tmp_path, capsys):
    from learner import evaluate_suite
    from tests.test_export import trained_run

    trained_run(tmp_path / "run", versions=(2,))
    suite = local_suite_file(tmp_path)
    out = tmp_path / "r.json"
    rc = evaluate_suite.main(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "step_00000002"),
                              "--suite", str(suite), "--k", "1", "--limit", "1", "--max-new-tokens", "2",
                              "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["model"].endswith("step_00000002") and results["benchmarks"]["aime24"]["prompts"] == 1
    assert evaluate_suite.main(["--checkpoint", str(tmp_path / "nowhere"), "--suite", str(suite)]) == 2
    assert evaluate_suite.main(["--model", "tiny", "--suite", str(suite), "--k", "0"]) == 2
    assert evaluate_suite.main(["--model", "tiny", "--suite", "math7"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "--k must be >= 1" in err and "math7" in err
