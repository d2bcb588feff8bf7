"""A corpus of malformed and hostile requests sent over a real socket to a real buffer process
(`python -m buffer.server`): bad frames, wrong types, out-of-range integers, huge sizes, unknown tags, truncated and
bit-flipped MessagePack, semantically bad groups, version reports from strangers. Every bad request must get an
`Error` with a code and a message, the process must stay alive and answer, the counters must equal the corpus's
expected codes exactly, and the groups submitted before the barrage must all be served afterwards.

    .venv/bin/python -m pytest tests/test_buffer_fuzz.py -q -s    # prints the tally recorded in docs/BENCHMARKS.md
"""

from __future__ import annotations

import math
import random
import signal
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from buffer.client import BufferClient
from common.schemas import (LOGPROB_DTYPE, SCHEMA_VERSION, Error, Fetch, InspectRequest, LeaseRequest, Register,
                            Release, ReportVersion, StatsRequest, Submit, decode_message, encode_message)
from test_buffer_process import mixed_group, server_process

pytestmark = pytest.mark.integration

MAX_BYTES = 64 * 1024
SECRET = "fuzz-secret"
DECODE_CODES = {"malformed", "invalid", "bad_frames", "too_large", "schema_version"}
pack = msgspec.msgpack.encode


def _req(**fields) -> bytes:
    return pack({"schema": SCHEMA_VERSION, **fields})


def wire_corpus(good_submit: bytes) -> list[tuple[str, list[bytes], str]]:
    """(name, frames after the DEALER's empty delimiter, expected error code)."""
    i64, u64 = 2**63 - 1, 2**64 - 1
    cases: list[tuple[str, list[bytes], str]] = [
        ("two payload frames", [b"", good_submit, b"x"], "bad_frames"),
        ("three payload frames", [b"", b"a", b"b", b"c"], "bad_frames"),
        ("no delimiter, two frames", [b"a", b"b"], "bad_frames"),
        ("empty payload", [b"", b""], "malformed"),
        ("oversized payload", [b"", bytes(MAX_BYTES + 1)], "too_large"),
        ("oversized, under the socket limit", [b"", bytes(2 * MAX_BYTES - 64)], "too_large"),
        ("bin32 claiming 4 GiB", [b"", b"\xc6\xff\xff\xff\xff" + b"abc"], "malformed"),
        ("map32 claiming 4G entries", [b"", b"\xdf\xff\xff\xff\xff"], "malformed"),
        ("array32 claiming 4G entries", [b"", b"\xdd\xff\xff\xff\xff"], "invalid"),
        ("nested arrays 60k deep", [b"", b"\x91" * 60_000], "invalid"),
        ("nested maps 20k deep", [b"", b"\x82\xa4type\xa5stats\xa1x" + b"\x81\xa1x" * 20_000 + b"\x00"], "invalid"),
        ("reserved msgpack byte", [b"", b"\xc1"], "malformed"),
        ("msgpack scalar", [b"", pack(42)], "invalid"),
        ("msgpack list", [b"", pack([1, 2, 3])], "invalid"),
        ("no type tag", [b"", pack({"schema": SCHEMA_VERSION})], "invalid"),
        ("unknown tag", [b"", _req(type="hello")], "invalid"),
        ("integer tag", [b"", _req(type=7)], "invalid"),
        ("reply tag as request", [b"", _req(type="ack", note="")], "invalid"),
        ("unknown field", [b"", _req(type="stats", extra=1)], "invalid"),
        ("wrong type: actor_id int", [b"", _req(type="lease", actor_id=5, max_prompts=1)], "invalid"),
        ("wrong type: max_prompts str", [b"", _req(type="lease", actor_id="a", max_prompts="8")], "invalid"),
        ("wrong type: rollback str", [b"", _req(type="version", version=1, rollback="yes")], "invalid"),
        ("wrong type: group list", [b"", _req(type="submit", lease_id=1, group=[])], "invalid"),
        ("schema from the future", [b"", pack({"type": "stats", "schema": SCHEMA_VERSION + 1})],
         "schema_version"),
        ("schema 1", [b"", pack({"type": "stats", "schema": 1})], "schema_version"),
        ("schema u64 max", [b"", pack({"type": "stats", "schema": u64})], "schema_version"),
        ("version int64 max", [b"", _req(type="version", version=i64)], "invalid"),
        ("version int64 min, rollback", [b"", _req(type="version", version=-i64 - 1, rollback=True)], "invalid"),
        ("version 2**31", [b"", _req(type="version", version=2**31)], "invalid"),
        ("version u64 max", [b"", _req(type="version", version=u64)], "invalid"),
        ("lease_id -1", [b"", _req(type="release", lease_id=-1, prompt_ids=[])], "invalid"),
        ("lease_id u64 max", [b"", _req(type="release", lease_id=u64, prompt_ids=[])], "invalid"),
        ("max_prompts 2**40", [b"", _req(type="lease", actor_id="a", max_prompts=2**40)], "invalid"),
        ("n_groups int64 min", [b"", _req(type="fetch", learner_id="l", n_groups=-i64 - 1)], "invalid"),
        ("request_id -5", [b"", _req(type="fetch", learner_id="l", n_groups=1, request_id=-5)], "invalid"),
        ("inspect top 2**62", [b"", _req(type="inspect", what="prompts", top=2**62)], "invalid"),
        ("client id 60 kB", [b"", _req(type="register", role="actor", client_id="x" * 60_000)], "invalid"),
        ("invalid utf-8 string", [b"", b"\x83\xa4type\xa8register\xa6schema\x02\xa4role\xa2\xff\xfe"],
         "malformed"),
    ]
    for cut in sorted(set(range(1, len(good_submit), max(1, len(good_submit) // 40)))):
        cases.append((f"submit truncated at {cut}", [b"", good_submit[:cut]], "malformed"))
    rng = np.random.default_rng(0)
    for k in range(20):
        data = rng.bytes(int(rng.integers(1, 400)))
        try:
            decode_message(data, "request")
            code = "ok"
        except Exception as exc:  # the reference classification of the same bytes, computed here
            code = getattr(exc, "code", "unexpected")
        cases.append((f"random bytes {k}", [b"", data], code))
    return cases


def semantic_corpus(lease_id: int, prompt_id: str, n: int) -> list[tuple[str, bytes, str]]:
    """Well-formed messages the buffer must refuse: (name, payload, expected error code)."""
    nan = mixed_group(prompt_id, n)
    nan.samples[0].logprobs = np.array([math.nan, -1.0], dtype=LOGPROB_DTYPE).tobytes()
    positive = mixed_group(prompt_id, n)
    positive.samples[0].logprobs = np.array([0.5, -1.0], dtype=LOGPROB_DTYPE).tobytes()
    short = mixed_group(prompt_id, n)
    short.samples[0].tokens = short.samples[0].tokens[:4]
    negative_n = mixed_group(prompt_id, n)
    negative_n.samples[0].n_tokens = -3
    future = mixed_group(prompt_id, n, version=5)
    inf_reward = mixed_group(prompt_id, n)
    inf_reward.samples[0].reward = math.inf
    aborted = mixed_group(prompt_id, n)
    aborted.samples[0].finish_reason = "abort"
    odd_prompt = mixed_group(prompt_id, n)
    odd_prompt.prompt_tokens = b"\x01\x02\x03"
    return [
        ("report from a stranger", encode_message(ReportVersion(version=1000)), "not_learner"),
        ("rollback from a stranger", encode_message(ReportVersion(version=0, rollback=True)), "not_learner"),
        ("forged session", encode_message(ReportVersion(version=1, session="0" * 32)), "not_learner"),
        ("learner without secret", encode_message(Register(role="learner", client_id="x")), "auth_failed"),
        ("learner with a wrong secret", encode_message(Register(role="learner", client_id="x", secret="guess")),
         "auth_failed"),
        ("nan log-prob", encode_message(Submit(lease_id=lease_id, group=nan)), "invalid_logprobs"),
        ("positive log-prob", encode_message(Submit(lease_id=lease_id, group=positive)), "invalid_logprobs"),
        ("short token array", encode_message(Submit(lease_id=lease_id, group=short)), "invalid_tokens"),
        ("negative n_tokens", encode_message(Submit(lease_id=lease_id, group=negative_n)), "invalid_n_tokens"),
        ("version from the future", encode_message(Submit(lease_id=lease_id, group=future)), "invalid_versions"),
        ("infinite reward", encode_message(Submit(lease_id=lease_id, group=inf_reward)), "invalid_reward"),
        ("aborted sample", encode_message(Submit(lease_id=lease_id, group=aborted)), "invalid_finish_reason"),
        ("prompt tokens not int32", encode_message(Submit(lease_id=lease_id, group=odd_prompt)),
         "invalid_prompt_tokens"),
        ("wrong n", encode_message(Submit(lease_id=lease_id, group=mixed_group(prompt_id, n + 1))), "wrong_n"),
        ("unknown lease", encode_message(Submit(lease_id=2**62, group=mixed_group(prompt_id, n))), "unknown_lease"),
        ("prompt not in lease", encode_message(Submit(lease_id=lease_id, group=mixed_group("nope", n))),
         "prompt_not_in_lease"),
        ("release unknown lease", encode_message(Release(lease_id=2**40, prompt_ids=["p0"])), "unknown_lease"),
        ("lease 0 prompts", encode_message(LeaseRequest(actor_id="a", max_prompts=0)), "bad_request"),
        ("fetch 0 groups", encode_message(Fetch(learner_id="l", n_groups=0)), "bad_request"),
        ("fetch 2**31-1 groups", encode_message(Fetch(learner_id="l", n_groups=2**31 - 1)), "bad_request"),
        ("nan wait", encode_message(Fetch(learner_id="l", n_groups=1, wait_s=math.nan)), "bad_request"),
        ("negative wait", encode_message(LeaseRequest(actor_id="a", max_prompts=1, wait_s=-1.0)), "bad_request"),
        ("inspect bogus", encode_message(InspectRequest(what="bogus")), "bad_request"),
    ]


def exchange(sock: zmq.Socket, frames: list[bytes]) -> object | None:
    sock.send_multipart(frames)
    if not sock.poll(5000):
        return None
    return decode_message(sock.recv_multipart()[-1], "reply")


def test_malformed_corpus_gets_named_errors_and_loses_nothing(tmp_path: Path):
    with server_process(tmp_path, "--buffer.max-message-bytes", str(MAX_BYTES), "--run.secret", SECRET,
                        "--algo.max-staleness", "100", n_prompts=16) as (proc, address, _):
        client = BufferClient(address, timeout_s=5, secret=SECRET)
        client.register("learner", "learner")
        grant = client.lease("a0", 4)
        kept = grant.items[:3]
        for it in kept:
            assert client.submit(grant.lease_id, mixed_group(it.prompt_id, it.n)).queued
        target = grant.items[3]
        good_submit = encode_message(Submit(lease_id=grant.lease_id, group=mixed_group(target.prompt_id, target.n)))
        cases = [(name, frames, code) for name, frames, code in wire_corpus(good_submit)]
        cases += [(name, [b"", payload], code) for name, payload, code in
                  semantic_corpus(grant.lease_id, target.prompt_id, target.n)]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        expected: Counter[str] = Counter()
        bad_decodes = 0
        for name, frames, code in cases:
            reply = exchange(sock, frames)
            if code == "ok":  # random bytes that happen to form a valid request: any reply is fine
                assert reply is not None, name
                continue
            assert isinstance(reply, Error) and reply.code == code and reply.message, (name, reply)
            expected[code] += 1
            bad_decodes += code in DECODE_CODES
        # Counters are exact: every bad input counted once, under its code.
        stats = client.stats()
        assert stats["messages_bad"] == bad_decodes
        assert stats["errors"] == dict(expected)
        submit_codes = {c: k for c, k in expected.items() if c.startswith("invalid_") or c in
                        ("wrong_n", "prompt_not_in_lease")}
        submit_codes["unknown_lease"] = 1  # the release of an unknown lease counts only in errors
        assert stats["groups_rejected"] == submit_codes
        # Bit flips of valid requests: every one is answered (an error or a normal reply), none kills the server.
        valid = [encode_message(m) for m in (StatsRequest(), LeaseRequest(actor_id="z", max_prompts=1),
                                             Release(lease_id=1, prompt_ids=["p1"]), InspectRequest(top=2))]
        rnd = random.Random(0)
        flipped = 0
        for payload in valid:
            for _ in range(50):
                data = bytearray(payload)
                bit = rnd.randrange(8 * len(data))
                data[bit // 8] ^= 1 << (bit % 8)
                assert exchange(sock, [b"", bytes(data)]) is not None
                flipped += 1
        # Far beyond the socket limit: ZeroMQ drops that connection, the server lives on.
        beyond = zmq.Context.instance().socket(zmq.DEALER)
        beyond.setsockopt(zmq.LINGER, 0)
        beyond.connect(address)
        beyond.send_multipart([b"", bytes(3 * MAX_BYTES)])
        assert not beyond.poll(500)
        beyond.close(0)
        sock.close(0)
        assert proc.poll() is None
        flips_bad = client.stats()["messages_bad"] - bad_decodes
        assert 0 <= flips_bad <= flipped
        # Nothing lost: the groups queued before the barrage are served, and the open prompt is still submittable.
        assert client.submit(grant.lease_id, mixed_group(target.prompt_id, target.n)).queued
        batch = client.fetch("learner", 4)
        assert [g.group.prompt_id for g in batch.groups] == [it.prompt_id for it in kept] + [target.prompt_id]
        after = client.stats()
        assert after["groups_received"] == 4 and after["groups_served"] == 4 and after["queue_depth"] == 0
        client.close()
        print(f"\nfuzz: {len(cases) + flipped + 1} inputs ({len(cases)} corpus, {flipped} bit flips, 1 beyond the "
              f"socket limit); {sum(expected.values())} corpus inputs rejected with the expected code "
              f"({bad_decodes} undecodable, {sum(expected.values()) - bad_decodes} refused by the handlers); "
              f"{flips_bad} bit flips undecodable, the other {flipped - flips_bad} answered; crashes 0; groups lost 0")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
