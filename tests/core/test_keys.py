"""Client key policy, with real keys from ssh-keygen, through the real CLI and the registry."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest_core.errors import NotFound
from ingest_core.registry import Registry
from ingest_core.settings import Settings

Run = Callable[..., subprocess.CompletedProcess[str]]


def snapshot(ingestctl: Run) -> tuple[str, str]:
    """Everything a refused change must leave as it was: accounts and the audit trail."""
    accounts = ingestctl("account", "list", "--json", check=True).stdout
    audit = ingestctl("audit", "--json", check=True).stdout
    return accounts, audit


@pytest.fixture
def account(ingestctl: Run) -> str:
    ingestctl("account", "create", "uni_a", "--institution", "University A", check=True)
    return "uni_a"


# RSA 8192 takes ssh-keygen 10-70 s to make on 2 busy cores, so its PUBLIC half was made
# once with ssh-keygen and is checked in (a public key is not a secret; no private key is).
RSA_8192_PUB = Path(__file__).resolve().parent.parent / "fixtures" / "rsa8192.pub"


def test_rsa_4096_and_8192_are_accepted_with_ssh_keygen_fingerprint(
    ingestctl: Run, account: str, make_key: Callable[..., Path]
) -> None:
    for bits, pub in ((4096, Path(f"{make_key('rsa', 4096)}.pub")), (8192, RSA_8192_PUB)):
        added = ingestctl("key", "add", account, str(pub), "--json", check=True)
        key = json.loads(added.stdout)
        expected = subprocess.run(
            ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert key["bits"] == bits == int(expected[0])
        assert key["fingerprint"] == expected[1]
        assert key["key_type"] == "ssh-rsa"
    listed = json.loads(ingestctl("key", "list", account, "--json", check=True).stdout)
    assert [k["bits"] for k in listed] == [4096, 8192]


@pytest.mark.parametrize(
    ("key_type", "bits", "expected"),
    [
        ("rsa", 2048, "RSA key is 2048 bits, below the minimum"),
        ("rsa", 3072, "RSA key is 3072 bits, below the minimum"),
        ("ed25519", 256, "Ed25519 keys are not enabled"),
        ("ecdsa", 256, "ecdsa-sha2-nistp256 keys are not accepted"),
        ("dsa", 1024, "DSA keys are obsolete and refused"),
    ],
)
def test_keys_outside_the_policy_are_refused_and_nothing_changes(
    ingestctl: Run,
    account: str,
    make_key: Callable[..., Path],
    key_type: str,
    bits: int,
    expected: str,
) -> None:
    try:
        pub = Path(f"{make_key(key_type, bits)}.pub")
    except subprocess.CalledProcessError:
        pytest.skip(f"this ssh-keygen cannot make {key_type} keys any more")
    before = snapshot(ingestctl)
    result = ingestctl("key", "add", account, str(pub))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "accepted: RSA keys of at least 4096 bits" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert snapshot(ingestctl) == before


def test_ed25519_is_accepted_when_the_policy_switch_is_on(
    make_settings: Callable[..., Settings], make_key: Callable[..., Path]
) -> None:
    registry = Registry(make_settings(keys={"accept_ed25519": True}))
    registry.create_account("uni_e")
    key = registry.add_key("uni_e", Path(f"{make_key('ed25519', 256)}.pub").read_text())
    assert key.key_type == "ssh-ed25519"


def test_pasted_private_key_is_refused_without_echo(
    ingestctl: Run, account: str, make_key: Callable[..., Path]
) -> None:
    private = make_key("rsa", 4096).read_text()
    before = snapshot(ingestctl)
    result = ingestctl("key", "add", account, "-", input=private, subprocess_=True)
    assert result.returncode == 1
    assert "PRIVATE key" in result.stderr and "not stored" in result.stderr
    body_lines = [ln for ln in private.splitlines() if "-----" not in ln]
    assert not any(ln[:20] in result.stderr + result.stdout for ln in body_lines)
    assert snapshot(ingestctl) == before


def test_malformed_keys_are_refused(ingestctl: Run, account: str) -> None:
    for text in ("ssh-rsa not-base64!!! me", "hello world", "", "ssh-rsa AAAAB3NzaC1yc2E= x"):
        result = ingestctl("key", "add", account, "-", input=text)
        assert result.returncode == 1, text
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "options" not in result.stderr, text  # plain text is not a key with options
    missing = ingestctl("key", "add", account, "/nonexistent/key.pub")
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_options_and_several_keys_are_refused(
    ingestctl: Run, account: str, make_key: Callable[..., Path]
) -> None:
    line = Path(f"{make_key('rsa', 4096)}.pub").read_text().strip()
    with_options = ingestctl("key", "add", account, "-", input=f'from="1.2.3.4" {line}\n')
    assert with_options.returncode == 1 and "options are not accepted" in with_options.stderr
    two = ingestctl("key", "add", account, "-", input=f"{line}\n{line}\n")
    assert two.returncode == 1 and "add one public key at a time" in two.stderr


def test_putty_rfc4716_public_key_is_accepted(
    ingestctl: Run, account: str, make_key: Callable[..., Path]
) -> None:
    pub = Path(f"{make_key('rsa', 4096)}.pub")
    rfc4716 = subprocess.run(
        ["ssh-keygen", "-e", "-f", str(pub)], capture_output=True, text=True, check=True
    ).stdout
    assert "BEGIN SSH2 PUBLIC KEY" in rfc4716
    key = json.loads(
        ingestctl("key", "add", account, "-", "--json", input=rfc4716, check=True).stdout
    )
    assert (
        key["fingerprint"]
        in subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True).stdout
    )


def test_a_key_belongs_to_one_account(
    ingestctl: Run, account: str, make_key: Callable[..., Path]
) -> None:
    pub = str(Path(f"{make_key('rsa', 4096)}.pub"))
    ingestctl("account", "create", "uni_b", check=True)
    ingestctl("key", "add", account, pub, check=True)
    before = snapshot(ingestctl)
    other = ingestctl("key", "add", "uni_b", pub)
    assert other.returncode == 1 and "already registered to another account" in other.stderr
    same = ingestctl("key", "add", account, pub)
    assert same.returncode == 1 and "already registered to this account" in same.stderr
    assert "nothing to add" in same.stderr and "its own key pair" not in same.stderr
    assert snapshot(ingestctl) == before


def test_key_remove_by_fingerprint(
    ingestctl: Run, account: str, make_key: Callable[..., Path]
) -> None:
    pub = Path(f"{make_key('rsa', 4096)}.pub")
    fp = json.loads(ingestctl("key", "add", account, str(pub), "--json", check=True).stdout)[
        "fingerprint"
    ]
    wrong = ingestctl("key", "remove", account, "SHA256:doesnotexist")
    assert wrong.returncode == 1 and "has no key" in wrong.stderr
    ingestctl("key", "remove", account, fp, check=True)
    assert json.loads(ingestctl("key", "list", account, "--json", check=True).stdout) == []
    actions = [e["action"] for e in json.loads(ingestctl("audit", account, "--json").stdout)]
    assert actions == ["account.create", "key.add", "key.remove"]


def test_unknown_account_is_named(settings: Settings, make_key: Callable[..., Path]) -> None:
    text = Path(f"{make_key('rsa', 4096)}.pub").read_text()
    with pytest.raises(NotFound, match="no account named 'nobody'"):
        Registry(settings).add_key("nobody", text)
