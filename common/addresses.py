"""Endpoint helpers: parse `tcp://host:port` / `host:port` and give port-0 or busy loopback ports a free port."""

from __future__ import annotations

from common.config import Config, with_overrides
from common.processes import free_port, port_in_use

_LOOPBACK = ("127.0.0.1", "localhost")


def split_endpoint(address: str) -> tuple[str, str, int]:
    """'tcp://127.0.0.1:5555' -> ('tcp://', '127.0.0.1', 5555); '127.0.0.1:29555' -> ('', '127.0.0.1', 29555)."""
    scheme = ""
    if "://" in address:
        scheme, address = address.split("://", 1)
        scheme += "://"
    host, _, port = address.rpartition(":")
    return scheme, host, int(port)


def _resolved(address: str) -> str:
    scheme, host, port = split_endpoint(address)
    if port == 0 or (host in _LOOPBACK and port_in_use(host, port)):
        port = free_port()
    return f"{scheme}{host}:{port}"


def resolve_ports(cfg: Config) -> Config:
    """Replace port 0 (and busy loopback ports) in the buffer, weight-sync and control addresses."""
    if not cfg.buffer.address.startswith("tcp://"):
        buffer_address = cfg.buffer.address
    else:
        buffer_address = _resolved(cfg.buffer.address)
    return with_overrides(
        cfg,
        buffer={"address": buffer_address},
        learner={"sync_address": _resolved(cfg.learner.sync_address),
                 "sync_control_address": _resolved(cfg.learner.sync_control_address)},
    )


def connect_address(bind_address: str) -> str:
    """The address a client on this host uses for a bind address (0.0.0.0/* -> 127.0.0.1)."""
    scheme, host, port = split_endpoint(bind_address)
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    return f"{scheme}{host}:{port}"
