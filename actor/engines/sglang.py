"""SGLangEngine: the Engine interface over one or more SGLang HTTP servers (GPU clusters), for sglang 0.5.21-0.5.23.

The HTTP contract is the one docs/ARCHITECTURE.md (SGLang HTTP contract) states. Every request body is a typed
msgspec Struct below, so field names and types are fixed in one place and checked by tests/test_sglang_engine.py:
- attach (`attach`, at launch or attach): `GET /server_info` (`/get_server_info` before it) must report a version in
  SUPPORTED_SGLANG, else SGLangError names the version and the supported range. A session or pause a previous
  driver left (it died inside an update) is undone: `/end_weight_update` (a 400 "no ... session is open" is fine),
  `/continue_generation`; then `GET /health_generate` until 200.
- generation: `POST /generate` with `input_ids` (a batch of sequences), per-sequence `sampling_params` holding only
  known keys (temperature, top_p, max_new_tokens, stop_token_ids, sampling_seed when a seed is fixed),
  `return_logprob`, `logprob_start_len = -1`. The reply gives `output_ids`, `meta_info.output_token_logprobs`
  ([logprob, token_id, text|null] per output token: log_softmax(logits / T) of the full vocabulary, before top-p —
  which is why common/config.py refuses engine sglang with top_p < 1), `meta_info.finish_reason.type` and
  `meta_info.weight_version` (string) / `weight_versions`. sglang honours `sampling_seed` only when the server runs
  with `--enable-deterministic-inference` (srt/sampling/sampling_batch_info.py builds the seed tensor only then), so
  a fixed seed does not make an SGLang sample reproducible otherwise. Aborted requests (finish reason "abort", e.g.
  by a pause in abort mode) are resubmitted or dropped (`actor.abort_policy`); a partial answer is never scored.
- per-token versions: from `weight_versions` when the server sends it (per-token list, or spans
  [version, start, end)); otherwise every token gets the version the weights had when the request was sent if the
  version changed while it ran (the conservative, older label), else `weight_version`.
- weight updates (`update_from_announcement(ann) -> metrics`, driven by the learner's WeightAnnouncement): an
  invitation (no buckets) makes every server join the group with `POST /init_weights_update_group` at rank
  offset 1 + Σ tp_size of the engines before it, backend NCCL when the learner's weights are on a GPU and gloo
  otherwise (an old group is destroyed first with `/destroy_weights_update_group`); a data announcement, for any
  version (a re-sent one equal to the current version too), runs `/pause_generation` {mode} ->
  `/begin_weight_update` -> per bucket `/update_weights_from_distributed` {names, dtypes, shapes, group_name,
  flush_cache: false, weight_version} sent to all servers at once (the learner broadcasts meanwhile) and collected
  -> `/end_weight_update` -> `GET /flush_cache` (not in in_place mode) -> `/continue_generation`. Every server gets
  the same requests in the same order, or the collective hangs. A session this engine opened is always ended, also
  when a bucket failed (sglang refuses a second begin while one is open, so one failure would wedge the server),
  and a server found mid-session is ended and begun again. Any failure raises SGLangError after that cleanup.
- health: `GET /health_generate`, never while paused (SGLang answers 503 then).
- servers: attached by URL (`actor.sglang_urls`) or launched with `python -m sglang.launch_server` and the
  RL-relevant flags (`--skip-tokenizer-init`: token ids in and out; fixed `--random-seed`; tp size; dtype).

HTTP goes through `requests` when installed, else urllib (no extra dependency).

What was run: request building/parsing, probing and the update sequence against a recording HTTP server
(tests/test_sglang_engine.py), and whole runs attached to sglang test doubles that receive weights over a real gloo
group (tests/sglang_double.py, tests/test_sglang_e2e.py). A real sglang server on a GPU is run only by the `gpu`
test in tests/test_sglang_engine.py, where sglang and CUDA are present.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import msgspec
import numpy as np

from actor.engines.base import GeneratedSample, SamplingParams

logger = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """A server answered with an error status, or did not answer."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- request bodies


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    pass


class SGLangSamplingParams(_Body, kw_only=True, omit_defaults=True):
    """Only keys SGLang knows (>= 0.5.22 rejects others); sampling_seed is left out unless a seed is fixed."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: list[int]
    sampling_seed: int | None = None


class GenerateRequest(_Body, kw_only=True):
    input_ids: list[list[int]]
    sampling_params: list[SGLangSamplingParams]
    return_logprob: bool = True
    logprob_start_len: int = -1


class InitWeightsUpdateGroupRequest(_Body, kw_only=True):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str


class UpdateWeightsFromDistributedRequest(_Body, kw_only=True):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str
    flush_cache: bool = False
    weight_version: str | None = None


class PauseGenerationRequest(_Body, kw_only=True):
    mode: str


class EmptyRequest(_Body):
    pass


class DestroyWeightsUpdateGroupRequest(_Body, kw_only=True):
    group_name: str


# ---------------------------------------------------------------------------------------------- responses


class FinishReason(msgspec.Struct):
    type: str


class MetaInfo(msgspec.Struct):
    output_token_logprobs: list[list[Any]] = []
    finish_reason: FinishReason | None = None
    weight_version: str | None = None
    weight_versions: list[Any] | None = None


class _ServerInfo(msgspec.Struct):
    version: str


SUPPORTED_SGLANG = ((0, 5, 21), (0, 5, 23))
"""Oldest and newest sglang release (inclusive) whose HTTP API this engine follows; see check_sglang_version."""


def check_sglang_version(version: str, url: str = "") -> None:
    """Raise SGLangError unless `version` ("0.5.23", "0.5.23.post1", "0.5.22rc0") lies in SUPPORTED_SGLANG."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise SGLangError(f"sglang server {url}: cannot read its version {version!r}")
    release = tuple(int(part) for part in match.groups())
    low, high = SUPPORTED_SGLANG
    if not low <= release <= high:
        supported = f"{'.'.join(map(str, low))} .. {'.'.join(map(str, high))}"
        raise SGLangError(f"sglang server {url} runs sglang {version}; this engine supports {supported} "
                          f"(see the install matrix in README.md)")


class GenerateOutput(msgspec.Struct):
    output_ids: list[int]
    meta_info: MetaInfo


_generate_outputs = msgspec.json.Decoder(list[GenerateOutput])
_generate_output = msgspec.json.Decoder(GenerateOutput)


def parse_generate_response(body: bytes, n_sequences: int, start_version: int, engine_version: int,
                            ) -> list[GeneratedSample]:
    """Decode a /generate reply for a batch of `n_sequences` into GeneratedSamples (strictly typed)."""
    try:
        outputs = _generate_outputs.decode(body) if body.lstrip()[:1] == b"[" else [_generate_output.decode(body)]
    except msgspec.ValidationError as exc:
        raise SGLangError(f"/generate: unexpected reply ({exc})") from None
    if len(outputs) != n_sequences:
        raise SGLangError(f"/generate: {len(outputs)} outputs for {n_sequences} sequences")
    return [_to_sample(out, start_version, engine_version) for out in outputs]


def _to_sample(out: GenerateOutput, start_version: int, engine_version: int) -> GeneratedSample:
    meta = out.meta_info
    n = len(out.output_ids)
    if len(meta.output_token_logprobs) != n:
        raise SGLangError(f"/generate: {len(meta.output_token_logprobs)} log-probs for {n} output ids")
    logprobs = np.array([float(entry[0]) for entry in meta.output_token_logprobs], dtype=np.float32)
    ids_in_logprobs = [int(entry[1]) for entry in meta.output_token_logprobs]
    if ids_in_logprobs != list(out.output_ids):
        raise SGLangError("/generate: output_token_logprobs token ids do not match output_ids")
    reason = meta.finish_reason.type if meta.finish_reason is not None else "abort"
    if reason not in ("stop", "length", "abort"):
        raise SGLangError(f"/generate: unknown finish reason {reason!r}")
    versions = token_versions(meta, n, start_version, engine_version)
    return GeneratedSample(np.asarray(out.output_ids, dtype=np.int32), logprobs, versions, reason)


STARTUP_WEIGHT_VERSION = "default"
"""sglang's weight_version before any update: the weights it loaded at startup, the initial model (version 0)."""


def _version_int(value: Any, default: int) -> int:
    if value == STARTUP_WEIGHT_VERSION:
        return 0  # also after a restart on the same URL: the server lost every update
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def token_versions(meta: MetaInfo, n: int, start_version: int, engine_version: int) -> np.ndarray:
    """Per-token policy versions int32[n] (see the module docstring for the fallbacks)."""
    spans = meta.weight_versions
    if spans and len(spans) == n and not isinstance(spans[0], (list, dict)):
        return np.array([_version_int(v, start_version) for v in spans], dtype=np.int32)
    if spans and isinstance(spans[0], (list, dict)):
        out = np.full(n, start_version, dtype=np.int32)
        for span in spans:
            version, begin, end = (span["version"], span["start"], span["end"]) if isinstance(span, dict) else span
            out[int(begin):int(end)] = _version_int(version, start_version)
        return out
    if meta.weight_version == STARTUP_WEIGHT_VERSION:
        return np.zeros(n, dtype=np.int32)  # versions only grow, so every token came from the startup weights
    if start_version != engine_version or meta.weight_version is None:
        return np.full(n, start_version, dtype=np.int32)
    return np.full(n, _version_int(meta.weight_version, start_version), dtype=np.int32)


# ---------------------------------------------------------------------------------------------- HTTP


def _http(method: str, url: str, body: bytes | None, timeout_s: float) -> tuple[int, bytes]:
    """(status, body); raises SGLangError when the server cannot be reached."""
    headers = {"Content-Type": "application/json"}
    try:
        import requests
    except ImportError:
        requests = None
    if requests is not None:
        try:
            reply = requests.request(method, url, data=body, headers=headers, timeout=timeout_s)
        except requests.RequestException as exc:
            raise SGLangError(f"{method} {url}: {exc}") from None
        return reply.status_code, reply.content
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise SGLangError(f"{method} {url}: {exc}") from None


class SGLangServer:
    """One server: typed calls, feature probes, and the process when this engine launched it."""

    def __init__(self, url: str, timeout_s: float = 600.0, process: subprocess.Popen | None = None):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.process = process
        self.has_weight_update_session: bool | None = None  # probed on first use
        self.group_name: str | None = None

    def post(self, path: str, body: msgspec.Struct, timeout_s: float | None = None,
             allow_404: bool = False) -> bytes | None:
        status, content = _http("POST", self.url + path, msgspec.json.encode(body), timeout_s or self.timeout_s)
        if status == 404 and allow_404:
            return None
        if status != 200:
            raise SGLangError(f"POST {self.url}{path}: HTTP {status}: {content[:500]!r}", status)
        return content

    def get(self, path: str, timeout_s: float | None = None) -> tuple[int, bytes]:
        return _http("GET", self.url + path, None, timeout_s or self.timeout_s)

    def begin_session(self) -> bool:
        """POST /begin_weight_update; True when a session is now open (False: a server without sessions).

        sglang refuses a second begin while a session is open (scheduler_components/weight_updater.py:309-315,
        HTTP 400 "already open"), so a server left mid-session (its previous driver died inside an update) is
        recovered once: its stale session is ended, then the begin is repeated."""
        if self.has_weight_update_session is False:
            return False
        try:
            reply = self.post("/begin_weight_update", EmptyRequest(), allow_404=True)
        except SGLangError as exc:
            if exc.status != 400 or "already open" not in str(exc):
                raise
            logger.warning("sglang %s: a weight-update session was left open; ending it first", self.url)
            self.end_session()
            reply = self.post("/begin_weight_update", EmptyRequest())
        self.has_weight_update_session = reply is not None
        return self.has_weight_update_session

    def end_session(self) -> None:
        self.post("/end_weight_update", EmptyRequest())

    def end_stale_session(self) -> None:
        """End a session a previous driver left open; a server with none answers 400 "no ... session is open"."""
        try:
            self.post("/end_weight_update", EmptyRequest(), allow_404=True)
        except SGLangError as exc:
            if exc.status != 400 or "no weight-update session is open" not in str(exc):
                raise
        else:
            logger.warning("sglang %s: ended a weight-update session a previous driver left open", self.url)

    def destroy_group(self, group_name: str) -> None:
        """POST /destroy_weights_update_group; a server that does not know the group (it was restarted) answers 400
        "The group to be destroyed does not exist." (model_runner_components/weight_updater.py:146), which is fine."""
        try:
            self.post("/destroy_weights_update_group", DestroyWeightsUpdateGroupRequest(group_name=group_name),
                      allow_404=True)
        except SGLangError as exc:
            if exc.status != 400 or "does not exist" not in str(exc):
                raise

    def version(self) -> str:
        """The server's sglang version (`version` of GET /server_info; /get_server_info on older servers)."""
        for path in ("/server_info", "/get_server_info"):
            status, content = self.get(path, timeout_s=60.0)
            if status == 404:
                continue
            if status != 200:
                raise SGLangError(f"GET {self.url}{path}: HTTP {status}: {content[:300]!r}", status)
            try:
                version = msgspec.json.decode(content, type=_ServerInfo).version
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise SGLangError(f"GET {self.url}{path}: no version in the reply ({exc})") from None
            return version
        raise SGLangError(f"{self.url}: neither /server_info nor /get_server_info exists (not an sglang server?)")


def server_command(model_path: str, *, port: int, tp_size: int, dtype: str, seed: int,
                   gpu_ids: tuple[int, ...], extra_args: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `python -m sglang.launch_server` on 127.0.0.1:port with the flags an RL actor needs.

    The server sees only its `gpu_ids` (CUDA_VISIBLE_DEVICES, common/layout.py) and starts at the first of them
    (`--base-gpu-id 0`; sglang 0.5.23 srt/arg_groups/fields/device.py:28), so two servers of one host never land
    on the same device."""
    from common.layout import narrowed_env

    if len(gpu_ids) != tp_size:
        raise ValueError(f"gpu_ids: a tp {tp_size} server needs {tp_size} GPU ids, got {list(gpu_ids)}")
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "127.0.0.1",
               "--port", str(port), "--tp-size", str(tp_size), "--dtype", dtype, "--random-seed", str(seed),
               "--base-gpu-id", "0", "--skip-tokenizer-init", *extra_args]
    env = {**os.environ, "NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0", **narrowed_env(gpu_ids)}
    return command, env


def launch_server(model_path: str, *, port: int, tp_size: int, dtype: str, seed: int, gpu_ids: tuple[int, ...],
                  extra_args: tuple[str, ...] = (), log_path: str | None = None) -> subprocess.Popen:
    """Start the server of `server_command`, its output appended to `log_path`."""
    command, env = server_command(model_path, port=port, tp_size=tp_size, dtype=dtype, seed=seed, gpu_ids=gpu_ids,
                                  extra_args=extra_args)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def sync_backend(cfg: Any) -> str:
    """The weight group's backend as the learner picks it for the per_tensor layout: NCCL when the learner's weights
    live on a GPU, gloo otherwise (common.weight_protocol.transport_device); `auto` resolves on this host."""
    from common.models import resolve_device

    return "nccl" if resolve_device(cfg.learner.device).startswith("cuda") else "gloo"


# ---------------------------------------------------------------------------------------------- engine


class SGLangEngine:
    """Engine protocol over SGLang servers; sequences are spread over the servers, one batched request each."""

    def __init__(self, servers: list[SGLangServer], *, pause_mode: str = "retract", abort_policy: str = "resubmit",
                 rank_offset: int = 1, tp_size: int = 1, sync_address: str = "127.0.0.1:29555",
                 backend: str = "nccl", max_resubmits: int = 3, policy_version: int = 0,
                 update_timeout_s: float = 600.0):
        if not servers:
            raise ValueError("SGLangEngine needs at least one server")
        self.servers = servers
        self.pause_mode = pause_mode
        self.abort_policy = abort_policy
        self.rank_offset = rank_offset
        self.tp_size = tp_size
        self.master_address, port = sync_address.rsplit(":", 1)
        self.master_port = int(port)
        self.backend = backend
        self.max_resubmits = max_resubmits
        self.update_timeout_s = update_timeout_s
        """Longest wait for one bucket's reply (the server waits that long inside the broadcast)."""
        self.policy_version = policy_version
        self.aborted = 0
        """Aborted sequences seen (resubmitted or dropped)."""
        self._paused = False
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(servers)), thread_name_prefix="sglang")

    @classmethod
    def from_config(cls, cfg: Any, actor_index: int, log_dir: str | None = None) -> "SGLangEngine":
        """Attach to this actor's share of cfg.actor.sglang_urls, or launch its one server on its GPUs, at the rank
        offsets of common/layout.py; wait until healthy."""
        from common.layout import LAUNCHED, plan_layout

        actor = cfg.actor
        slots = plan_layout(cfg).engines_of(actor_index)
        if slots[0].url != LAUNCHED:
            servers = [SGLangServer(slot.url) for slot in slots]
        else:
            from common.models import resolve_model_path
            from common.processes import free_port

            port = free_port()
            log_path = os.path.join(log_dir, f"sglang{actor_index}.log") if log_dir else None
            process = launch_server(str(resolve_model_path(cfg.run.model)), port=port, tp_size=actor.sglang_tp_size,
                                    dtype=actor.dtype, seed=cfg.run.seed + actor_index, log_path=log_path,
                                    gpu_ids=slots[0].gpu_ids)
            servers = [SGLangServer(f"http://127.0.0.1:{port}", process=process)]
        # Engine k of this actor joins at rank_offset + k * tp_size: the layout numbers an actor's engines
        # consecutively with one tp size, so the first offset fixes them all.
        engine = cls(servers, pause_mode=actor.sglang_pause_mode, abort_policy=actor.abort_policy,
                     rank_offset=slots[0].rank_offset, tp_size=actor.sglang_tp_size,
                     sync_address=cfg.learner.sync_address, backend=sync_backend(cfg),
                     update_timeout_s=cfg.learner.sync_timeout_s + 30.0)
        engine.attach(timeout_s=900.0)
        return engine

    def attach(self, timeout_s: float) -> None:
        """Wait until every server answers, check its sglang version, undo what a previous driver left (an open
        weight-update session, paused generation), then wait until it generates."""
        deadline = time.monotonic() + timeout_s
        for server in self.servers:
            version = self._wait_for_version(server, deadline)
            check_sglang_version(version, server.url)
            logger.info("sglang %s: version %s", server.url, version)
        self._each(lambda s: s.end_stale_session())
        self.resume()
        self.wait_until_healthy(max(deadline - time.monotonic(), 1.0))

    def _wait_for_version(self, server: SGLangServer, deadline: float) -> str:
        while True:
            try:
                return server.version()
            except SGLangError as exc:  # not up yet (refused, or 5xx while it starts)
                if server.process is not None and server.process.poll() is not None:
                    raise SGLangError(f"sglang server {server.url} exited with {server.process.returncode}") from None
                if time.monotonic() > deadline:
                    raise SGLangError(f"sglang server {server.url} not answering: {exc}") from None
            time.sleep(2.0)

    def wait_until_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.health():
            for server in self.servers:
                if server.process is not None and server.process.poll() is not None:
                    raise SGLangError(f"sglang server {server.url} exited with {server.process.returncode}")
            if time.monotonic() > deadline:
                raise SGLangError(f"sglang servers not healthy after {timeout_s:.0f} s")
            time.sleep(2.0)

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, prompt_token_ids: list[list[int]], n: list[int],
                 sampling: SamplingParams) -> list[list[GeneratedSample]]:
        owners = [i for i, count in enumerate(n) for _ in range(count)]
        sequences = [list(prompt_token_ids[i]) for i in owners]
        seeds = [None if sampling.seed is None else sampling.seed + k for k in range(len(sequences))]
        samples: list[GeneratedSample | None] = [None] * len(sequences)
        todo = list(range(len(sequences)))
        for attempt in range(self.max_resubmits + 1):
            results = self._generate_spread([sequences[k] for k in todo], [seeds[k] for k in todo], sampling, attempt)
            retry = []
            for k, sample in zip(todo, results):
                samples[k] = sample
                if sample.finish_reason == "abort":
                    self.aborted += 1
                    retry.append(k)
            if not retry or self.abort_policy == "drop":
                break
            todo = retry
        grouped: list[list[GeneratedSample]] = [[] for _ in prompt_token_ids]
        for owner, sample in zip(owners, samples):
            grouped[owner].append(sample)  # aborted ones stay marked "abort"; the worker never submits them
        return grouped

    def _generate_spread(self, sequences: list[list[int]], seeds: list[int | None], sampling: SamplingParams,
                         attempt: int) -> list[GeneratedSample]:
        shards = [list(range(s, len(sequences), len(self.servers))) for s in range(len(self.servers))]
        futures = [self._pool.submit(self._generate_on, server, [sequences[k] for k in shard],
                                     [seeds[k] for k in shard], sampling, attempt)
                   for server, shard in zip(self.servers, shards) if shard]
        out: list[GeneratedSample | None] = [None] * len(sequences)
        for shard, future in zip([s for s in shards if s], futures):
            for k, sample in zip(shard, future.result()):
                out[k] = sample
        return out

    def _generate_on(self, server: SGLangServer, sequences: list[list[int]], seeds: list[int | None],
                     sampling: SamplingParams, attempt: int) -> list[GeneratedSample]:
        request = build_generate_request(sequences, seeds, sampling, attempt)
        start_version = self.policy_version
        body = server.post("/generate", request)
        return parse_generate_response(body, len(sequences), start_version, self.policy_version)

    # ------------------------------------------------------------------------------------------ weights

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        raise NotImplementedError("SGLang engines receive weights through update_from_announcement (broadcast)")

    def update_from_announcement(self, ann: Any) -> dict[str, float]:
        """Follow one learner WeightAnnouncement: join on an invitation, else install its version (which may equal
        the current one: a re-sent version). Returns only after every bucket's reply came back OK; raises
        SGLangError on any failure, with every weight-update session it opened ended and generation resumed."""
        start = time.monotonic()
        if not ann.buckets:
            self._join_group(ann)
            return {"time/sglang_join_s": time.monotonic() - start}
        stray = [server.url for server in self.servers if server.group_name != ann.group_name]
        if stray:
            raise SGLangError(f"version {ann.version} announced on group {ann.group_name}, which {stray} have not "
                              f"joined")
        self.pause()
        try:
            self._install(ann)
            if self.pause_mode != "in_place":
                self._each(lambda s: _check_status(s.get("/flush_cache"), s.url + "/flush_cache"))
            self.policy_version = int(ann.version)
        finally:
            self.resume()
        return {"time/weight_swap_s": time.monotonic() - start}

    def _install(self, ann: Any) -> None:
        """begin -> one /update_weights_from_distributed per bucket -> end, on every server at once.

        sglang 0.5.23 refuses a second /begin_weight_update while a session is open, so a session this call
        opened is always ended, also when a bucket failed; otherwise one failed bucket wedges the server."""
        opened: list[SGLangServer] = []
        lock = threading.Lock()

        def begin(server: SGLangServer) -> None:
            if server.begin_session():
                with lock:
                    opened.append(server)

        try:
            self._each(begin)
            for bucket in ann.buckets:
                request = UpdateWeightsFromDistributedRequest(
                    names=[t.name for t in bucket], dtypes=[t.dtype for t in bucket],
                    shapes=[list(t.shape) for t in bucket], group_name=ann.group_name, flush_cache=False,
                    weight_version=str(ann.version))
                self._each(lambda s: s.post("/update_weights_from_distributed", request,
                                            timeout_s=self.update_timeout_s))
        except BaseException:
            try:
                _collect([self._pool.submit(server.end_session) for server in opened])
            except SGLangError as exc:
                logger.error("sglang: ending the weight-update session after a failed update failed too: %s", exc)
            raise
        _collect([self._pool.submit(server.end_session) for server in opened])

    def _join_group(self, ann: Any) -> None:
        def join(index: int, server: SGLangServer) -> None:
            if server.group_name is not None and server.group_name != ann.group_name:
                server.destroy_group(server.group_name)
                server.group_name = None
            server.post("/init_weights_update_group", InitWeightsUpdateGroupRequest(
                master_address=self.master_address, master_port=self.master_port,
                rank_offset=self.rank_offset + index * self.tp_size, world_size=ann.world_size,
                group_name=ann.group_name, backend=self.backend))
            server.group_name = ann.group_name

        # All servers must be inside init at the same time: the group forms only when every rank has arrived.
        futures = [self._pool.submit(join, i, server) for i, server in enumerate(self.servers)]
        _collect(futures)

    def _each(self, call: Any) -> None:
        """Send the same request to every server at once and wait for all replies (same order on every server)."""
        _collect([self._pool.submit(call, server) for server in self.servers])

    # ------------------------------------------------------------------------------------------ control

    def pause(self) -> None:
        self._each(lambda s: s.post("/pause_generation", PauseGenerationRequest(mode=self.pause_mode)))
        self._paused = True

    def resume(self) -> None:
        self._each(lambda s: s.post("/continue_generation", EmptyRequest()))
        self._paused = False

    def health(self) -> bool:
        if self._paused:
            return True  # /health answers 503 while paused; pausing is not a failure
        for server in self.servers:
            try:
                status, _ = server.get("/health_generate", timeout_s=30.0)
            except SGLangError:
                return False
            if status != 200:
                return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                server.process.terminate()
                try:
                    server.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.process.kill()


def build_generate_request(sequences: list[list[int]], seeds: list[int | None], sampling: SamplingParams,
                           attempt: int = 0) -> GenerateRequest:
    """One batched /generate body; a resubmission shifts fixed seeds so it does not replay the aborted sample."""
    params = [SGLangSamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                   max_new_tokens=sampling.max_new_tokens,
                                   stop_token_ids=list(sampling.stop_token_ids),
                                   sampling_seed=None if seed is None else seed + attempt * 1_000_003)
              for seed in seeds]
    return GenerateRequest(input_ids=sequences, sampling_params=params)


def _check_status(reply: tuple[int, bytes], what: str) -> None:
    if reply[0] != 200:
        raise SGLangError(f"{what}: HTTP {reply[0]}: {reply[1][:300]!r}", reply[0])


def _collect(futures: list[Future]) -> None:
    errors = [f.exception() for f in futures]
    errors = [e for e in errors if e is not None]
    if errors:
        raise errors[0]
