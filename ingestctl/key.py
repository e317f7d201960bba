"""ingestctl key ...: an account's client public keys."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ingest_core.console import local_time, print_escaped, print_json, print_table, with_local_times
from ingest_core.errors import Refused
from ingest_core.key_age import expiry_text

MAX_KEY_FILE_BYTES = 64 * 1024
KEY_TIMES = ("added_at", "expires_at")


def read_key_text(source: str) -> str:
    if source == "-":
        return sys.stdin.read(MAX_KEY_FILE_BYTES)
    path = Path(source)
    if not path.is_file():
        raise Refused(f"{source}: no such file (give the .pub file, or - for standard input)")
    if path.stat().st_size > MAX_KEY_FILE_BYTES:
        raise Refused(f"{source}: too large to be a public key (a key file is one line)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Refused(f"{source}: not a text file; expected an OpenSSH public key line") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "key",
        help="add, list, remove an account's public keys",
        description="Client public keys. Accepted by default: RSA of at least "
        "4096 bits (settings: [keys] min_rsa_bits, accept_ed25519).",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = nouns.add_parser("add", help="register a public key (OpenSSH line or PuTTYgen block)")
    a.add_argument("name")
    a.add_argument("file", help="the .pub file, or - to read standard input")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=add)
    ls = nouns.add_parser(
        "list",
        help="list an account's keys, their age and expiry",
        description="An account's keys: type, size, fingerprint, comment, when added, age in "
        "days and expiry date ([keys] max_age_days; 'never' when keys do not expire).",
    )
    ls.add_argument("name")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=list_)
    r = nouns.add_parser("remove", help="remove a key by its SHA256 fingerprint")
    r.add_argument("name")
    r.add_argument("fingerprint", help="as 'ingestctl key list' shows it: SHA256:...")
    r.set_defaults(func=remove)


def add(args: argparse.Namespace, ctx) -> int:
    key = ctx.registry.add_key(args.name, read_key_text(args.file))
    if args.json:
        print_json(with_local_times(key, ctx.settings.zone, KEY_TIMES))
    else:
        print_escaped(f"added {key.key_type} {key.bits}-bit key {key.fingerprint} to {args.name}")
    return 0


def list_(args: argparse.Namespace, ctx) -> int:
    keys = ctx.registry.list_keys(args.name)
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(keys, zone, KEY_TIMES))
        return 0
    print_table(
        [
            (
                k.key_type,
                k.bits,
                k.fingerprint,
                k.comment,
                local_time(k.added_at, zone),
                f"{k.age_days}d",
                expiry_text(k.expires_at, k.expiry, zone),
            )
            for k in keys
        ],
        ["type", "bits", "fingerprint", "comment", "added", "age", "expires"],
        empty=f"{args.name} has no keys (ingestctl key add {args.name} FILE.pub)",
    )
    return 0


def remove(args: argparse.Namespace, ctx) -> int:
    key = ctx.registry.remove_key(args.name, args.fingerprint)
    print_escaped(f"removed key {key.fingerprint} from {args.name}")
    return 0
