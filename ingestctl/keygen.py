"""ingestctl keygen: a 4096-bit RSA key pair for a client institution."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from ingest_core.client_keys import generate_client_keypair
from ingest_core.console import print_escaped, print_json
from ingest_core.errors import Refused


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen",
        help="make a 4096-bit RSA key pair for a client institution",
        description="Write PATH (private key, mode 0600, OpenSSH format) and "
        "PATH.pub. Give PATH.pub to the operator; keep PATH secret.",
    )
    p.add_argument("path", help="where to write the private key (PATH.pub gets the public key)")
    p.add_argument("--comment", default="", help="comment stored in the public key")
    p.add_argument(
        "--passphrase",
        action="store_true",
        help="prompt for a passphrase to encrypt the private key",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _ask_passphrase() -> str:
    if not sys.stdin.isatty():
        raise Refused("--passphrase needs a terminal to prompt on")
    first = getpass.getpass("passphrase: ")
    if first != getpass.getpass("again: "):
        raise Refused("the two passphrases differ: no key was written")
    return first


def run(args: argparse.Namespace, ctx) -> int:
    passphrase = _ask_passphrase() if args.passphrase else None
    if not args.json:
        print_escaped("generating a 4096-bit RSA key pair...", file=sys.stderr)
    pair = generate_client_keypair(Path(args.path), args.comment, passphrase)
    if args.json:
        print_json(
            {
                "private_key": str(pair.private_path),
                "public_key": str(pair.public_path),
                "fingerprint": pair.fingerprint,
                "public_line": pair.public_line,
            }
        )
        return 0
    print_escaped(pair.public_line)
    print_escaped(f"fingerprint: {pair.fingerprint}")
    print_escaped(f"private key: {pair.private_path} (mode 0600; keep it secret)")
    print_escaped(f"public key:  {pair.public_path} (give this to the sis-ingest operator)")
    return 0
