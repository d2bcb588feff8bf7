"""Wire schemas of the buffer protocol: typed MessagePack messages (msgspec Structs).

Every message is a tagged Struct (`type` field) carrying `schema`, the protocol version. Token ids, log-probs and
per-token policy versions travel as raw little-endian arrays in `bytes` fields, never as lists and never pickled.
`decode_message` turns bytes into a typed message or raises `WireError` naming the offending field; it never
raises anything else for any input. Array fields are checked against their declared length by `Sample.arrays()`.

Request -> reply pairs (the buffer answers every request with exactly one reply or `Error`):
    Register      -> Registered
    LeaseRequest  -> LeaseGrant (possibly with no items: admission control says wait)
    Submit        -> SubmitAck
    Release       -> Ack            (an actor gives back prompts it will not finish)
    EvalSubmit    -> SubmitAck      (one held-out evaluation result of an evaluation lease)
    Fetch         -> Batch          (possibly empty: not enough groups yet)
    ReportVersion -> Ack
    StatsRequest  -> Stats
    InspectRequest-> InspectReply
    SnapshotRequest -> Ack          (write the buffer snapshot now, e.g. at a learner checkpoint)
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec
import numpy as np

SCHEMA_VERSION = 2
"""2: learner sessions (Register.secret, Registered.session, ReportVersion.session) and range-checked integers."""

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_ID_CHARS = 256
"""Longest client, role or prompt id accepted (ids are kept in memory per client and per prompt)."""

# Every integer that arrives from outside is range-checked at decode time, so no handler and no reply ever sees a
# value the protocol cannot carry back. Policy versions travel as int32 in every token's version array.
Version = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
Count = Annotated[int, msgspec.Meta(ge=-INT32_MAX, le=INT32_MAX)]
"""A size or count: handlers check the exact bounds and name them; this only keeps it to 32 bits."""
Id64 = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Arrival = Annotated[int, msgspec.Meta(ge=-1, le=INT64_MAX)]
"""Lease ids and request ids: non-negative int64."""
Name = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")
VERSION_DTYPE = np.dtype("<i4")

FINISH_REASONS = ("stop", "length", "abort")


class WireError(ValueError):
    """A message could not be decoded or failed validation. `code` is a short machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    schema: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------- payloads


class Sample(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One response. Arrays are little-endian bytes of length n_tokens (see TOKEN/LOGPROB/VERSION_DTYPE)."""

    tokens: bytes
    logprobs: bytes
    versions: bytes
    n_tokens: Count
    reward: float
    correct: bool
    finish_reason: str

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids int32, behaviour log-probs float32, policy versions int32), each [n_tokens]; checked."""
        if self.n_tokens < 0:
            raise WireError("bad_length", f"samples.n_tokens: must be >= 0, got {self.n_tokens}")
        return (
            decode_array(self.tokens, TOKEN_DTYPE, self.n_tokens, "samples.tokens"),
            decode_array(self.logprobs, LOGPROB_DTYPE, self.n_tokens, "samples.logprobs"),
            decode_array(self.versions, VERSION_DTYPE, self.n_tokens, "samples.versions"),
        )


class Group(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """All responses to one prompt from one lease. `prompt_tokens` is int32 little-endian bytes."""

    prompt_id: Name
    prompt_tokens: bytes
    samples: list[Sample]

    def prompt_array(self) -> np.ndarray:
        return decode_array(self.prompt_tokens, TOKEN_DTYPE, None, "group.prompt_tokens")


class WorkItem(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A prompt leased to an actor with the number of responses to sample."""

    prompt_id: str
    prompt: str
    n: int
    answer: str
    metadata_json: str = "{}"
    greedy: bool = False
    """Evaluation leases only: decode greedily (temperature 0, n = 1) instead of with the actor's sampling."""
    benchmark: Name = ""
    """Evaluation leases of a suite (run.eval_suite) only: the item's benchmark; such items are graded by the math
    scorer whatever task.scorer says."""


class EvalResult(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The scored responses to one item of an evaluation lease (no tokens: evaluation only counts)."""

    item_id: Name
    correct: list[bool]
    rewards: list[float]
    lengths: list[Count]
    """Response tokens of each sample, the final stop token not counted."""
    weights_version_min: Version
    weights_version_max: Version
    """Oldest and newest policy version of the weights that generated these responses."""


class ServedGroup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A group handed to the learner, with its staleness at serving time."""

    group: Group
    staleness: int
    arrival: int


# ---------------------------------------------------------------------------------------------- requests


class Register(_Msg, tag="register"):
    role: Name
    client_id: Name
    secret: str = ""
    """The run's secret (run.secret); required to register as the `learner` when the buffer has one."""


class LeaseRequest(_Msg, tag="lease"):
    actor_id: Name
    max_prompts: Count
    request_id: Id64 = 0
    """Non-zero: a retry with the same (actor_id, request_id) gets the same grant back instead of a second lease."""
    wait_s: float = 0.0
    """Long poll: while admission control or back-pressure would give no work, the buffer holds the request up to
    this long and answers as soon as work can be granted (0 = answer at once)."""


class Submit(_Msg, tag="submit"):
    lease_id: Id64
    group: Group


class Release(_Msg, tag="release"):
    lease_id: Id64
    prompt_ids: list[Name]


class EvalSubmit(_Msg, tag="eval_submit"):
    lease_id: Id64
    result: EvalResult


class Fetch(_Msg, tag="fetch"):
    learner_id: Name
    n_groups: Count
    request_id: Id64 = 0
    """Non-zero: a retry with the same (learner_id, request_id) gets the same batch back (a lost reply loses nothing)."""
    wait_s: float = 0.0
    """Long poll: while fewer than n_groups are queued, the buffer holds the request up to this long and answers as
    soon as they are (0 = answer at once)."""
    after_arrival: Arrival = -1
    """The newest ServedGroup.arrival the learner has consumed (-1: none). A buffer restored from a snapshot may
    hold groups it served after that snapshot; those are not served again."""


class ReportVersion(_Msg, tag="version"):
    version: Version
    rollback: bool = False
    """True when a resumed learner goes back to an older checkpoint's version."""
    session: str = ""
    """The learner session from `Registered.session`: only the registered learner may report versions."""


class StatsRequest(_Msg, tag="stats"):
    pass


class InspectRequest(_Msg, tag="inspect"):
    what: Name = "prompts"
    top: Count = 0


class SnapshotRequest(_Msg, tag="snapshot"):
    pass


# ---------------------------------------------------------------------------------------------- replies


class Registered(_Msg, tag="registered"):
    policy_version: int
    session: str = ""
    """For the learner role: the token its version reports carry (a new registration replaces the old one)."""


class LeaseGrant(_Msg, tag="lease_grant"):
    lease_id: int
    items: list[WorkItem]
    policy_version: int
    deadline_s: float
    wait_reason: str = ""
    eval_version: int = -1
    """>= 0: an evaluation lease for the held-out evaluation of that policy version; its items are evaluation
    items (ids unique to the evaluation), answered with EvalSubmit, given back with Release."""


class SubmitAck(_Msg, tag="submit_ack"):
    accepted: bool
    queued: bool
    note: str = ""


class Batch(_Msg, tag="batch"):
    groups: list[ServedGroup]
    policy_version: int
    dropped_stale: int = 0


class Ack(_Msg, tag="ack"):
    note: str = ""


class Stats(_Msg, tag="stats_reply"):
    counters: dict[str, Any]


class InspectReply(_Msg, tag="inspect_reply"):
    payload: Any


class Error(_Msg, tag="error"):
    code: str
    message: str


Request = Union[Register, LeaseRequest, Submit, EvalSubmit, Release, Fetch, ReportVersion, StatsRequest,
                InspectRequest, SnapshotRequest]
Reply = Union[Registered, LeaseGrant, SubmitAck, Batch, Ack, Stats, InspectReply, Error]
Message = Union[Request, Reply]

_encoder = msgspec.msgpack.Encoder()
_decoders = {
    "request": msgspec.msgpack.Decoder(Request),
    "reply": msgspec.msgpack.Decoder(Reply),
    "any": msgspec.msgpack.Decoder(Message),
}


def encode_message(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_message(data: bytes, kind: str = "any", max_bytes: int | None = None) -> Any:
    """Decode and validate one message; raises WireError (code + field-naming message) on any bad input."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError("too_large", f"message: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        msg = _decoders[kind].decode(data)
    except msgspec.ValidationError as exc:
        raise WireError("invalid", f"message: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise WireError("malformed", f"message: not valid MessagePack ({exc})") from None
    if msg.schema != SCHEMA_VERSION:
        raise WireError("schema_version",
                        f"schema: version {msg.schema} is not supported (expected {SCHEMA_VERSION})")
    return msg


def encode_array(values: Any, dtype: np.dtype) -> bytes:
    """Any int/float sequence or array -> raw little-endian bytes of `dtype`."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def decode_array(data: bytes, dtype: np.dtype, length: int | None, field: str) -> np.ndarray:
    """Raw bytes -> read-only array of `dtype`; checks divisibility and (if given) the element count."""
    if len(data) % dtype.itemsize:
        raise WireError("bad_length", f"{field}: {len(data)} bytes is not a multiple of {dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype)
    if length is not None and arr.shape[0] != length:
        raise WireError("bad_length", f"{field}: has {arr.shape[0]} elements, expected {length}")
    return arr


def make_sample(tokens: Any, logprobs: Any, versions: Any, reward: float, correct: bool,
                finish_reason: str) -> Sample:
    """Build a Sample from sequences/arrays of equal length."""
    tok = encode_array(tokens, TOKEN_DTYPE)
    n = len(tok) // TOKEN_DTYPE.itemsize
    return Sample(tokens=tok, logprobs=encode_array(logprobs, LOGPROB_DTYPE),
                  versions=encode_array(versions, VERSION_DTYPE), n_tokens=n, reward=float(reward),
                  correct=bool(correct), finish_reason=finish_reason)


def validate_sample(sample: Sample, max_version: int) -> str | None:
    """Why a sample is unacceptable for training, or None. Checks shapes, log-prob values, versions, reason."""
    try:
        _, logprobs, versions = sample.arrays()
    except WireError as exc:
        return str(exc)
    if sample.finish_reason not in FINISH_REASONS:
        return f"samples.finish_reason: {sample.finish_reason!r} is not one of {FINISH_REASONS}"
    if sample.finish_reason == "abort":
        return "samples.finish_reason: aborted samples are partial and must not be submitted"
    if not np.isfinite(sample.reward):
        return "samples.reward: not finite"
    if sample.n_tokens and not np.all(np.isfinite(logprobs)):
        return "samples.logprobs: not finite"
    if sample.n_tokens and float(logprobs.max()) > 1e-4:
        return f"samples.logprobs: log-probabilities must be <= 0, got max {float(logprobs.max()):.4g}"
    if sample.n_tokens and (int(versions.min()) < 0 or int(versions.max()) > max_version):
        return f"samples.versions: must be in [0, {max_version}], got [{int(versions.min())}, {int(versions.max())}]"
    return None


# ---------------------------------------------------------------------------------------------- weight sync


class TensorSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    dtype: str
    shape: list[int]


class WeightAnnouncement(_Msg, tag="weights"):
    """Published by the learner on the weight-sync control channel before it broadcasts a version.

    `layout` is `flat` (each bucket is one flattened tensor, HF receivers) or `per_tensor` (each tensor of a bucket
    is broadcast on its own in order, as SGLang's update_weights_from_distributed expects). `generation` counts
    rebuilds of the process group: a receiver that is not a member of `generation` must (re)join before receiving.
    """

    version: int
    group_name: str
    generation: int
    world_size: int
    layout: str
    buckets: list[list[TensorSpec]]
