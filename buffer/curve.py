"""CURVE for a buffer that other hosts can reach: which bind addresses need it, and keys for a run directory.

`run_async.py` calls `with_run_curve_keys(cfg, run_dir)` while preparing a run: when the buffer binds a non-loopback
address and no CURVE keys are configured (and `buffer.insecure` is not set), it writes a server key pair and one
client key pair into <run_dir>/curve/ and points the buffer.curve_* fields of the config at them, so every role of the
run (which reads config.json) speaks CURVE. Roles on other hosts need the run directory's `curve/` files at the same
paths (a shared file system, or a copy); the secret key files are mode 0600.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_local_address(address: str) -> bool:
    """Whether only this host can reach a bind address (loopback tcp, ipc, inproc)."""
    if not address.startswith("tcp://"):
        return True
    host = address[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def needs_generated_keys(buffer_cfg: Any) -> bool:
    return not (is_local_address(buffer_cfg.address) or buffer_cfg.curve_secret_key_file or buffer_cfg.insecure)


def with_run_curve_keys(cfg: Any, run_dir: Path) -> Any:
    """`cfg` with CURVE keys in <run_dir>/curve/ when its buffer is reachable from other hosts without them."""
    if not needs_generated_keys(cfg.buffer):
        return cfg
    from buffer.keys import create_keys
    from common.config import with_overrides

    directory = run_dir / "curve"
    if (directory / "server.key_secret").exists():  # a resumed run keeps its keys
        paths = {"server_public": directory / "server.key", "server_secret": directory / "server.key_secret",
                 "authorized": directory / "authorized", "client_secret": directory / "client.key_secret"}
    else:
        paths = create_keys(directory)
    return with_overrides(cfg, buffer={
        "curve_secret_key_file": str(paths["server_secret"]), "curve_public_keys_dir": str(paths["authorized"]),
        "curve_server_public_key_file": str(paths["server_public"]),
        "curve_client_secret_key_file": str(paths["client_secret"])})
