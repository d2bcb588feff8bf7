"""`common.processes.free_port`: the ports run_async and the tests hand to buffers, weight groups and servers."""

import socket

from common import processes
from common.processes import ephemeral_port_range, free_port


def test_free_ports_lie_outside_the_ephemeral_range_are_distinct_and_bindable():
    """A port from the ephemeral range can be taken by any outgoing connection or `bind(0)` before its owner binds
    it (a gloo group forming in the same process did: "Address already in use" on the weight-sync control socket);
    a port below the range only by an explicit bind."""
    low, high = ephemeral_port_range()
    ports = [free_port() for _ in range(50)]
    assert not [port for port in ports if low <= port <= high]
    assert len(set(ports)) == len(ports)
    held = []
    try:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", port))
    finally:
        for sock in held:
            sock.close()


def test_a_bound_port_is_skipped(monkeypatch):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        # Every candidate drawn is the bound port until the 200 draws are spent: the pick falls back to bind(0).
        monkeypatch.setattr(processes.random.SystemRandom, "choice", lambda self, seq: port)
        got = free_port()
        assert got != port
    finally:
        taken.close()


def test_the_range_is_read_from_the_kernel_and_a_low_range_sends_picks_above_it(tmp_path, monkeypatch):
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("1024\t40000\n")
    monkeypatch.setattr(processes, "_EPHEMERAL_RANGE_FILE", range_file)
    assert ephemeral_port_range() == (1024, 40000)
    assert all(40000 < free_port() <= 65535 for _ in range(20))
    range_file.write_text("not a range")
    assert ephemeral_port_range() == (32768, 60999)
