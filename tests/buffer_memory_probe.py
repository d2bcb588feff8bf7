"""Memory probe (not a pytest module): resident-set growth of a buffer process (`python -m buffer.server`) after N
lease requests and N registrations, each from a unique client id, over one pipelined loopback DEALER.

    .venv/bin/python tests/buffer_memory_probe.py 100000

Prints the growth in MB of each phase and the buffer's eviction counters (docs/BENCHMARKS.md, "Faults and bad
input"). Linux only (reads /proc/<pid>/status).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.schemas import LeaseRequest, Register, StatsRequest, decode_message, encode_message  # noqa: E402


def rss_mb(pid: int) -> float:
    line = next(row for row in open(f"/proc/{pid}/status") if row.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def burst(sock: zmq.Socket, messages: list[bytes], window: int = 1000) -> None:
    for start in range(0, len(messages), window):
        chunk = messages[start:start + window]
        for payload in chunk:
            sock.send_multipart([b"", payload])
        for _ in chunk:
            sock.recv_multipart()


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "question": "q", "answer": "a"}) + "\n"
                                   for i in range(64)))
        proc = subprocess.Popen([sys.executable, "-m", "buffer.server", "--preset", "tiny", "--prompts-jsonl",
                                 str(prompts), "--buffer.address", "tcp://127.0.0.1:0", "--run.wandb-mode",
                                 "disabled", "--task.eval-size", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            address = proc.stdout.readline().split()[3]
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            burst(sock, [encode_message(StatsRequest())])
            start, t0 = rss_mb(proc.pid), time.monotonic()
            burst(sock, [encode_message(LeaseRequest(actor_id=f"actor-{i:08d}", max_prompts=1, request_id=i + 1))
                         for i in range(n)])
            after_leases = rss_mb(proc.pid)
            burst(sock, [encode_message(Register(role="actor", client_id=f"client-{i:08d}")) for i in range(n)])
            after_registers = rss_mb(proc.pid)
            sock.send_multipart([b"", encode_message(StatsRequest())])
            stats = decode_message(sock.recv_multipart()[-1], "reply").counters
            print(f"{n} unique-id leases: +{after_leases - start:.1f} MB; {n} unique-id registers: "
                  f"+{after_registers - after_leases:.1f} MB; {time.monotonic() - t0:.1f} s; replay_evictions "
                  f"{stats.get('replay_evictions')}, clients_evicted {stats.get('clients_evicted')}")
            sock.close(0)
        finally:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
