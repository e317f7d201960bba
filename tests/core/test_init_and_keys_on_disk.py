"""init (folders, DB, host keys), hostkey show, and keygen for client institutions."""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

Run = Callable[..., subprocess.CompletedProcess[str]]


def ssh_keygen_fingerprint(path: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]


def test_init_is_idempotent_and_never_replaces_host_keys(ingestctl: Run, workdir: Path) -> None:
    first = json.loads(ingestctl("init", "--json", check=True).stdout)
    keys = {k["algorithm"]: k for k in first["host_keys"]}
    assert set(keys) == {"ssh-ed25519", "ssh-rsa"}
    assert keys["ssh-rsa"]["bits"] == 4096
    assert all(k["created"] for k in keys.values())
    for k in keys.values():
        path = Path(k["path"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert k["fingerprint"] == ssh_keygen_fingerprint(path)
    assert (workdir / "var" / "control.db").is_file()
    assert (workdir / "logs").is_dir()
    second = json.loads(ingestctl("init", "--json", check=True).stdout)
    assert [k["fingerprint"] for k in second["host_keys"]] == [
        k["fingerprint"] for k in first["host_keys"]
    ]
    assert not any(k["created"] for k in second["host_keys"])


def test_hostkey_show_and_known_hosts(ingestctl: Run, workdir: Path, tmp_path: Path) -> None:
    missing = ingestctl("hostkey", "show")
    assert missing.returncode == 1 and "run 'ingestctl init' first" in missing.stderr
    ingestctl("init", check=True)
    shown = json.loads(ingestctl("hostkey", "show", "--json", check=True).stdout)
    lines = ingestctl(
        "hostkey", "show", "--known-hosts", "sftp.example.edu", "--port", "22", check=True
    ).stdout.splitlines()
    assert len(lines) == 2 and all(ln.startswith("sftp.example.edu ") for ln in lines)
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(lines) + "\n")
    found = subprocess.run(
        ["ssh-keygen", "-lf", str(known)], capture_output=True, text=True, check=True
    ).stdout
    for key in shown:
        assert key["fingerprint"] in found
    bracketed = ingestctl("hostkey", "show", "--known-hosts", "h.example.edu", check=True).stdout
    assert bracketed.startswith("[h.example.edu]:")


def test_keygen_makes_a_4096_bit_pair_the_registry_accepts(ingestctl: Run, tmp_path: Path) -> None:
    target = tmp_path / "id_uni"
    out = json.loads(
        ingestctl("keygen", str(target), "--comment", "uni nightly", "--json", check=True).stdout
    )
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert out["fingerprint"] == ssh_keygen_fingerprint(target)
    assert (
        "4096"
        in subprocess.run(["ssh-keygen", "-lf", str(target)], capture_output=True, text=True).stdout
    )
    # ssh-keygen can read the private key: it is standard OpenSSH format
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(target)], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert derived == Path(f"{target}.pub").read_text().split()[:2]
    ingestctl("account", "create", "uni", check=True)
    ingestctl("key", "add", "uni", f"{target}.pub", check=True)
    again = ingestctl("keygen", str(target))
    assert again.returncode == 1 and "already exists" in again.stderr


def test_keygen_passphrase_encrypts_the_private_key(tmp_path: Path) -> None:
    from ingest_core.client_keys import generate_client_keypair

    pair = generate_client_keypair(tmp_path / "id_enc", "enc", passphrase="correct horse")
    wrong = subprocess.run(
        ["ssh-keygen", "-y", "-P", "wrong", "-f", str(pair.private_path)],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode != 0
    right = subprocess.run(
        ["ssh-keygen", "-y", "-P", "correct horse", "-f", str(pair.private_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert right.stdout.split()[:2] == pair.public_line.split()[:2]
