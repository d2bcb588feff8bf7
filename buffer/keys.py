"""Generate ZeroMQ CURVE key pairs for a multi-node buffer.

    python -m buffer.keys runs/keys

writes runs/keys/server.key(_secret), runs/keys/client.key(_secret) and runs/keys/authorized/client.key, then prints
the settings to use: the buffer gets `--buffer.curve-secret-key-file runs/keys/server.key_secret
--buffer.curve-public-keys-dir runs/keys/authorized`; clients get the server's public key file and their own secret
key file (BufferClient(curve_server_public_key_file=..., curve_client_secret_key_file=...)). Copy the secret files
only to the machines that need them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import zmq.auth


def create_keys(directory: str | Path, clients: tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """Create the server pair and one pair per client name; authorise every client's public key."""
    root = Path(directory)
    authorized = root / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(str(root), "server")
    paths = {"server_public": Path(server_public), "server_secret": Path(server_secret), "authorized": authorized}
    for name in clients:
        public, secret = zmq.auth.create_certificates(str(root), name)
        shutil.copy(public, authorized / Path(public).name)
        paths[f"{name}_secret"] = Path(secret)
    for secret_file in [p for k, p in paths.items() if k.endswith("_secret")]:
        secret_file.chmod(0o600)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__)
        return 2
    paths = create_keys(args[0])
    print(f"buffer:  --buffer.curve-secret-key-file {paths['server_secret']} "
          f"--buffer.curve-public-keys-dir {paths['authorized']}")
    print(f"clients: curve_server_public_key_file={paths['server_public']} "
          f"curve_client_secret_key_file={paths['client_secret']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
