"""Key and address policy: what an account may register, checked the same way everywhere.

The integration requires a 4096-bit key per folder and at most four single static public
addresses (no ranges). The server re-checks keys at login with :func:`key_refusal` so a key
that got into the registry some other way is still refused.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import asyncssh

from ingest_core.errors import Refused
from ingest_core.settings import KeyPolicySettings

ACCOUNT_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")

_PRIVATE_MARKERS = ("PRIVATE KEY", "PuTTY-User-Key-File", "BEGIN OPENSSH PRIVATE")
# A key line with authorized_keys options before it: "from=..., no-pty ssh-rsa AAAA...".
_KEY_AFTER_OPTIONS = re.compile(r"[\s,](ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) AAAA")


@dataclass(frozen=True)
class ParsedKey:
    key_type: str
    bits: int
    fingerprint: str
    comment: str
    openssh: str  # "type base64 comment", the normalized one-line form we store


def check_account_name(name: str) -> str:
    if not ACCOUNT_NAME.match(name):
        raise Refused(
            f"account name {name!r} is not valid: use 1-32 lowercase letters, digits, '_' or '-'"
        )
    return name


def accepted_keys_text(policy: KeyPolicySettings) -> str:
    text = f"RSA keys of at least {policy.min_rsa_bits} bits"
    return text + (" or Ed25519 keys" if policy.accept_ed25519 else "")


def key_bits(key: asyncssh.SSHKey) -> int:
    pyca = getattr(key, "pyca_key", None)
    size = getattr(pyca, "key_size", None)
    if isinstance(size, int):
        return size
    return 256 if key.algorithm == b"ssh-ed25519" else 0


def key_refusal(key: asyncssh.SSHKey, policy: KeyPolicySettings) -> str | None:
    """Why ``key`` is not acceptable under ``policy``, or None if it is."""
    algorithm = key.algorithm.decode("ascii", "replace")
    accepted = accepted_keys_text(policy)
    if algorithm == "ssh-rsa":
        bits = key_bits(key)
        if bits < policy.min_rsa_bits:
            return f"RSA key is {bits} bits, below the minimum; accepted: {accepted}"
        return None
    if algorithm == "ssh-ed25519":
        return (
            None if policy.accept_ed25519 else f"Ed25519 keys are not enabled; accepted: {accepted}"
        )
    if algorithm == "ssh-dss":
        return f"DSA keys are obsolete and refused; accepted: {accepted}"
    if "cert" in algorithm:
        return f"certificates ({algorithm}) are not accepted; accepted: {accepted}"
    return f"{algorithm} keys are not accepted; accepted: {accepted}"


def parse_public_key(text: str, policy: KeyPolicySettings) -> ParsedKey:
    """Parse one OpenSSH or RFC 4716 public key and apply the key policy.

    A private key pasted by mistake is refused without echoing any of it.
    """
    if any(marker in text for marker in _PRIVATE_MARKERS):
        raise Refused(
            "this is a PRIVATE key: it was not stored. Give the public key "
            "(the .pub file, one line starting with ssh-rsa) and keep the private key secret"
        )
    stripped = text.strip()
    if not stripped:
        raise Refused("no public key given: expected one line such as 'ssh-rsa AAAA... comment'")
    if "BEGIN SSH2 PUBLIC KEY" not in stripped:
        lines = [ln for ln in stripped.splitlines() if ln.strip() and not ln.startswith("#")]
        if len(lines) > 1:
            raise Refused(f"{len(lines)} keys given: add one public key at a time")
        has_options = lines and not lines[0].startswith(("ssh-", "ecdsa-", "sk-"))
        if has_options and _KEY_AFTER_OPTIONS.search(lines[0]):
            raise Refused(
                "authorized_keys options are not accepted: give the bare key line "
                "starting with ssh-rsa"
            )
    try:
        key = asyncssh.import_public_key(stripped)
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise Refused(
            "not a valid public key: expected one OpenSSH line such as 'ssh-rsa AAAA... comment' "
            "or an RFC 4716 (PuTTYgen) public key block"
        ) from None
    refusal = key_refusal(key, policy)
    if refusal:
        raise Refused(refusal)
    comment = (key.get_comment() or "").strip()
    key.set_comment(None)
    body = key.export_public_key("openssh").decode("ascii").strip()
    return ParsedKey(
        key_type=key.algorithm.decode("ascii"),
        bits=key_bits(key),
        fingerprint=key.get_fingerprint("sha256"),
        comment=comment,
        openssh=f"{body} {comment}".strip(),
    )


@dataclass(frozen=True)
class ParsedAddress:
    address: str  # normalized, compressed form
    warning: str | None


def parse_address(text: str) -> ParsedAddress:
    """One single IPv4 or IPv6 address; ranges, wildcards and host names are refused."""
    raw = text.strip()
    accepted = "accepted: one single IPv4 or IPv6 address such as 203.0.113.7 or 2001:db8::7"
    if not raw:
        raise Refused(f"no address given; {accepted}")
    if "*" in raw or _is_hyphen_range(raw):
        raise Refused(f"{raw!r} is a range: ranges are not allowed; {accepted}")
    if "%" in raw:
        raise Refused(f"{raw!r} has a zone index: give the address without %zone; {accepted}")
    if "/" in raw:
        try:
            net = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise Refused(f"{raw!r} is not an IP address; {accepted}") from None
        if net.num_addresses != 1:
            raise Refused(f"{raw!r} is a range (CIDR): ranges are not allowed; {accepted}")
        ip = net.network_address
    else:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            raise Refused(
                f"{raw!r} is not an IP address (host names are not accepted); {accepted}"
            ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        raise Refused(f"{raw!r} is not a single host address; {accepted}")
    return ParsedAddress(address=str(ip), warning=address_warning(ip))


_RANGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a documentation address (a range for examples, which no real client has)",
     ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")),
    ("a private address (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or IPv6 fc00::/7)",
     ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
    ("a carrier-grade NAT address (100.64.0.0/10), shared by many customers",
     ("100.64.0.0/10",)),
    ("a benchmarking address (198.18.0.0/15)", ("198.18.0.0/15",)),
)  # fmt: skip
_NETWORKS = [(what, [ipaddress.ip_network(n) for n in nets]) for what, nets in _RANGES]
PUBLIC_RULE = "the integration requires each client's static public addresses"


def address_warning(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a static public one (by the range it is in), or None."""
    if ip.is_loopback:
        return f"{ip} is a loopback address: fine for a local trial; {PUBLIC_RULE}"
    if ip.is_link_local:
        return f"{ip} is a link-local address; {PUBLIC_RULE}"
    for what, networks in _NETWORKS:
        if any(ip.version == net.version and ip in net for net in networks):
            return f"{ip} is {what}; {PUBLIC_RULE}"
    if not ip.is_global:
        return f"{ip} is a reserved address, not a public one; {PUBLIC_RULE}"
    return None


def _is_hyphen_range(raw: str) -> bool:
    left, sep, _right = raw.partition("-")
    if not sep:
        return False
    try:
        ipaddress.ip_address(left.strip())
    except ValueError:
        return False
    return True


def normalize_peer_address(address: str) -> str:
    """The registry's form of a socket peer address (IPv4-mapped IPv6 becomes IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)
