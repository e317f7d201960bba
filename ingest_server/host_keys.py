"""The server's host keys: ed25519 and RSA 4096, made once, mode 0600, never overwritten."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh

HOST_KEY_FILES = {"ssh-ed25519": "ssh_host_ed25519_key", "ssh-rsa": "ssh_host_rsa_key"}
RSA_HOST_KEY_BITS = 4096
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644  # public, like OpenSSH's ssh_host_*_key.pub


@dataclass(frozen=True)
class HostKeyInfo:
    path: Path
    algorithm: str
    bits: int
    fingerprint: str
    public_line: str
    created: bool


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """A new key file with exactly ``mode``, whatever the caller's umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def ensure_host_keys(key_dir: Path) -> list[HostKeyInfo]:
    """Generate whichever host keys are missing; an existing key is never replaced."""
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    infos = []
    for algorithm, file_name in HOST_KEY_FILES.items():
        path = key_dir / file_name
        created = False
        if not path.exists():
            if algorithm == "ssh-rsa":
                key = asyncssh.generate_private_key(algorithm, key_size=RSA_HOST_KEY_BITS)
            else:
                key = asyncssh.generate_private_key(algorithm)
            try:
                _write_new(path, key.export_private_key("openssh"), PRIVATE_KEY_MODE)
                Path(f"{path}.pub").unlink(missing_ok=True)  # a leftover of a removed key
                _write_new(Path(f"{path}.pub"), key.export_public_key("openssh"), PUBLIC_KEY_MODE)
                created = True
            except FileExistsError:
                pass  # another process made it first: keep theirs
        infos.append(describe_host_key(path, created))
    return infos


def describe_host_key(path: Path, created: bool = False) -> HostKeyInfo:
    key = asyncssh.read_private_key(path)
    pyca = getattr(key, "pyca_key", None)
    bits = getattr(pyca, "key_size", 256)
    return HostKeyInfo(
        path=path,
        algorithm=key.algorithm.decode(),
        bits=int(bits),
        fingerprint=key.get_fingerprint("sha256"),
        public_line=key.export_public_key("openssh").decode().strip(),
        created=created,
    )


def load_host_keys(key_dir: Path) -> list[asyncssh.SSHKey]:
    """Parsed key objects, read once at start (re-reading per connection costs ~300 ms)."""
    missing = [n for n in HOST_KEY_FILES.values() if not (key_dir / n).exists()]
    if len(missing) == len(HOST_KEY_FILES):
        raise FileNotFoundError(f"no host keys in {key_dir}: run 'ingestctl init' first")
    return [
        asyncssh.read_private_key(key_dir / n)
        for n in HOST_KEY_FILES.values()
        if (key_dir / n).exists()
    ]


def known_hosts_lines(key_dir: Path, hostname: str, port: int) -> list[str]:
    host = hostname if port == 22 else f"[{hostname}]:{port}"
    return [
        f"{host} {describe_host_key(key_dir / n).public_line}"
        for n in HOST_KEY_FILES.values()
        if (key_dir / n).exists()
    ]
