"""Buffer throughput: groups/s and MB/s through submit -> fetch, beside raw pyzmq + msgpack of the same bytes.

    python bench/buffer_throughput.py [--groups 20000] [--rounds 3] [--samples 8] [--tokens 256]

Each round runs two servers, each in its own process, and drives them from this process with the same pattern:
  buffer: lease 64 prompts -> submit the 64 groups (pipelined, 32 in flight) -> fetch 64 -> report the next version;
  raw:    the same submit messages to a bare ROUTER that msgpack-decodes them untyped and queues them, then fetch 64.
The buffer path adds typed decoding, validation, dedup, admission control, stats and staleness bookkeeping. A group
is 8 samples x 256 tokens (token ids, log-probs and versions as raw little-endian arrays). Reported: the median
round; `--json` prints the numbers for scripts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from buffer.client import BufferClient  # noqa: E402
from common.schemas import Group, Submit, encode_message, make_sample  # noqa: E402

BATCH = 64
WINDOW = 32


def make_groups(n_distinct: int, samples: int, tokens: int) -> list[Group]:
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(n_distinct):
        s = [make_sample(rng.integers(0, 50_000, tokens), -rng.random(tokens), np.zeros(tokens), float(i % 2),
                         i % 2 == 1, "stop") for i in range(samples)]
        groups.append(Group(prompt_id="", prompt_tokens=rng.integers(0, 50_000, 64).astype("<i4").tobytes(),
                            samples=s))
    return groups


# ---------------------------------------------------------------------------------------------- raw baseline


def raw_server(endpoint_file: str) -> None:
    """A bare ROUTER: untyped msgpack decode, queue submits, answer fetches with a list of groups."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    Path(endpoint_file).write_text(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    queue: deque = deque()
    ok = msgspec.msgpack.encode({"ok": True})
    while True:
        ident, empty, payload = sock.recv_multipart(copy=False)
        msg = msgspec.msgpack.decode(payload.buffer)
        if msg["type"] == "submit":
            queue.append(msg["group"])
            reply = ok
        elif msg["type"] == "fetch":
            n = msg["n_groups"]
            reply = msgspec.msgpack.encode({"groups": [queue.popleft() for _ in range(n)] if len(queue) >= n else []})
        else:
            break
        sock.send_multipart([ident.bytes, b"", reply])
    sock.close(0)
    ctx.term()


def run_raw(endpoint: str, payloads: list[bytes], n_groups: int) -> float:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    fetch = msgspec.msgpack.encode({"type": "fetch", "n_groups": BATCH})
    t0 = time.perf_counter()
    done = 0
    while done < n_groups:
        in_flight = 0
        for i in range(BATCH):
            sock.send_multipart([b"", payloads[(done + i) % len(payloads)]], copy=False)
            in_flight += 1
            if in_flight == WINDOW:
                sock.recv_multipart()
                in_flight -= 1
        for _ in range(in_flight):
            sock.recv_multipart()
        sock.send_multipart([b"", fetch])
        got = msgspec.msgpack.decode(sock.recv_multipart()[-1])["groups"]
        assert len(got) == BATCH
        done += BATCH
    elapsed = time.perf_counter() - t0
    sock.send_multipart([b"", msgspec.msgpack.encode({"type": "quit"})])
    sock.close(0)
    return elapsed


# ---------------------------------------------------------------------------------------------- buffer


def start_buffer(prompts_file: Path) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "buffer.server", "--preset", "tiny", "--prompts-jsonl", str(prompts_file),
            "--buffer.address", "tcp://127.0.0.1:0", "--run.wandb-mode", "disabled",
            "--algo.allocation-mode", "uniform", "--algo.n-mean", "8", "--algo.n-min", "8", "--algo.n-max", "8",
            "--algo.max-staleness", "4", "--learner.groups-per-step", str(BATCH), "--buffer.wave-size", str(BATCH),
            "--buffer.max-queued-groups", "8192"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("buffer listening on "):
        raise RuntimeError(f"buffer did not start: {line!r}")
    return proc, line.split()[3]


def run_buffer(address: str, groups: list[Group], n_groups: int) -> float:
    client = BufferClient(address, timeout_s=30)
    version = client.register("learner", "bench")
    t0 = time.perf_counter()
    done = 0
    while done < n_groups:
        grant = client.lease("bench", BATCH)
        assert len(grant.items) == BATCH, grant.wait_reason
        # Tokens carry the version they were "generated" with, as an actor's do (else they would go stale).
        versions = np.full(groups[0].samples[0].n_tokens, grant.policy_version, "<i4").tobytes()
        batch = []
        for i, item in enumerate(grant.items):
            g = groups[(done + i) % len(groups)]
            samples = [msgspec.structs.replace(s, versions=versions) for s in g.samples]
            batch.append(Group(prompt_id=item.prompt_id, prompt_tokens=g.prompt_tokens, samples=samples))
        results = client.submit_many(grant.lease_id, batch, window=WINDOW)
        assert all(getattr(r, "queued", False) for r in results), results[:1]
        assert len(client.fetch("bench", BATCH).groups) == BATCH
        version += 1
        client.report_version(version)
        done += BATCH
    elapsed = time.perf_counter() - t0
    client.close()
    return elapsed


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=20_000, help="groups per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--raw-server", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        raw_server(args.raw_server)
        return
    n_groups = (args.groups + BATCH - 1) // BATCH * BATCH
    groups = make_groups(16, args.samples, args.tokens)
    payloads = [encode_message(Submit(lease_id=1, group=Group(prompt_id="p0", prompt_tokens=g.prompt_tokens,
                                                              samples=g.samples))) for g in groups]
    msg_bytes = len(payloads[0])
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "question": "q", "answer": "a"}) + "\n"
                                   for i in range(1024)))
        raw_times, buffer_times = [], []
        for _ in range(args.rounds):
            endpoint_file = Path(tmp) / "raw_endpoint"
            endpoint_file.unlink(missing_ok=True)
            raw = subprocess.Popen([sys.executable, __file__, "--raw-server", str(endpoint_file)], cwd=REPO)
            while not endpoint_file.exists() or not endpoint_file.read_text():
                time.sleep(0.05)
            raw_times.append(run_raw(endpoint_file.read_text(), payloads, n_groups))
            raw.wait(30)
            proc, address = start_buffer(prompts)
            try:
                buffer_times.append(run_buffer(address, groups, n_groups))
            finally:
                proc.terminate()
                proc.wait(30)
    report(n_groups, msg_bytes, raw_times, buffer_times, args)


def report(n_groups: int, msg_bytes: int, raw_times: list[float], buffer_times: list[float],
           args: argparse.Namespace) -> None:
    raw_rate = n_groups / statistics.median(raw_times)
    buffer_rate = n_groups / statistics.median(buffer_times)
    result = {
        "groups_per_round": n_groups, "samples": args.samples, "tokens": args.tokens,
        "submit_message_bytes": msg_bytes,
        "buffer_groups_per_s": round(buffer_rate), "buffer_MB_per_s": round(buffer_rate * msg_bytes / 1e6, 1),
        "raw_groups_per_s": round(raw_rate), "raw_MB_per_s": round(raw_rate * msg_bytes / 1e6, 1),
        "buffer_over_raw": round(buffer_rate / raw_rate, 3),
        "buffer_rounds_groups_per_s": [round(n_groups / t) for t in buffer_times],
        "raw_rounds_groups_per_s": [round(n_groups / t) for t in raw_times],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"group: {args.samples} samples x {args.tokens} tokens, submit message {msg_bytes} bytes; "
          f"{n_groups} groups per round, median of {len(raw_times)} rounds")
    print(f"  buffer (lease -> submit -> fetch): {result['buffer_groups_per_s']:>7} groups/s "
          f"{result['buffer_MB_per_s']:>7} MB/s   rounds {result['buffer_rounds_groups_per_s']}")
    print(f"  raw pyzmq + msgpack             : {result['raw_groups_per_s']:>7} groups/s "
          f"{result['raw_MB_per_s']:>7} MB/s   rounds {result['raw_rounds_groups_per_s']}")
    print(f"  buffer / raw = {result['buffer_over_raw']:.2f}   (targets: >= 0.5 and >= 5000 groups/s)")


if __name__ == "__main__":
    main()
