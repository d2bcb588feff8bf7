"""The config logged to wandb never carries the run's secret."""

import pytest

from common.config import Config, config_to_dict, with_overrides
from common.metrics import redact_secrets

pytestmark = pytest.mark.unit


def test_secret_is_redacted_and_the_config_left_intact():
    cfg = with_overrides(Config(), run={"secret": "abc123"})
    full = config_to_dict(cfg)
    logged = redact_secrets(full)
    assert logged["run"]["secret"] == "<redacted>"
    assert full["run"]["secret"] == "abc123"  # the caller's dict is not modified
    assert logged["learner"] == full["learner"]


def test_empty_secret_stays_empty():
    assert redact_secrets(config_to_dict(Config()))["run"]["secret"] == ""
