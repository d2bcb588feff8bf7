"""The data-parallel gradient path of learner.step on two gloo ranks (CPU) equals the single-process gradient."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import with_overrides
from common.processes import free_port
from learner.step import accumulate_gradients, build_state, prepare_step
from test_learner_step import example_groups, make_batch, make_cfg, tiny_model

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

RANK_SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_learner_data_parallel import config, run
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=int(sys.argv[3]), world_size=2, init_method=f"tcp://127.0.0.1:{sys.argv[4]}")
grads = run(config())
if dist.get_rank() == 0:
    torch.save(grads, sys.argv[1])
dist.destroy_process_group()
"""


def config():
    # 4 micro-batches of 2 rows: each rank takes 2; modulation over the mini-batch scope needs the all-reduced stats
    groups = example_groups(seed=3, equal_lengths=True)
    seq_len = len(groups[0][0]) + len(groups[0][1][0][0])
    return with_overrides(make_cfg(), learner={"micro_batch_tokens": 2 * seq_len})


def run(cfg):
    model = tiny_model(seed=1)
    prepared = prepare_step(make_batch(example_groups(seed=3, equal_lengths=True)), cfg)
    accumulate_gradients(build_state(model, cfg.learner), prepared.mini_batches[0], prepared.denominators[0], cfg)
    return [p.grad.detach().clone() for p in model.parameters()]


def test_two_ranks_sum_to_the_single_process_gradient(tmp_path):
    torch.set_num_threads(1)
    single = run(config())
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = tmp_path / "grads.pt"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(out), str(Path(__file__).parent), str(rank),
                               port], cwd=REPO, env=env) for rank in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    parallel = torch.load(out, weights_only=True)
    for a, b in zip(single, parallel):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
