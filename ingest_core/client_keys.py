"""Client key pairs for institutions (``ingestctl keygen``, ``ingest-push key generate``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ingest_core.errors import Refused

CLIENT_RSA_BITS = 4096


@dataclass(frozen=True)
class ClientKeyPair:
    private_path: Path
    public_path: Path
    public_line: str
    fingerprint: str


def generate_client_keypair(
    path: Path, comment: str = "", passphrase: str | None = None, overwrite: bool = False
) -> ClientKeyPair:
    """Write a 4096-bit RSA key pair in OpenSSH format: PATH (0600) and PATH.pub."""
    public_path = Path(f"{path}.pub")
    if not overwrite and (path.exists() or public_path.exists()):
        raise Refused(f"{path} already exists: choose a new path (keys are never overwritten)")
    if not path.parent.is_dir():
        raise Refused(f"folder {path.parent} does not exist: create it or choose another path")
    key = asyncssh.generate_private_key(
        "ssh-rsa", key_size=CLIENT_RSA_BITS, comment=comment or None
    )
    private = key.export_private_key("openssh", passphrase=passphrase or None)
    if overwrite:
        for old in (path, public_path):
            old.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    public_line = key.export_public_key("openssh").decode().strip()
    public_path.write_text(public_line + "\n", encoding="ascii")
    return ClientKeyPair(path, public_path, public_line, key.get_fingerprint("sha256"))
