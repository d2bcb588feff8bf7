"""Config validation, CLI overrides and the resolved-config round trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import (PRESETS, AlgorithmConfig, Config, ConfigError, LearnerConfig, config_from_dict,
                           config_to_dict, load_config, parse_cli, save_config)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name, tmp_path):
    cfg = PRESETS[name]()
    save_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_min=9, n_mean=8, n_max=12), "algo.n_mean"),
        (dict(n_min=4, n_mean=13, n_max=12), "algo.n_mean"),
        (dict(max_staleness=-1), "algo.max_staleness"),
        (dict(clip_eps_low=0.0), "algo.clip_eps_low"),
        (dict(clip_eps_high=-0.1), "algo.clip_eps_high"),
        (dict(is_cap=0.5), "algo.is_cap"),
        (dict(mastery=1.5), "algo.mastery"),
    ],
)
def test_invalid_algorithm_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AlgorithmConfig(**kwargs)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_a_final_learning_rate_ratio_outside_0_1_names_the_field(ratio):
    with pytest.raises(ConfigError, match=r"learner\.lr_final_ratio"):
        LearnerConfig(lr_final_ratio=ratio)


def test_cli_overrides_preset_fields():
    cfg = parse_cli(["--preset", "tiny", "--algo.max-staleness", "0", "--actor.temperature", "0.5"])
    assert cfg.algo.max_staleness == 0
    assert cfg.actor.temperature == 0.5
    assert cfg.run.model == "tiny"  # untouched preset field survives


def test_cli_config_file_is_the_base(tmp_path):
    save_config(PRESETS["tiny"](), tmp_path / "c.json")
    cfg = parse_cli(["--config-file", str(tmp_path / "c.json"), "--learner.lr", "0.5"])
    assert cfg.learner.lr == 0.5 and cfg.run.model == "tiny"


def test_unknown_preset_and_bad_value_exit_with_message():
    with pytest.raises(SystemExit):
        parse_cli(["--preset", "nope"])
    proc = subprocess.run([sys.executable, "-c", "from common.config import parse_cli; parse_cli()",
                           "--algo.n-min", "99"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "algo.n_mean" in proc.stderr + proc.stdout


def test_unknown_and_invalid_keys_in_file_are_rejected():
    with pytest.raises(ConfigError, match="unknown field algo.'typo'"):
        config_from_dict({"algo": {"typo": 1}})
    with pytest.raises(ConfigError, match="n_max"):
        config_from_dict({"algo": {"n_max": "many"}})
    partial = config_from_dict({"learner": {"lr": 0.1}})
    assert partial.learner.lr == 0.1 and partial.algo == Config().algo
    assert json.loads(json.dumps(config_to_dict(partial)))["learner"]["lr"] == 0.1


def test_a_saved_config_with_a_renamed_field_still_loads():
    """task.prompt_field became task.question_field: an older run's config.json must still resume."""
    from common.config import config_from_dict

    cfg = config_from_dict({"task": {"prompt_field": "problem"}})
    assert cfg.task.question_field == "problem"


def test_one_eval_sample_is_refused_because_its_pass_at_1_would_overwrite_the_greedy_one():
    # buffer.evaluation.aggregate writes greedy "eval/pass@1" and sampled f"eval/pass@{k}": with k = 1 the sampled
    # score would silently replace the greedy one.
    from common.config import RunConfig

    with pytest.raises(ConfigError, match=r"run\.eval_samples.*greedy"):
        RunConfig(eval_samples=1)
    assert RunConfig(eval_samples=2).eval_samples == 2
