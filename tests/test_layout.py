"""common/layout.py: engine ownership, weight-sync rank offsets, GPU placement and what is refused.

Every expected layout is worked by hand in the comment beside it (world = 1 learner rank + the engines' ranks)."""

import pytest

from common.config import PRESETS, ConfigError, with_overrides
from common.layout import IN_PROCESS, LAUNCHED, EngineSlot, cuda_index, learner_gpu, narrowed_env, plan_layout

pytestmark = pytest.mark.unit


def sglang_cfg(**actor):
    return with_overrides(PRESETS["tiny"](), actor={"engine": "sglang", **actor})


def test_two_urls_two_actors_tp2_each_actor_owns_one_engine():
    # actor 0 owns url a at ranks 1-2, actor 1 owns url b at ranks 3-4; world = 1 + 2 + 2 = 5
    layout = plan_layout(sglang_cfg(num_actors=2, sglang_tp_size=2, sglang_urls=("http://a:1", "http://b:1")))
    assert layout.engines == (EngineSlot(0, "http://a:1", 2, 1, ()), EngineSlot(1, "http://b:1", 2, 3, ()))
    assert layout.world_size == 5 and layout.weight_layout == "per_tensor"
    assert [e.url for e in layout.engines_of(1)] == ["http://b:1"]


def test_urls_are_dealt_in_contiguous_blocks_first_actors_get_the_remainder():
    # 5 URLs over 2 actors: 5 = 2*2 + 1, so actor 0 gets u0 u1 u2 (ranks 1, 2, 3), actor 1 gets u3 u4 (4, 5)
    urls = tuple(f"http://h{i}:30000" for i in range(5))
    layout = plan_layout(sglang_cfg(num_actors=2, sglang_urls=urls))
    assert [(e.actor_index, e.url, e.rank_offset) for e in layout.engines] == [
        (0, urls[0], 1), (0, urls[1], 2), (0, urls[2], 3), (1, urls[3], 4), (1, urls[4], 5)]
    assert layout.world_size == 6


def test_fewer_urls_than_actors_or_a_repeated_url_is_refused():
    with pytest.raises(ConfigError, match="actor.sglang_urls: 1 server"):
        plan_layout(sglang_cfg(num_actors=2, sglang_urls=("http://a:1",)))
    with pytest.raises(ConfigError, match="listed twice"):
        plan_layout(sglang_cfg(num_actors=2, sglang_urls=("http://a:1", "http://a:1")))


def test_launched_engines_take_the_gpus_after_the_learners():
    # learner on GPU 0; tp 2: actor 0 on GPUs 1,2 at ranks 1-2, actor 1 on GPUs 3,4 at ranks 3-4; world 5
    layout = plan_layout(sglang_cfg(num_actors=2, sglang_tp_size=2))
    assert layout.engines == (EngineSlot(0, LAUNCHED, 2, 1, (1, 2)), EngineSlot(1, LAUNCHED, 2, 3, (3, 4)))
    assert layout.world_size == 5 and layout.learner_gpus == (0,) and not layout.colocated


def test_explicit_actor_gpus_are_sliced_in_actor_order():
    # learner on 0,1; actor.gpus 7,6,5,4 with tp 2: actor 0 -> (7, 6), actor 1 -> (5, 4)
    cfg = with_overrides(sglang_cfg(num_actors=2, sglang_tp_size=2, gpus=(7, 6, 5, 4)), learner={"gpus": (0, 1)})
    assert [e.gpu_ids for e in plan_layout(cfg).engines] == [(7, 6), (5, 4)]
    with pytest.raises(ConfigError, match="need 4 GPU ids"):
        plan_layout(sglang_cfg(num_actors=2, sglang_tp_size=2, gpus=(1, 2, 3)))


def test_actor_hosts_of_their_own_restart_gpu_slices_per_host():
    # 4 actors, 2 per host, tp 4: actors 0 and 2 on GPUs 0-3 of their hosts, 1 and 3 on GPUs 4-7;
    # rank offsets 1, 5, 9, 13 (1 + 4j); world = 1 + 4*4 = 17. Not the learner's host: GPU 0 is allowed.
    layout = plan_layout(sglang_cfg(num_actors=4, sglang_tp_size=4, actors_per_host=2))
    assert [(e.gpu_ids, e.rank_offset) for e in layout.engines] == [
        ((0, 1, 2, 3), 1), ((4, 5, 6, 7), 5), ((0, 1, 2, 3), 9), ((4, 5, 6, 7), 13)]
    assert layout.world_size == 17


def test_sglang_engine_on_a_learner_gpu_or_a_gpu_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="NCCL cannot place two ranks"):
        plan_layout(sglang_cfg(num_actors=1, gpus=(0,)))
    with pytest.raises(ConfigError, match="actor.gpus: GPU ids must not repeat"):
        sglang_cfg(num_actors=2, sglang_tp_size=2, gpus=(2, 3, 3, 4))
    # the learner on the CPU leaves every GPU to the engines
    cpu_learner = with_overrides(sglang_cfg(num_actors=1, gpus=(0,)), learner={"device": "cpu"})
    assert plan_layout(cpu_learner).engines[0].gpu_ids == (0,)


def test_hf_engines_share_the_learners_gpu_over_gloo():
    # one GPU: learner on 0, both HF actors on 0 (ranks 1 and 2, world 3), weights as flat buckets over gloo
    layout = plan_layout(with_overrides(PRESETS["tiny"](), actor={"num_actors": 2}))
    assert layout.engines == (EngineSlot(0, IN_PROCESS, 1, 1, (0,)), EngineSlot(1, IN_PROCESS, 1, 2, (0,)))
    assert layout.world_size == 3 and layout.weight_layout == "flat" and layout.colocated
    hf_own = plan_layout(with_overrides(PRESETS["tiny"](), actor={"num_actors": 2, "gpus": (1, 2)}))
    assert [e.gpu_ids for e in hf_own.engines] == [(1,), (2,)] and not hf_own.colocated


def test_learner_rank_on_an_engine_gpu_is_refused():
    # learner.gpus empty: local rank r -> GPU r; the launched engine took GPU 1 (after learner.gpus default (0,))
    cfg = sglang_cfg(num_actors=1)
    assert learner_gpu(cfg, 0) == 0
    with pytest.raises(ConfigError, match="learner rank 1 on GPU 1"):
        learner_gpu(cfg, 1)
    with pytest.raises(ConfigError, match="local rank 2 has no GPU"):
        learner_gpu(with_overrides(cfg, learner={"gpus": (0, 1)}), 2)


def test_narrowed_environment_maps_gpu_ids_through_an_outer_narrowing():
    # SLURM gave this host's job GPUs 4-7 (CUDA_VISIBLE_DEVICES=4,5,6,7): GPU ids 1,2 are devices "5","6"
    outer = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    child = narrowed_env((1, 2), outer)
    assert child == {"CUDA_VISIBLE_DEVICES": "5,6", "DYNAMO_GPU_IDS": "1,2"}
    # inside the child, GPU id 2 is its device 1, and its own child for GPU 2 sees device "6" again
    assert cuda_index(2, child) == 1 and cuda_index(5, {}) == 5
    assert narrowed_env((2,), child)["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(ConfigError, match="GPU 0 is not among this role's GPUs"):
        cuda_index(0, child)
    with pytest.raises(ConfigError, match="not visible"):
        narrowed_env((5,), outer)


@pytest.mark.integration
def test_actor_attaches_only_to_its_own_servers_at_its_rank_offset():
    # 2 actors, 2 URLs, tp 2: actor 1 drives only server b and joins at ranks 3-4 of a world of 5
    from actor.engines.sglang import SGLangEngine
    from test_sglang_engine import FakeSGLang

    a, b = FakeSGLang(), FakeSGLang()
    cfg = sglang_cfg(num_actors=2, sglang_tp_size=2, sglang_urls=(a.url, b.url))
    engine = SGLangEngine.from_config(cfg, 1)
    try:
        assert [s.url for s in engine.servers] == [b.url]
        assert engine.rank_offset == 3
    finally:
        engine.close()
        a.shutdown(), b.shutdown()


@pytest.mark.integration
def test_learner_sizes_the_weight_group_from_the_layout():
    # 4 URLs over 2 actors, tp 1: ranks 1..4 for the engines, world = 1 + 4 = 5
    import torch

    from common.processes import free_port
    from learner.train import build_sender

    cfg = with_overrides(sglang_cfg(num_actors=2, sglang_urls=tuple(f"http://h{i}:1" for i in range(4))),
                         learner={"sync_address": f"127.0.0.1:{free_port()}",
                                  "sync_control_address": f"tcp://127.0.0.1:{free_port()}"})
    sender = build_sender(cfg, torch.device("cpu"))
    try:
        assert sender.world_size == 5 and sender.layout == "per_tensor"
    finally:
        sender.close()


def test_launched_server_sees_only_its_gpus_and_starts_at_the_first(monkeypatch):
    from actor.engines.sglang import server_command

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DYNAMO_GPU_IDS", raising=False)
    argv, env = server_command("/m", port=1, tp_size=2, dtype="bfloat16", seed=0, gpu_ids=(3, 4))
    assert argv[argv.index("--base-gpu-id") + 1] == "0" and argv[argv.index("--tp-size") + 1] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "3,4"


def test_supervisor_gives_each_role_its_gpus_and_refuses_a_bad_layout(monkeypatch, tmp_path):
    # 2 launched SGLang engines of tp 2: learner sees GPU 0, actor 0 GPUs 1,2, actor 1 GPUs 3,4
    from common.supervisor import Supervisor

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DYNAMO_GPU_IDS", raising=False)
    sup = Supervisor(sglang_cfg(num_actors=2, sglang_tp_size=2), tmp_path)
    assert sup.learner.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert [a.env["CUDA_VISIBLE_DEVICES"] for a in sup.actors] == ["1,2", "3,4"]
    assert sup.actors[1].env["DYNAMO_GPU_IDS"] == "3,4"
    cpu = Supervisor(with_overrides(PRESETS["tiny"](), learner={"device": "cpu"}, actor={"device": "cpu"}), tmp_path)
    assert "CUDA_VISIBLE_DEVICES" not in cpu.learner.env and "CUDA_VISIBLE_DEVICES" not in cpu.actors[0].env
    with pytest.raises(ConfigError, match="NCCL cannot place"):
        Supervisor(sglang_cfg(gpus=(0,)), tmp_path)


def test_hf_engine_device_is_its_layout_gpu_in_the_roles_own_numbering():
    from common.layout import hf_engine_device

    two = with_overrides(PRESETS["tiny"](), actor={"num_actors": 2, "gpus": (2, 5)})
    assert hf_engine_device(two, 1, cuda_available=True) == "cuda:5"
    narrowed = {"CUDA_VISIBLE_DEVICES": "5", "DYNAMO_GPU_IDS": "5"}
    monkey_env = pytest.MonkeyPatch()
    with monkey_env.context() as m:
        for k, v in narrowed.items():
            m.setenv(k, v)
        assert hf_engine_device(two, 1, cuda_available=True) == "cuda:0"
    assert hf_engine_device(two, 1, cuda_available=False) == "cpu"
    assert hf_engine_device(with_overrides(two, actor={"device": "cuda:3"}), 0, cuda_available=True) == "cuda:3"
