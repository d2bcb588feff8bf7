"""bench/sync_grpo.py: the reference loop's per-token log-probabilities of a right-padded group equal those of
each sequence run alone (a shifted slice would score the wrong tokens)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import sync_grpo  # noqa: E402
from common.models import load_model  # noqa: E402


@pytest.mark.integration
def test_group_logprobs_equal_each_sequence_alone():
    torch.manual_seed(0)
    model = load_model("tiny", dtype=torch.float32, device="cpu")
    prompt, responses = [5, 9, 14, 3], [[7, 8, 2], [11]]
    with torch.no_grad():
        got = sync_grpo.response_logprobs(model, prompt, responses, pad_id=0)
        for response, values in zip(responses, got):
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            # Token t of the response is predicted at position len(prompt) + t - 1.
            expected = torch.stack([logp[len(prompt) + t - 1, token] for t, token in enumerate(response)])
            assert values.shape == (len(response),)
            torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
