"""A test double of an sglang 0.5.23 HTTP server, for running the SGLang path end to end without a GPU.

It is NOT sglang: it serves the subset of sglang's HTTP API that actor/engines/sglang.py uses, with the request and
reply fields and the refusal rules of sglang 0.5.23, and generates with the project's HFEngine (any model
`common.models` loads, e.g. `tiny`) on the CPU. Weights arrive over a real gloo process group in the `per_tensor`
layout, joined the way sglang joins (a tcp:// rendezvous at master_address:master_port, the store prefixed with the
group name, torch's group helper). Run it as its own process, so a test can kill -9 it:

    python -m tests.sglang_double --port 30000 --model tiny [--seed 0] [--group-timeout-s 30]

What it copies from sglang 0.5.23 (paths under the wheel's sglang/ directory):
- `/generate` (srt/entrypoints/http_server.py, srt/managers/io_struct.py GenerateReqInput): `input_ids` (one
  sequence or a batch), `sampling_params` (one dict or one per sequence), `return_logprob`, `logprob_start_len`.
  Reply per sequence: `output_ids` (a stop token included), `meta_info.output_token_logprobs` as
  [logprob, token_id, null], `finish_reason` {"type": "stop"|"length"|"abort", ...}, `weight_version` (the string of
  the last update, "default" before) and `weight_versions` spans [version, start, end) when the version changed
  while the request ran (srt/utils/weight_versions.py). Log-probs are HFEngine's: log_softmax(logits / T) before
  top-p, sglang's convention (srt/layers/sampler.py, `logprobs = torch.log(probs)`). A paused server holds new
  requests until /continue_generation (tokenizer_manager.py `is_pause_cond`).
- `/pause_generation` {mode} (io_struct.py PauseGenerationReqInput, default "abort"; tokenizer_manager.py:2267):
  `abort` aborts running requests (they return with finish reason abort) and waits until none runs; `retract` and
  `in_place` stop decoding at the next step and finish the requests after `/continue_generation`. The double
  finishes a retracted request where it stopped instead of recomputing it; tokens decoded after an update carry
  the new version either way.
- `/flush_cache` (GET or POST; scheduler.py:5518 `is_fully_idle(ignore_waiting=paused)`): 400 while a request runs,
  except retracted requests of a paused server (in_place keeps them running, so it is refused then).
- `/health_generate`: 200 when a one-token generation would run; 503 while paused (sglang's probe times out and
  answers 503 then).
- `/server_info` and `/get_server_info`: `version` (the double reports `--version`, default 0.5.23).
- weight updates (srt/managers/scheduler_components/weight_updater.py): `/begin_weight_update` is refused (400,
  "a weight-update session is already open") while a session is open, `/end_weight_update` (400, "no
  weight-update session is open") without one, and `/update_weights_from_distributed` (400, "must run between
  begin_weight_update() and end_weight_update()") outside one. An update receives each tensor with a broadcast from
  rank 0 in the request's order, dtypes and shapes (model_runner_components/weight_updater.py:260
  `receive_weights_from_distributed`), loads them, then records `weight_version`; a failed receive answers 400
  "Failed to receive weights: ..." and leaves the session open. `flush_cache: true` with requests running fails.
- `/init_weights_update_group` (rank = rank_offset; tp 1) blocks until the group forms and answers 400 "Failed to
  initialize custom process group: ..." on error (srt/utils/common.py:2859 `init_custom_process_group`);
  `/destroy_weights_update_group` answers 400 "The group to be destroyed does not exist." for an unknown name.
- Every error reply is {"success": false, "message": ...} with HTTP 400, success {"success": true, ...} with 200.

The double's own knobs, for fault tests: `--fail-updates N` makes the next N update calls fail after receiving
(as a failed load would), `--update-delay-s S` holds each update call S seconds inside its session before it
receives, `--version` sets the reported sglang version, and `GET /debug_state` (not an sglang endpoint) reports
{weight_version, session_open, paused, groups, updates,
begins_refused} so a test can see where the server stands.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

logger = logging.getLogger("sglang_double")

SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_new_tokens", "stop_token_ids", "sampling_seed",
                 "stop", "ignore_eos", "skip_special_tokens", "n", "frequency_penalty", "presence_penalty"}
"""Keys of sglang's SamplingParams the double accepts (srt/sampling/sampling_params.py); others answer 400."""


class Refused(Exception):
    """An error reply: HTTP 400 with {"success": false, "message": ...}."""


class DoubleState:
    """Everything one server holds; one lock orders weight loads, flushes and version changes like sglang's
    single scheduler loop does."""

    def __init__(self, model: str, seed: int, dtype: str, version: str, group_timeout_s: float, fail_updates: int,
                 update_delay_s: float = 0.0):
        from actor.engines.hf import HFEngine
        from common.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(model)
        net = load_model(model, dtype=getattr(torch, dtype), device="cpu")
        self.engine = HFEngine(net, pad_token_id=tokenizer.pad_token_id, seed=seed)
        self.version = version
        self.group_timeout_s = group_timeout_s
        self.fail_updates = fail_updates
        self.update_delay_s = update_delay_s
        self.updates = 0
        """Update calls that installed their tensors."""
        self.begins_refused = 0
        """/begin_weight_update calls refused because a session was open (a driver that did not end its own)."""
        self.weight_version = "default"
        self._labels = {0: "default"}  # HFEngine's int versions -> the weight_version strings they stand for
        self.scheduler = threading.Lock()
        self.pause_cond = threading.Condition()
        self.paused = False
        self.pause_mode = "abort"
        self.running: dict[int, bool] = {}  # request -> aborted
        self._next_request = 0
        self.session_open = False
        self.groups: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, body: dict) -> list[dict] | dict:
        from actor.engines.base import SamplingParams

        ids = body.get("input_ids")
        single = bool(ids) and isinstance(ids[0], int)
        sequences = [ids] if single else ids
        if not sequences or not all(isinstance(s, list) and s and all(isinstance(t, int) for t in s)
                                    for s in sequences):
            raise Refused("input_ids: a non-empty list of token ids, or a batch of them")
        params = body.get("sampling_params") or {}
        params = params if isinstance(params, list) else [params] * len(sequences)
        if len(params) != len(sequences):
            raise Refused(f"sampling_params: {len(params)} for {len(sequences)} sequences")
        for p in params:
            unknown = set(p) - SAMPLING_KEYS
            if unknown:
                raise Refused(f"sampling_params: unknown keys {sorted(unknown)}")
        first = params[0]
        sampling = SamplingParams(max_new_tokens=int(first.get("max_new_tokens", 128)),
                                  temperature=float(first.get("temperature", 1.0)),
                                  top_p=float(first.get("top_p", 1.0)),
                                  stop_token_ids=tuple(first.get("stop_token_ids") or ()),
                                  seed=first.get("sampling_seed"))
        with self.pause_cond:
            self.pause_cond.wait_for(lambda: not self.paused)
            request = self._next_request
            self._next_request += 1
            self.running[request] = False
        try:
            groups = self.engine.generate(sequences, [1] * len(sequences), sampling)
        finally:
            with self.pause_cond:
                aborted = self.running.pop(request)
                self.pause_cond.notify_all()
        outputs = [self._reply(group[0], aborted) for group in groups]
        return outputs[0] if single else outputs

    def _reply(self, sample: Any, aborted: bool) -> dict:
        tokens = [int(t) for t in sample.token_ids]
        if aborted:
            reason = {"type": "abort", "message": "Abort in waiting queue"}
        elif sample.finish_reason == "stop":
            reason = {"type": "stop", "matched": tokens[-1]}
        else:
            reason = {"type": "length", "length": len(tokens)}
        meta = {"output_token_logprobs": [[float(lp), t, None] for lp, t in zip(sample.logprobs, tokens)],
                "finish_reason": reason, "weight_version": self.weight_version, "prompt_tokens": 0,
                "completion_tokens": len(tokens)}
        versions = [int(v) for v in sample.versions]
        if versions and versions[0] != versions[-1]:
            spans, start = [], 0
            for end in range(1, len(versions) + 1):
                if end == len(versions) or versions[end] != versions[start]:
                    spans.append([self._labels.get(versions[start], "default"), start, end])
                    start = end
            meta["weight_versions"] = spans
        return {"text": None, "output_ids": tokens, "meta_info": meta}

    # ------------------------------------------------------------------------------------------ pause

    def pause(self, body: dict) -> dict:
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise Refused(f"mode: must be abort, retract or in_place, got {mode!r}")
        with self.pause_cond:
            self.paused, self.pause_mode = True, mode
            if mode == "abort":
                for request in self.running:
                    self.running[request] = True
                self.pause_cond.wait_for(lambda: not self.running)
            else:
                self.engine.pause()
        return {"message": "Generation paused successfully.", "status": "ok"}

    def resume(self) -> dict:
        with self.pause_cond:
            self.paused = False
            self.engine.resume()
            self.pause_cond.notify_all()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def idle(self) -> bool:
        with self.pause_cond:
            return not self.running or (self.paused and self.pause_mode == "retract")

    # ------------------------------------------------------------------------------------------ weights

    def begin(self) -> dict:
        with self.scheduler:
            if self.session_open:
                self.begins_refused += 1
                raise Refused("a weight-update session is already open; call end_weight_update() first")
            self.session_open = True
        return {"success": True, "message": "Success"}

    def end(self) -> dict:
        with self.scheduler:
            if not self.session_open:
                raise Refused("no weight-update session is open; call begin_weight_update() first")
            self.session_open = False
        return {"success": True, "message": "Success"}

    def init_group(self, body: dict) -> dict:
        from torch.distributed import PrefixStore, TCPStore

        name, rank, world = body["group_name"], int(body["rank_offset"]), int(body["world_size"])
        if body.get("backend", "nccl") != "gloo":
            raise Refused(f"Failed to initialize custom process group: backend {body.get('backend')!r} needs GPUs "
                          f"(the double runs gloo only).")
        if not 0 < rank < world:
            raise Refused(f"Failed to initialize custom process group: rank {rank} outside world {world}.")
        timeout = datetime.timedelta(seconds=self.group_timeout_s)
        try:
            store = TCPStore(body["master_address"], int(body["master_port"]), world, False, timeout)
            group = _group_helper(PrefixStore(name, store), name, rank, world, timeout)
        except (RuntimeError, ValueError) as exc:  # ValueError: torch refuses a group name it already holds
            raise Refused(f"Failed to initialize custom process group: {exc}.") from None
        self.groups[name] = group
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_group(self, body: dict) -> dict:
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            raise Refused("The group to be destroyed does not exist.")
        torch.distributed.destroy_process_group(group)
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def update(self, body: dict) -> dict:
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        with self.scheduler:
            if not self.session_open:
                raise Refused("update_weights_from_distributed must run between begin_weight_update() and "
                              "end_weight_update()")
            group = self.groups.get(body.get("group_name", "weight_update_group"))
            if group is None:
                raise Refused(f"Failed to receive weights: Group {body.get('group_name')} not in "
                              f"{list(self.groups)}. Please call `init_weights_update_group` first.")
            time.sleep(self.update_delay_s)
            try:  # as receive_weights_from_distributed: async broadcasts from rank 0, then wait on each
                received = {name: torch.empty(shape, dtype=getattr(torch, dtype))
                            for name, dtype, shape in zip(names, dtypes, shapes)}
                handles = [torch.distributed.broadcast(tensor, src=0, group=group, async_op=True)
                           for tensor in received.values()]
                for handle in handles:
                    handle.wait()
            except RuntimeError as exc:
                raise Refused(f"Failed to receive weights: {exc}") from None
            if self.fail_updates > 0:
                self.fail_updates -= 1
                raise Refused("Failed to update weights: injected failure (--fail-updates)")
            version = body.get("weight_version")
            number = self.engine.policy_version
            if version is not None and version != self.weight_version:
                number = max(self._labels) + 1
                self._labels[number] = version
            try:
                self.engine.load_weights(received, number)
            except (KeyError, ValueError) as exc:
                raise Refused(f"Failed to update weights: {exc}") from None
            if version is not None:
                self.weight_version = version
            self.updates += 1
            if body.get("flush_cache", True) and not self.idle():
                raise Refused("Weights were updated, but the cache was not flushed because requests are still "
                              "running or queued. Retract or finish them, then call /flush_cache.")
        return {"success": True, "message": "Succeeded to update parameter online."}

    def debug_state(self) -> dict:
        return {"weight_version": self.weight_version, "session_open": self.session_open, "paused": self.paused,
                "groups": sorted(self.groups), "updates": self.updates, "begins_refused": self.begins_refused}

    def flush(self) -> bool:
        with self.scheduler:
            return self.idle()


def _group_helper(store: Any, name: str, rank: int, world: int, timeout: datetime.timedelta) -> Any:
    """The group as sglang's init_custom_process_group builds it: torch's group helper over the store prefixed
    with the group name (which adds name/ and the device prefix)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    if not dist.is_initialized():  # sglang runs with its own default group; the double makes a one-process one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group, _ = _new_process_group_helper(world, rank, [], Backend("gloo"), store, group_name=name,
                                         backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world)}
    return group


class Handler(BaseHTTPRequestHandler):
    server: "DoubleServer"

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug(fmt, *args)

    def _send(self, status: int, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._route("GET", {})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as exc:
            self._send(400, {"success": False, "message": f"invalid JSON: {exc}"})
            return
        self._route("POST", body if isinstance(body, dict) else {})

    def _route(self, method: str, body: dict) -> None:
        state = self.server.state
        path = self.path.split("?")[0]
        routes = {
            ("POST", "/generate"): lambda: state.generate(body),
            ("POST", "/pause_generation"): lambda: state.pause(body),
            ("POST", "/continue_generation"): state.resume,
            ("POST", "/begin_weight_update"): state.begin,
            ("POST", "/end_weight_update"): state.end,
            ("POST", "/init_weights_update_group"): lambda: state.init_group(body),
            ("POST", "/destroy_weights_update_group"): lambda: state.destroy_group(body),
            ("POST", "/update_weights_from_distributed"): lambda: state.update(body),
        }
        try:
            if path in ("/server_info", "/get_server_info") and method == "GET":
                self._send(200, {"version": state.version, "internal_states": []})
            elif path == "/debug_state" and method == "GET":
                self._send(200, state.debug_state())
            elif path in ("/model_info", "/get_model_info") and method == "GET":
                self._send(200, {"weight_version": state.weight_version, "is_generation": True})
            elif path in ("/health", "/health_generate") and method == "GET":
                self._send(503 if state.paused else 200, b"")
            elif path == "/flush_cache":
                ok = state.flush()
                self._send(200 if ok else 400, b"Cache flushed.\n" if ok else b"Cache not flushed.\n")
            elif (method, path) in routes:
                self._send(200, routes[(method, path)]())
            else:
                self._send(404, {"detail": "Not Found"})
        except Refused as exc:
            self._send(400, {"success": False, "message": str(exc)})
        except (KeyError, TypeError, ValueError) as exc:
            self._send(400, {"success": False, "message": f"bad request: {exc!r}"})


class DoubleServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, state: DoubleState):
        super().__init__(("127.0.0.1", port), Handler)
        self.state = state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--version", default="0.5.23")
    parser.add_argument("--group-timeout-s", type=float, default=30.0)
    parser.add_argument("--fail-updates", type=int, default=0)
    parser.add_argument("--update-delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sglang_double %(levelname)s %(message)s")
    torch.set_num_threads(1)
    state = DoubleState(args.model, args.seed, args.dtype, args.version, args.group_timeout_s, args.fail_updates,
                        args.update_delay_s)
    server = DoubleServer(args.port, state)
    logger.info("serving on 127.0.0.1:%d", args.port)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
