"""The sglang test double keeps sglang 0.5.23's rules (tests/sglang_double.py cites where each comes from).

The double runs in-process here (a thread serving HTTP on loopback, the tiny model); the end-to-end tests run it
as a subprocess.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.sglang_double import DoubleServer, DoubleState

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def double():
    server = DoubleServer(0, DoubleState("tiny", seed=0, dtype="float32", version="0.5.23", group_timeout_s=5.0,
                                         fail_updates=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _call(server, method, path, body=None):
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            content = reply.read()
            return reply.status, json.loads(content) if content.startswith(b"{") or content.startswith(b"[") else {}
    except urllib.error.HTTPError as exc:
        content = exc.read()
        return exc.code, json.loads(content) if content.startswith(b"{") else {}


def _generate_in_background(server, max_new_tokens):
    result = {}

    def run():
        result["reply"] = _call(server, "POST", "/generate", {
            "input_ids": [[1, 2, 3]], "return_logprob": True, "logprob_start_len": -1,
            "sampling_params": [{"temperature": 1.0, "top_p": 1.0, "max_new_tokens": max_new_tokens,
                                 "stop_token_ids": []}]})

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.state.running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert server.state.running, "the request never started"
    return thread, result


def test_session_refusals_follow_sglang(double):
    update = {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "g"}
    status, body = _call(double, "POST", "/update_weights_from_distributed", update)
    assert status == 400 and "must run between begin_weight_update() and end_weight_update()" in body["message"]
    assert _call(double, "POST", "/end_weight_update", {})[0] == 400  # no session open
    assert _call(double, "POST", "/begin_weight_update", {})[0] == 200
    status, body = _call(double, "POST", "/begin_weight_update", {})
    assert status == 400 and "already open" in body["message"]
    status, body = _call(double, "POST", "/update_weights_from_distributed", update)
    assert status == 400 and body["message"].startswith("Failed to receive weights")  # no such group
    assert _call(double, "POST", "/end_weight_update", {})[0] == 200
    status, body = _call(double, "POST", "/destroy_weights_update_group", {"group_name": "g"})
    assert status == 400 and body["message"] == "The group to be destroyed does not exist."
    assert _call(double, "GET", "/server_info")[1]["version"] == "0.5.23"


def test_unknown_sampling_key_is_refused(double):
    status, body = _call(double, "POST", "/generate", {"input_ids": [[1, 2]],
                                                       "sampling_params": [{"max_new_tokens": 1, "seedx": 3}]})
    assert status == 400 and "seedx" in body["message"]


def test_in_place_pause_keeps_the_request_and_refuses_a_flush(double):
    thread, result = _generate_in_background(double, 80)
    assert _call(double, "POST", "/pause_generation", {"mode": "in_place"})[0] == 200
    assert _call(double, "GET", "/health_generate")[0] == 503
    assert _call(double, "GET", "/flush_cache")[0] == 400  # the running request keeps its KV cache
    assert _call(double, "POST", "/continue_generation", {})[0] == 200
    thread.join(120)
    status, [out] = result["reply"]
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "length"
    assert len(out["output_ids"]) == 80 == len(out["meta_info"]["output_token_logprobs"])


def test_retract_pause_allows_a_flush_and_abort_pause_aborts(double):
    thread, result = _generate_in_background(double, 80)
    assert _call(double, "POST", "/pause_generation", {"mode": "retract"})[0] == 200
    assert _call(double, "GET", "/flush_cache")[0] == 200  # retracted requests wait in the queue
    assert _call(double, "POST", "/continue_generation", {})[0] == 200
    thread.join(120)
    assert result["reply"][1][0]["meta_info"]["finish_reason"]["type"] == "length"

    thread, result = _generate_in_background(double, 80)
    assert _call(double, "POST", "/pause_generation", {"mode": "abort"})[0] == 200
    thread.join(120)  # abort mode returns only once no request runs
    assert result["reply"][1][0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert _call(double, "POST", "/continue_generation", {})[0] == 200
