"""Config-time refusals for the SGLang engine (behaviour log-probs must be of the distribution sampled from)."""

import pytest

from common.config import ActorConfig, ConfigError


@pytest.mark.unit
def test_sglang_with_top_p_below_one_is_refused_naming_the_field():
    # sglang 0.5.23 returns log(softmax(logits / T)) of the full vocabulary (srt/layers/sampler.py, standard path:
    # `logprobs = torch.log(probs)` before top-p renormalisation), so with top_p < 1 the behaviour log-prob is not
    # that of the distribution the token was drawn from, and the importance weights would be biased.
    with pytest.raises(ConfigError, match=r"^actor\.top_p: .*sglang"):
        ActorConfig(engine="sglang", top_p=0.9)
    assert ActorConfig(engine="sglang", top_p=1.0).top_p == 1.0
    assert ActorConfig(engine="hf", top_p=0.9).top_p == 0.9  # HFEngine is outside this check
