"""Wire schemas: round trips, array checks, and every kind of malformed input raising WireError."""

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import schemas as s

pytestmark = pytest.mark.unit


def _group(n_tokens=3, reward=1.0):
    sample = s.make_sample(list(range(n_tokens)), [-0.5] * n_tokens, [2] * n_tokens, reward, True, "stop")
    return s.Group(prompt_id="p0", prompt_tokens=s.encode_array([7, 8, 9], s.TOKEN_DTYPE), samples=[sample])


ALL_REQUESTS = [
    s.Register(role="actor", client_id="a0"),
    s.LeaseRequest(actor_id="a0", max_prompts=4),
    s.Submit(lease_id=3, group=_group()),
    s.Release(lease_id=3, prompt_ids=["p0"]),
    s.Fetch(learner_id="l", n_groups=8),
    s.ReportVersion(version=5),
    s.StatsRequest(),
    s.InspectRequest(what="prompts", top=3),
    s.SnapshotRequest(),
]


@pytest.mark.parametrize("msg", ALL_REQUESTS, ids=lambda m: type(m).__name__)
def test_every_request_round_trips(msg):
    assert s.decode_message(s.encode_message(msg), "request") == msg


def test_arrays_round_trip_as_little_endian_bytes():
    g = _group(n_tokens=4)
    sample = s.decode_message(s.encode_message(s.Submit(lease_id=1, group=g)), "request").group.samples[0]
    tokens, logprobs, versions = sample.arrays()
    assert tokens.tolist() == [0, 1, 2, 3]
    assert logprobs.dtype == np.dtype("<f4") and logprobs.tolist() == [-0.5] * 4
    assert versions.tolist() == [2, 2, 2, 2]
    # int32 little-endian: the token 1 is the four bytes 01 00 00 00
    assert sample.tokens[4:8] == b"\x01\x00\x00\x00"


def test_wrong_schema_version_is_named():
    data = s.encode_message(s.StatsRequest(schema=s.SCHEMA_VERSION + 1))
    with pytest.raises(s.WireError, match=f"schema: version {s.SCHEMA_VERSION + 1}") as info:
        s.decode_message(data, "request")
    assert info.value.code == "schema_version"


def test_truncated_and_oversized_messages():
    data = s.encode_message(s.Submit(lease_id=1, group=_group()))
    with pytest.raises(s.WireError) as info:
        s.decode_message(data[: len(data) // 2], "request")
    assert info.value.code == "malformed"
    with pytest.raises(s.WireError, match="exceeds the limit of 10") as info:
        s.decode_message(data, "request", max_bytes=10)
    assert info.value.code == "too_large"


def test_wrong_field_type_names_the_field():
    raw = msgspec.msgpack.encode({"type": "lease", "schema": 1, "actor_id": "a", "max_prompts": "four"})
    with pytest.raises(s.WireError, match=r"\$\.max_prompts") as info:
        s.decode_message(raw, "request")
    assert info.value.code == "invalid"


def test_unknown_field_and_reply_as_request_rejected():
    raw = msgspec.msgpack.encode({"type": "stats", "schema": 1, "sneaky": 1})
    with pytest.raises(s.WireError, match="sneaky"):
        s.decode_message(raw, "request")
    with pytest.raises(s.WireError, match="type"):
        s.decode_message(s.encode_message(s.Ack()), "request")


def test_array_length_mismatch_names_the_array():
    sample = s.make_sample([1, 2, 3], [-0.1, -0.2, -0.3], [0, 0, 0], 0.0, False, "length")
    bad = msgspec.structs.replace(sample, logprobs=sample.logprobs[:8])  # 2 floats for 3 tokens
    with pytest.raises(s.WireError, match="samples.logprobs: has 2 elements, expected 3"):
        bad.arrays()
    odd = msgspec.structs.replace(sample, tokens=sample.tokens + b"\x00")  # 13 bytes: not whole int32s
    with pytest.raises(s.WireError, match="samples.tokens: 13 bytes is not a multiple of 4"):
        odd.arrays()


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(logprobs=s.encode_array([-0.1, float("nan"), -0.3], s.LOGPROB_DTYPE)), "samples.logprobs: not finite"),
        (dict(logprobs=s.encode_array([-0.1, 0.5, -0.3], s.LOGPROB_DTYPE)), "must be <= 0"),
        (dict(versions=s.encode_array([0, 9, 0], s.VERSION_DTYPE)), "samples.versions: must be in [0, 5]"),
        (dict(finish_reason="abort"), "aborted samples"),
        (dict(finish_reason="timeout"), "finish_reason"),
        (dict(reward=float("inf")), "samples.reward"),
        (dict(n_tokens=4), "expected 4"),
    ],
)
def test_validate_sample_names_each_problem(change, reason):
    good = s.make_sample([1, 2, 3], [-0.1, -0.2, -0.3], [0, 1, 5], 1.0, True, "stop")
    assert s.validate_sample(good, max_version=5) is None
    problem = s.validate_sample(msgspec.structs.replace(good, **change), max_version=5)
    assert problem is not None and reason in problem


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_wire_error(data):
    try:
        msg = s.decode_message(data, "request")
    except s.WireError:
        return
    assert isinstance(msg, s.Request.__args__)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_messages_never_crash_the_decoder(data):
    raw = bytearray(s.encode_message(data.draw(st.sampled_from(ALL_REQUESTS))))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        s.decode_message(bytes(raw), "request")
    except s.WireError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=64),
       st.floats(-1e3, 0.0, allow_nan=False))
def test_sample_round_trip_property(tokens, lp):
    sample = s.make_sample(tokens, [lp] * len(tokens), [0] * len(tokens), 0.0, False, "length")
    decoded = s.decode_message(s.encode_message(s.Submit(lease_id=0, group=s.Group(
        prompt_id="x", prompt_tokens=b"", samples=[sample]))), "request").group.samples[0]
    t, l, v = decoded.arrays()
    assert t.tolist() == tokens
    assert np.allclose(l, np.float32(lp))
