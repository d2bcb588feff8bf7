"""scripts/slurm/dynamo.sbatch, rendered for a fake 3-node SLURM allocation (DRY_RUN=1): every command is checked
by parsing its config flags the way the role does and planning the layout from them.

`scontrol` is a test double: a shell script that answers `scontrol show hostnames` with three host names, which
is all the recipe asks of the real one."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from common.config import parse_cli
from common.layout import plan_layout

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def render(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\ngpu-c\\n"\n')
    fake.chmod(0o755)
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN="1", SLURM_JOB_NODELIST="gpu-[a-c]",
                    **env)
    out = subprocess.run(["bash", str(REPO / "scripts/slurm/dynamo.sbatch"), "runs/big/config.json"], env=full_env,
                         capture_output=True, text=True, check=True).stdout
    return [shlex.split(line)[1:] for line in out.splitlines() if line.startswith("RUN ")]


def role_config(argv):
    """The Config a role builds from its command line (--config-file swapped for the preset it was made from)."""
    module_at = argv.index("-m") + 1
    args = argv[module_at + 1:]
    args = args[:args.index("--config-file")] + ["--preset", "gpu-cluster"] + args[args.index("--run-dir") + 2:]
    own = {"--actor-index": None}
    if "--actor-index" in args:
        i = args.index("--actor-index")
        own["--actor-index"] = int(args[i + 1])
        del args[i:i + 2]
    return argv[module_at], parse_cli(args), own["--actor-index"]


def test_rendered_commands_place_buffer_learner_and_actors_consistently(tmp_path):
    # 3 nodes, 8 GPUs each, TP 2: gpu-a runs buffer + learner (8 ranks); gpu-b, gpu-c run 4 actors each
    # (8 / 2), so 8 actors and a weight-sync world of 1 + 8 * 2 = 17
    commands = render(tmp_path, TP="2")
    hosts = [c[0] for c in commands]
    assert hosts == ["gpu-a", "gpu-a"] + ["gpu-b"] * 4 + ["gpu-c"] * 4
    roles = [role_config(c) for c in commands]
    assert [r[0] for r in roles] == ["buffer.server", "learner.train"] + ["actor.worker"] * 8
    buffer_cfg, learner_cfg = roles[0][1], roles[1][1]
    assert buffer_cfg.buffer.address == "tcp://0.0.0.0:5555" and buffer_cfg.buffer.curve_secret_key_file
    assert learner_cfg.buffer.address == "tcp://gpu-a:5555"
    assert learner_cfg.learner.sync_address == "gpu-a:5556"
    assert learner_cfg.learner.sync_control_address == "tcp://gpu-a:5557"
    assert commands[1][commands[1].index("--nproc-per-node") + 1] == "8"
    assert plan_layout(learner_cfg).world_size == 17
    for slot, (host, (_, cfg, index)) in enumerate(zip(hosts[2:], roles[2:])):
        assert index == slot and host == ("gpu-b" if slot < 4 else "gpu-c")
        layout = plan_layout(cfg)
        assert layout.world_size == 17 and cfg.buffer.address == "tcp://gpu-a:5555"
        # slot k of a node: GPUs 2k, 2k+1 of that node; ranks 1 + 2 * index, 2 + 2 * index
        assert layout.actor_gpus(index) == (2 * (index % 4), 2 * (index % 4) + 1)
        assert layout.engines_of(index)[0].rank_offset == 1 + 2 * index


def test_tp_that_does_not_divide_the_node_is_refused(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(tmp_path, TP="3")
    assert "TP=3 does not divide GPUS_PER_NODE=8" in err.value.stderr
