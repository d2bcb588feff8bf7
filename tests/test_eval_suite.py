"""A benchmark suite (run.eval_suite) evaluated during a run: the buffer posts the suite's benchmarks as evaluation
items tagged with their benchmark, the actors score them with the math scorer, and the buffer's record carries
per-benchmark avg@k / pass@k and the suite average computed by common.suites' functions. Benchmarks are the local
fixtures of tests/test_evaluate_suite.py (this machine reaches no hub)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from buffer.evaluation import EvalJobs, ItemOutcome, aggregate
from buffer.state import BufferState
from common.config import ConfigError, RunConfig, with_overrides
from common.metrics import read_metrics
from common.suites import MATH6, benchmark_metrics, suite_average
from test_buffer_state import make_prompts
from test_eval_buffer import answer_all, eval_cfg, serving
from test_evaluate_suite import FIXTURES, local_suite_file

BENCHES = [b.name for b in MATH6.benchmarks]


def suite_cfg(tmp_path, size=2, **run):
    return with_overrides(eval_cfg(**run), run={"eval_suite": str(local_suite_file(tmp_path)),
                                                "eval_suite_size": size})


def suite_with_a_missing_amc23(tmp_path):
    """The local math6 suite file with amc23's dataset pointing at a directory that does not exist."""
    suite = json.loads(local_suite_file(tmp_path).read_text())
    suite["benchmarks"][2]["dataset"] = str(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(suite))
    return bad


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.unit
def test_config_names_an_unknown_suite_and_lists_the_known_ones():
    assert RunConfig(eval_suite="math6").eval_suite == "math6"
    assert RunConfig(eval_suite="/data/my-suite.json").eval_suite_size == 0
    with pytest.raises(ConfigError, match=r"run\.eval_suite.*math7.*math6"):
        RunConfig(eval_suite="math7")
    with pytest.raises(ConfigError, match=r"run\.eval_suite_size"):
        RunConfig(eval_suite="math6", eval_suite_size=-1)


@pytest.mark.unit
def test_paper_presets_evaluate_math6_with_k_32():
    from common.config import PRESETS

    for name in ("paper-1.5b", "paper-7b"):
        run = PRESETS[name]().run
        assert (run.eval_suite, run.eval_suite_size, run.eval_samples) == ("math6", 64, 32), name


# ------------------------------------------------------------------------------------------------ aggregation


@pytest.mark.unit
def test_aggregate_per_benchmark_hand_worked():
    def item(bench, greedy, correct):
        return ItemOutcome(greedy, tuple(correct), tuple(float(c) for c in correct), (3,) * len(correct), (0, 0),
                           benchmark=bench)

    outcomes = [item("a", False, [True, False]), item("a", False, [False, False]), item("a", True, [True]),
                item("a", True, [False]), item("b", False, [True, True]), item("b", True, [False])]
    rec = aggregate(outcomes, 2, 4, 1.0)
    # a: sampled avg@2 = 1 correct of 4 = 0.25; pass@2 (n = k = 2) = (1 + 0) / 2 = 0.5; greedy 1 of 2 = 0.5
    # b: sampled avg@2 = 2 of 2 = 1.0; pass@2 = 1.0; greedy 0 of 1 = 0.0
    # suite: unweighted mean over a and b: avg@2 0.625, pass@2 0.75, pass@1 0.25
    assert rec["eval/a/avg@2"] == 0.25 and rec["eval/a/pass@2"] == 0.5 and rec["eval/a/pass@1"] == 0.5
    assert rec["eval/b/avg@2"] == 1.0 and rec["eval/b/pass@2"] == 1.0 and rec["eval/b/pass@1"] == 0.0
    assert rec["eval/suite/avg@2"] == 0.625 and rec["eval/suite/pass@2"] == 0.75 and rec["eval/suite/pass@1"] == 0.25
    # pooled over every item as before: greedy 1 of 3, sampled items with a correct sample 2 of 3
    assert rec["eval/pass@1"] == pytest.approx(1 / 3) and rec["eval/pass@2"] == pytest.approx(2 / 3)
    plain = aggregate([item("", True, [True])], 2, 4, 1.0)
    assert not any(key.startswith("eval/suite/") for key in plain)


# ------------------------------------------------------------------------------------------------ buffer


@pytest.mark.integration
def test_the_buffer_serves_the_suite_tagged_by_benchmark_and_writes_per_benchmark_metrics(tmp_path):
    cfg = suite_cfg(tmp_path, eval_share=1.0)  # every lease an evaluation lease while the job is pending
    jobs = EvalJobs(cfg, make_prompts(3))  # the suite replaces any held-out prompts handed in
    assert len(jobs.items) == 2 * 6 * 2  # greedy + sampled, 6 benchmarks, 2 prompts each (run.eval_suite_size)
    run_dir = tmp_path / "run"
    with serving(cfg, 0, run_dir=run_dir) as client:
        seen: dict[str, str] = {}
        while len(seen) < 24:
            grant = client.lease("a0", 4)
            assert grant.eval_version == 0
            for it in grant.items:
                assert it.benchmark in BENCHES and it.prompt_id.split(":")[2] == it.benchmark
                seen[it.prompt_id] = it.benchmark
            answer_all(client, grant, correct_of=lambda it: [it.benchmark == "aime24"] * it.n)
        assert client.lease("a0", 4).eval_version == -1  # the job is finished
        deadline = time.monotonic() + 10
        while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir / "metrics.jsonl", "eval"):
            assert time.monotonic() < deadline, "no eval record"
            time.sleep(0.05)
    (rec,) = read_metrics(run_dir / "metrics.jsonl", "eval")
    # every aime24 sample right, every other wrong: aime24 1.0 everywhere, the others 0.0, the suite 1/6
    for bench in BENCHES:
        want = 1.0 if bench == "aime24" else 0.0
        assert (rec[f"eval/{bench}/avg@4"], rec[f"eval/{bench}/pass@4"], rec[f"eval/{bench}/pass@1"]) == (
            want, want, want), bench
    for key in ("avg@4", "pass@4", "pass@1"):
        assert rec[f"eval/suite/{key}"] == pytest.approx(1 / 6)


@pytest.mark.integration
def test_a_benchmark_that_cannot_be_loaded_stops_the_buffer_naming_it(tmp_path):
    from common.tasks import TaskError

    cfg = with_overrides(eval_cfg(), run={"eval_suite": str(suite_with_a_missing_amc23(tmp_path))})
    with pytest.raises(TaskError, match="benchmark amc23"):
        BufferState(cfg, make_prompts(4), now=time.monotonic())


@pytest.mark.integration
def test_the_buffer_process_names_a_benchmark_it_cannot_read_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bad = suite_with_a_missing_amc23(tmp_path)
    out = subprocess.run([sys.executable, "-m", "buffer.server", "--preset", "tiny", "--run.eval-suite", str(bad),
                          "--buffer.address", "tcp://127.0.0.1:0"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("buffer: benchmark amc23: dataset ")


@pytest.mark.integration
def test_the_training_pool_leaves_out_every_question_a_benchmark_asks(tmp_path):
    from buffer.server import load_prompt_records

    pool = tmp_path / "pool.jsonl"
    rows = [{"prompt_id": "p0", "question": "How many subsets does a  $5$-element\nset have?", "answer": "32"},
            {"prompt_id": "p1", "question": "What is 2 + 3?", "answer": "5"},
            {"prompt_id": "p2", "question": "what is $7\\cdot 11\\cdot 13$ modulo $1000$?", "answer": "1"}]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # aime25's fixture asks p0 and p2 (its third and second rows); suite size 1 evaluates only its first row, yet the
    # whole benchmark is kept out of training
    cfg = suite_cfg(tmp_path, size=1)
    assert [r.prompt_id for r in load_prompt_records(cfg, str(pool))] == ["p1"]
    assert [r.prompt_id for r in load_prompt_records(eval_cfg(), str(pool))] == ["p0", "p1", "p2"]  # no suite


# ------------------------------------------------------------------------------------------------ actor


@pytest.mark.integration
def test_the_actor_scores_suite_items_with_the_math_scorer(tmp_path):
    import numpy as np

    from actor.engines.base import GeneratedSample
    from actor.worker import Actor
    from common.schemas import WorkItem
    from common.tasks import prompt_from_work_item
    from test_actor_worker import _config

    cfg = _config(tmp_path)  # task larger_digit: its own scorer reads the last number of a response
    actor = Actor(cfg, 0, tmp_path)
    try:
        ids = actor.tokenizer("The answer is 24")["input_ids"]
        sample = GeneratedSample(np.asarray(ids, dtype=np.int32), np.zeros(len(ids), dtype=np.float32),
                                 np.zeros(len(ids), dtype=np.int32), "length")
        items = [WorkItem(prompt_id="eval:sampled:aime24-0", prompt="q", n=1, answer="24", benchmark="aime24"),
                 WorkItem(prompt_id="eval:sampled:larger-0", prompt="q", n=1, answer="24")]
        results, aborted = actor._score_eval(items, [prompt_from_work_item(it) for it in items],
                                             [[sample], [sample]])
    finally:
        actor.close()
    # no \boxed{}: wrong under the math scorer (suite item), right under the task's scorer (held-out item)
    assert aborted == [] and [r.correct for r in results] == [[False], [True]]


@pytest.mark.integration
def test_an_actor_served_suite_record_equals_the_suite_functions_on_its_results(tmp_path):
    from actor.worker import Actor
    from common.config import TaskConfig
    from common.models import load_model, load_tokenizer
    from common.suites import load_benchmark, load_suite
    from common.tasks import encode_prompt, math_score
    from learner.evaluate import generate_batched
    from test_actor_worker import _config
    from test_eval_actor import _eval_records, buffer_thread, perturbed_tiny_weights

    cfg = _config(tmp_path, actor={"max_new_tokens": 4},
                  run={"eval_samples": 2, "eval_every": 0, "eval_suite": str(local_suite_file(tmp_path)),
                       "eval_suite_size": 2})
    weights = perturbed_tiny_weights()
    submitted = []
    with buffer_thread(cfg, tmp_path) as cfg:
        actor = Actor(cfg, 0, tmp_path)
        actor.engine.load_weights(weights, 0)
        real_connect = actor._connect

        def connect_and_record():  # the real client; its results are also kept here
            client = real_connect()
            submit = client.submit_eval
            client.submit_eval = lambda lease_id, result: (submitted.append(result), submit(lease_id, result))[1]
            return client

        actor._connect = connect_and_record
        worker = threading.Thread(target=actor.run, daemon=True)
        worker.start()
        try:
            (record,) = _eval_records(tmp_path, 50.0, worker)
        finally:
            actor.request_stop()
            worker.join(30)
            actor.close()
    by_id = {r.item_id: r for r in submitted}
    assert len(by_id) == 24
    per, greedy_per = {}, {}
    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    model.load_state_dict(weights, strict=False)
    task = TaskConfig(source="hf", scorer="math", system_prompt=cfg.task.system_prompt,
                      use_chat_template=cfg.task.use_chat_template)
    for bench in load_suite(cfg.run.eval_suite).benchmarks:
        prompts = load_benchmark(bench, 2).prompts
        sampled = [by_id[f"eval:sampled:{bench.name}:{p.prompt_id}"].correct for p in prompts]
        per[bench.name] = benchmark_metrics(sampled, 2)
        # the greedy part, generated learner-side as learner.evaluate_suite generates, graded by its scorer
        ids = [encode_prompt(tokenizer, p.question, task) for p in prompts]
        responses = generate_batched(model, tokenizer, ids, max_new_tokens=4, do_sample=False,
                                     num_return_sequences=1, temperature=1.0, batch_size=64)
        greedy = [math_score(p.answer, tokenizer.decode(r)) for p, r in zip(prompts, responses)]
        assert [by_id[f"eval:greedy:{bench.name}:{p.prompt_id}"].correct for p in prompts] == [[c] for c in greedy]
        greedy_per[bench.name] = sum(greedy) / len(greedy)
        assert record[f"eval/{bench.name}/avg@2"] == per[bench.name]["avg@2"]
        assert record[f"eval/{bench.name}/pass@2"] == per[bench.name]["pass@2"]
        assert record[f"eval/{bench.name}/pass@1"] == greedy_per[bench.name]
    average = suite_average(per)
    assert record["eval/suite/avg@2"] == pytest.approx(average["avg@2"])
    assert record["eval/suite/pass@2"] == pytest.approx(average["pass@2"])
    assert record["eval/suite/pass@1"] == pytest.approx(sum(greedy_per.values()) / 6)
    assert set(FIXTURES) == set(BENCHES)


# ------------------------------------------------------------------------------------------------ dry run


@pytest.mark.integration
def test_the_dry_run_reads_the_suite_and_names_a_benchmark_it_cannot_read(tmp_path, capsys):
    import run_async

    suite = local_suite_file(tmp_path)
    args = ["--preset", "tiny", "--dry-run", "--run.runs-dir", str(tmp_path / "runs"), "--run.eval-suite-size", "2"]
    assert run_async.main([*args, "--run.eval-suite", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "eval suite " + str(suite) + ": 8 samples + 1 greedy answer per prompt, 2 prompts per benchmark" in out
    assert "eval suite aime24: " in out and "eval suite olympiad: " in out and "2 prompts of" in out
    spec = json.loads(suite.read_text())
    spec["benchmarks"][2]["dataset"] = str(tmp_path / "missing")
    suite.write_text(json.dumps(spec))
    assert run_async.main([*args, "--run.eval-suite", str(suite)]) == 0
    assert "warning: run.eval_suite: benchmark amc23: " in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ display


SUITE_RECORDS = [
    {"role": "learner", "step": 2, "time": 1008.0, "time/fetch_wait_s": 0.0, "time/step_s": 4.0,
     "reward/mean": 0.2},
    {"role": "eval", "step": 0, "time": 1005.0, "eval/pass@1": 0.125, "eval/pass@2": 0.25,
     "eval/aime24/avg@2": 0.0, "eval/suite/avg@2": 0.1, "eval/suite/pass@2": 0.2},
    {"role": "eval", "step": 2, "time": 1011.0, "eval/pass@1": 0.5, "eval/pass@2": 0.75,
     "eval/aime24/avg@2": 0.5, "eval/suite/avg@2": 0.3, "eval/suite/pass@2": 0.45},
]


@pytest.mark.integration
def test_final_summary_and_report_show_the_suite_average(tmp_path):
    import io

    from rich.console import Console

    from common.config import PRESETS
    from common.progress import final_report
    from common.report import build_figure, load_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SUITE_RECORDS))
    cfg = with_overrides(PRESETS["tiny"](), run={"eval_samples": 2, "eval_suite": "math6"})
    out = io.StringIO()
    assert final_report(run_dir, cfg, "completed", Console(file=out, width=200)) == 0
    assert "suite math6 (mean over benchmarks) avg@2: 0.100 -> 0.300; pass@2: 0.200 -> 0.450" in out.getvalue()
    fig = build_figure(load_run(run_dir))
    quality = next(ax for ax in fig.axes if ax.get_title() == "Reward and held-out accuracy vs learner steps")
    (line,) = [ln for ln in quality.get_lines() if ln.get_label().startswith("suite avg@2")]
    assert list(line.get_ydata()) == [0.1, 0.3]


@pytest.mark.unit
def test_a_suite_file_benchmark_name_must_fit_a_metric_key(tmp_path):
    from common.suites import SuiteError, load_suite

    for bad in ("aime/24", "a" * 65, "two words"):
        path = tmp_path / "s.json"
        path.write_text(json.dumps({"benchmarks": [{"name": bad, "dataset": "d", "split": "test", "question": "q",
                                                    "answer": "a"}]}))
        with pytest.raises(SuiteError, match="benchmark 0: name"):
            load_suite(str(path))


@pytest.mark.unit
def test_with_a_suite_the_buffer_does_not_load_the_tasks_held_out_split():
    from buffer.server import load_eval_prompt_records
    from common.config import PRESETS

    cfg = PRESETS["tiny"]()
    assert len(load_eval_prompt_records(cfg)) == cfg.task.eval_size  # the held-out split without a suite
    assert load_eval_prompt_records(with_overrides(cfg, run={"eval_suite": "math6"})) == []
