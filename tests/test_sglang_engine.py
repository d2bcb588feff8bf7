"""SGLangEngine request building and parsing, against a recording HTTP server on 127.0.0.1.

No GPU or sglang here: these tests check the typed request bodies (the field names and types of the SGLang HTTP
contract in docs/ARCHITECTURE.md), reply parsing, per-token versions, abort resubmission/drop, the version probe at
attach, the order of the weight-update session and its cleanup after a failure, using a stand-in server that
records every request and answers with sglang 0.5.23's refusal rules. The `gpu` test at the end runs a real SGLang
server where CUDA and sglang are installed.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from actor.engines.base import SamplingParams
from actor.engines.sglang import (GenerateRequest, MetaInfo, SGLangEngine, SGLangError, SGLangServer,
                                  build_generate_request, check_sglang_version, parse_generate_response,
                                  token_versions)
from common.schemas import TensorSpec, WeightAnnouncement

KNOWN_SAMPLING_KEYS = {"temperature", "top_p", "max_new_tokens", "stop_token_ids", "sampling_seed"}


class FakeSGLang(ThreadingHTTPServer):
    """Records (method, path, body) and answers /generate with output ids [7, 8, 9] (finish 'length')."""

    def __init__(self, *, has_session=True, abort_first=0, weight_version="default", health_status=200,
                 session_open=False, failing_updates=0, version="0.5.23"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.log, self.lock = [], threading.Lock()
        self.has_session, self.abort_left = has_session, abort_first
        self.weight_version, self.health_status = weight_version, health_status
        self.session_open, self.failing_updates, self.version = session_open, failing_updates, version
        self.groups = set()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self):
        return [path for _, path, _ in self.log if path != "/generate"]

    def generate_reply(self, body):
        outputs = []
        for _ in body["input_ids"]:
            with self.lock:
                abort, self.abort_left = self.abort_left > 0, max(self.abort_left - 1, 0)
            ids = [7] if abort else [7, 8, 9]
            outputs.append({"text": None, "output_ids": ids, "meta_info": {
                "output_token_logprobs": [[-0.5 - 0.1 * i, t, None] for i, t in enumerate(ids)],
                "finish_reason": {"type": "abort" if abort else "length", "length": 3},
                "weight_version": self.weight_version, "prompt_tokens": 4}})
        return outputs


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.log.append(("GET", self.path, None))
        if self.path == "/server_info":
            self._reply(200, {"version": self.server.version, "internal_states": []})
            return
        status = self.server.health_status if self.path == "/health_generate" else 200
        self._reply(status, {"success": status == 200})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.server.log.append(("POST", self.path, body))
        if self.path.endswith("_weight_update") and not self.server.has_session:
            self._reply(404, {"detail": "Not Found"})
        elif self.path.endswith("_weight_update") or self.path == "/update_weights_from_distributed":
            self._reply(*self._session_rule())
        elif self.path == "/generate":
            self._reply(200, self.server.generate_reply(body))
        elif self.path == "/init_weights_update_group":
            self.server.groups.add(body["group_name"])
            self._reply(200, {"success": True, "message": "Succeeded to initialize custom process group."})
        elif self.path == "/destroy_weights_update_group":
            # model_runner_components/weight_updater.py:146-153: an unknown group answers 400.
            if body["group_name"] not in self.server.groups:
                self._reply(400, {"success": False, "message": "The group to be destroyed does not exist."})
            else:
                self.server.groups.discard(body["group_name"])
                self._reply(200, {"success": True, "message": "Succeeded to destroy custom process group."})
        else:
            self._reply(200, {"success": True, "message": "ok"})

    def _session_rule(self):
        """sglang 0.5.23's refusals (srt/managers/scheduler_components/weight_updater.py:192-197, 309-330)."""
        server = self.server
        if self.path == "/begin_weight_update":
            if server.session_open:
                return 400, {"success": False, "message": "a weight-update session is already open; call "
                                                          "end_weight_update() first"}
            server.session_open = True
        elif self.path == "/end_weight_update":
            if not server.session_open:
                return 400, {"success": False, "message": "no weight-update session is open; call "
                                                          "begin_weight_update() first"}
            server.session_open = False
        elif server.has_session and not server.session_open:
            return 400, {"success": False, "message": "update_weights_from_distributed must run between "
                                                      "begin_weight_update() and end_weight_update()"}
        elif server.failing_updates > 0:
            server.failing_updates -= 1
            return 400, {"success": False, "message": "Failed to receive weights: gloo timeout"}
        return 200, {"success": True, "message": "ok"}


@pytest.fixture
def servers():
    started = []

    def make(**kwargs):
        server = FakeSGLang(**kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.mark.unit
def test_generate_request_has_exactly_the_contract_fields():
    sampling = SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.95, stop_token_ids=(2, 5), seed=10)
    body = json.loads(_encode(build_generate_request([[1, 2], [3]], [10, 11], sampling)))
    assert set(body) == {"input_ids", "sampling_params", "return_logprob", "logprob_start_len"}
    assert body["input_ids"] == [[1, 2], [3]] and body["return_logprob"] is True and body["logprob_start_len"] == -1
    for params, seed in zip(body["sampling_params"], [10, 11]):
        assert set(params) <= KNOWN_SAMPLING_KEYS  # SGLang >= 0.5.22 answers 400 to any other key
        assert params == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 32, "stop_token_ids": [2, 5],
                          "sampling_seed": seed}
    unseeded = json.loads(_encode(build_generate_request([[1]], [None], sampling)))
    assert "sampling_seed" not in unseeded["sampling_params"][0]
    # max_new_tokens is always explicit: SGLang's default (128) would silently change the response budget.
    assert unseeded["sampling_params"][0]["max_new_tokens"] == 32


def _encode(struct):
    import msgspec

    return msgspec.json.encode(struct)


@pytest.mark.unit
def test_parse_reply_checks_alignment():
    good = [{"output_ids": [4, 5], "meta_info": {"output_token_logprobs": [[-1.0, 4, None], [-2.0, 5, "x"]],
                                                 "finish_reason": {"type": "stop"}, "weight_version": "3"}}]
    [sample] = parse_generate_response(json.dumps(good).encode(), 1, 3, 3)
    assert sample.token_ids.tolist() == [4, 5] and sample.finish_reason == "stop"
    np.testing.assert_allclose(sample.logprobs, [-1.0, -2.0])
    assert sample.versions.tolist() == [3, 3]
    bad = [{"output_ids": [4, 6], "meta_info": good[0]["meta_info"]}]
    with pytest.raises(SGLangError, match="do not match"):
        parse_generate_response(json.dumps(bad).encode(), 1, 3, 3)
    with pytest.raises(SGLangError, match="2 outputs"):
        parse_generate_response(json.dumps(good * 2).encode(), 1, 3, 3)


@pytest.mark.unit
def test_token_versions_from_spans_lists_and_fallbacks():
    # Spans [version, start, end): tokens 0-1 by version 4, tokens 2-4 by version 5.
    spans = MetaInfo(weight_versions=[["4", 0, 2], ["5", 2, 5]], weight_version="5")
    assert token_versions(spans, 5, 4, 5).tolist() == [4, 4, 5, 5, 5]
    assert token_versions(MetaInfo(weight_versions=["1", "1", "2"]), 3, 1, 2).tolist() == [1, 1, 2]
    # No spans and the version changed while the request ran: the older version labels every token.
    assert token_versions(MetaInfo(weight_version="6"), 2, 5, 6).tolist() == [5, 5]
    assert token_versions(MetaInfo(weight_version="6"), 2, 6, 6).tolist() == [6, 6]
    assert token_versions(MetaInfo(weight_version="default"), 2, 0, 0).tolist() == [0, 0]


@pytest.mark.unit
def test_a_server_back_on_its_startup_weights_labels_tokens_version_zero():
    # A server replaced on the same URL reports "default" (the weights it loaded at startup: the initial model)
    # while the engine still believes it is at version 5; its tokens are version 0, not 5.
    assert token_versions(MetaInfo(weight_version="default"), 2, 5, 5).tolist() == [0, 0]
    assert token_versions(MetaInfo(weight_version="default"), 2, 4, 5).tolist() == [0, 0]
    spans = MetaInfo(weight_versions=[["default", 0, 1], ["6", 1, 3]], weight_version="6")
    assert token_versions(spans, 3, 5, 6).tolist() == [0, 6, 6]


@pytest.mark.unit
def test_generate_spreads_over_servers_and_groups_by_prompt(servers):
    a, b = servers(), servers()
    engine = SGLangEngine([SGLangServer(a.url), SGLangServer(b.url)])
    out = engine.generate([[1, 2, 3], [4, 5]], [3, 2], SamplingParams(max_new_tokens=3, seed=0))
    assert [len(g) for g in out] == [3, 2]
    sent = [body["input_ids"] for server in (a, b) for _, path, body in server.log if path == "/generate"]
    assert sorted(len(ids) for ids in sent) == [2, 3]  # 5 sequences split over two servers
    seeds = [p["sampling_seed"] for server in (a, b) for _, path, body in server.log if path == "/generate"
             for p in body["sampling_params"]]
    assert sorted(seeds) == [0, 1, 2, 3, 4]  # distinct per sample
    assert all(s.token_ids.tolist() == [7, 8, 9] and s.finish_reason == "length" for g in out for s in g)


@pytest.mark.unit
def test_aborted_requests_are_resubmitted_or_dropped(servers):
    server = servers(abort_first=2)
    engine = SGLangEngine([SGLangServer(server.url)], abort_policy="resubmit")
    out = engine.generate([[1], [2]], [2, 2], SamplingParams(max_new_tokens=3, seed=0))
    assert all(s.finish_reason == "length" for g in out for s in g) and engine.aborted == 2
    generate_calls = [body for _, path, body in server.log if path == "/generate"]
    assert [len(body["input_ids"]) for body in generate_calls] == [4, 2]  # only the aborted two went again
    assert generate_calls[1]["sampling_params"][0]["sampling_seed"] != 0  # a fresh sample, not a replay

    dropping = servers(abort_first=1)
    engine = SGLangEngine([SGLangServer(dropping.url)], abort_policy="drop")
    out = engine.generate([[1], [2]], [2, 2], SamplingParams(max_new_tokens=3))
    assert [s.finish_reason for s in out[0]] == ["abort", "length"]  # marked, never scored by the actor


def _announcement(version, buckets, name="dynamo_weights_x_g0", world_size=3):
    return WeightAnnouncement(version=version, group_name=name, generation=0, world_size=world_size,
                              layout="per_tensor", buckets=buckets)


BUCKETS = [[TensorSpec(name="a.weight", dtype="bfloat16", shape=[4, 2]),
            TensorSpec(name="b.bias", dtype="bfloat16", shape=[4])],
           [TensorSpec(name="c.weight", dtype="bfloat16", shape=[2, 2])]]


@pytest.mark.unit
def test_join_then_update_session_in_contract_order(servers):
    a, b = servers(), servers()
    engine = SGLangEngine([SGLangServer(a.url), SGLangServer(b.url)], rank_offset=3, tp_size=2,
                          sync_address="10.0.0.1:29555", pause_mode="retract")
    engine.update_from_announcement(_announcement(0, [], world_size=7))
    joins = [body for server in (a, b) for _, path, body in server.log if path == "/init_weights_update_group"]
    assert joins == [{"master_address": "10.0.0.1", "master_port": 29555, "rank_offset": rank, "world_size": 7,
                      "group_name": "dynamo_weights_x_g0", "backend": "nccl"} for rank in (3, 5)]
    engine.update_from_announcement(_announcement(4, BUCKETS, world_size=7))
    for server in (a, b):
        assert server.paths()[1:] == ["/pause_generation", "/begin_weight_update",
                                      "/update_weights_from_distributed", "/update_weights_from_distributed",
                                      "/end_weight_update", "/flush_cache", "/continue_generation"]
        bodies = {path: body for _, path, body in server.log if path == "/pause_generation"}
        assert bodies["/pause_generation"] == {"mode": "retract"}
        updates = [body for _, path, body in server.log if path == "/update_weights_from_distributed"]
        assert updates[0] == {"names": ["a.weight", "b.bias"], "dtypes": ["bfloat16", "bfloat16"],
                              "shapes": [[4, 2], [4]], "group_name": "dynamo_weights_x_g0", "flush_cache": False,
                              "weight_version": "4"}
    assert engine.policy_version == 4


@pytest.mark.unit
def test_a_failed_bucket_ends_the_session_and_the_next_update_works(servers):
    server = servers(failing_updates=1)
    engine = SGLangEngine([SGLangServer(server.url)])
    engine.update_from_announcement(_announcement(0, []))
    with pytest.raises(SGLangError, match="Failed to receive weights"):
        engine.update_from_announcement(_announcement(1, BUCKETS))
    assert server.paths()[1:] == ["/pause_generation", "/begin_weight_update", "/update_weights_from_distributed",
                                  "/end_weight_update", "/continue_generation"]
    assert not server.session_open and engine.policy_version == 0
    engine.update_from_announcement(_announcement(1, BUCKETS))  # a re-sent version 1 now goes through
    assert engine.policy_version == 1 and not server.session_open


@pytest.mark.unit
def test_a_server_left_mid_session_is_recovered(servers):
    # A previous driver died between /begin_weight_update and /end_weight_update.
    server = servers(session_open=True)
    engine = SGLangEngine([SGLangServer(server.url)])
    engine.update_from_announcement(_announcement(0, []))
    engine.update_from_announcement(_announcement(2, BUCKETS))
    assert server.paths()[1:5] == ["/pause_generation", "/begin_weight_update", "/end_weight_update",
                                   "/begin_weight_update"]
    assert engine.policy_version == 2 and not server.session_open


@pytest.mark.unit
def test_a_failed_begin_on_one_server_ends_the_session_opened_on_the_other(servers):
    good, stuck = servers(), servers(session_open=True)
    stuck.has_session = True
    engine = SGLangEngine([SGLangServer(good.url), SGLangServer(stuck.url)])
    engine.update_from_announcement(_announcement(0, []))
    stuck.failing_updates = 1
    with pytest.raises(SGLangError):
        engine.update_from_announcement(_announcement(1, BUCKETS))
    assert not good.session_open and not stuck.session_open


@pytest.mark.unit
def test_attach_checks_the_version_and_undoes_a_previous_drivers_state(servers):
    left_over = servers(session_open=True)
    engine = SGLangEngine([SGLangServer(left_over.url)])
    engine.attach(timeout_s=10.0)
    assert left_over.paths()[:4] == ["/server_info", "/end_weight_update", "/continue_generation",
                                     "/health_generate"]
    assert not left_over.session_open
    for version in ("0.5.20", "0.5.24", "0.6.0", "1.0.0"):
        with pytest.raises(SGLangError, match=r"supports 0\.5\.21 \.\. 0\.5\.23"):
            SGLangEngine([SGLangServer(servers(version=version).url)]).attach(timeout_s=10.0)
    for version in ("0.5.21", "0.5.22rc1", "0.5.23", "0.5.23.post2"):
        check_sglang_version(version)


@pytest.mark.unit
def test_old_servers_without_session_and_in_place_mode(servers):
    old = servers(has_session=False)
    engine = SGLangEngine([SGLangServer(old.url)], pause_mode="in_place")
    engine.update_from_announcement(_announcement(0, []))
    engine.update_from_announcement(_announcement(1, BUCKETS))
    engine.update_from_announcement(_announcement(2, BUCKETS))
    paths = old.paths()
    # The probe (404 on /begin_weight_update) happens once; afterwards neither begin nor end is sent.
    assert paths.count("/begin_weight_update") == 1 and "/end_weight_update" not in paths
    assert "/flush_cache" not in paths  # in_place keeps the KV cache
    assert paths[-4:] == ["/pause_generation", "/update_weights_from_distributed",
                          "/update_weights_from_distributed", "/continue_generation"]
    assert engine.policy_version == 2


@pytest.mark.unit
def test_a_new_group_destroys_the_old_one_first(servers):
    server = servers()
    engine = SGLangEngine([SGLangServer(server.url)])
    engine.update_from_announcement(_announcement(0, [], name="g_a"))
    engine.update_from_announcement(_announcement(0, [], name="g_b"))
    posts = [(path, body) for _, path, body in server.log]
    assert posts[1] == ("/destroy_weights_update_group", {"group_name": "g_a"})
    assert posts[2][0] == "/init_weights_update_group" and posts[2][1]["group_name"] == "g_b"


@pytest.mark.unit
def test_a_restarted_server_without_the_old_group_joins_the_new_one(servers):
    server = servers()
    engine = SGLangEngine([SGLangServer(server.url)])
    engine.update_from_announcement(_announcement(0, [], name="g_a"))
    server.groups.clear()  # the server process was replaced on the same URL: it knows no group
    engine.update_from_announcement(_announcement(0, [], name="g_b"))
    assert server.groups == {"g_b"}


@pytest.mark.unit
def test_health_and_errors(servers):
    assert SGLangEngine([SGLangServer(servers().url)]).health()
    sick = SGLangEngine([SGLangServer(servers(health_status=503).url)])
    assert not sick.health()
    gone = SGLangEngine([SGLangServer("http://127.0.0.1:1", timeout_s=2.0)])
    assert not gone.health()
    with pytest.raises(SGLangError):
        gone.generate([[1]], [1], SamplingParams())


@pytest.mark.gpu
def test_live_sglang_server_generates_with_logprobs(tmp_path):
    pytest.importorskip("sglang")
    from common.config import PRESETS, with_overrides

    cfg = with_overrides(PRESETS["tiny"](), run={"model": "smollm2"}, actor={"engine": "sglang"})
    engine = SGLangEngine.from_config(cfg, 0, log_dir=str(tmp_path))
    try:
        out = engine.generate([[1, 2, 3]], [4], SamplingParams(max_new_tokens=8, stop_token_ids=(2,), seed=0))
        assert len(out[0]) == 4
        for s in out[0]:
            assert 1 <= len(s.token_ids) <= 8 and np.all(s.logprobs <= 0)
    finally:
        engine.close()
