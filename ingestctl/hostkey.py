"""ingestctl hostkey show: what clients need to pin the server (fingerprints, known_hosts)."""

from __future__ import annotations

import argparse

from ingest_core.console import print_escaped, print_json, print_table
from ingest_core.errors import NotFound
from ingest_server.host_keys import HOST_KEY_FILES, describe_host_key, known_hosts_lines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hostkey",
        help="show the server's host key fingerprints",
        description="The server's host keys, for client institutions to verify.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = nouns.add_parser("show", help="fingerprints, or known_hosts lines with --known-hosts")
    s.add_argument(
        "--known-hosts",
        metavar="HOSTNAME",
        help="print ready-to-paste known_hosts lines for this host name",
    )
    s.add_argument("--port", type=int, help="port clients use (default: the listen port)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=show)


def show(args: argparse.Namespace, ctx) -> int:
    key_dir = ctx.settings.server.host_key_dir
    paths = [key_dir / n for n in HOST_KEY_FILES.values() if (key_dir / n).exists()]
    if not paths:
        raise NotFound(f"no host keys in {key_dir}: run 'ingestctl init' first")
    if args.known_hosts:
        port = args.port or ctx.settings.server.port
        lines = known_hosts_lines(key_dir, args.known_hosts, port)
        if args.json:
            print_json(lines)
        else:
            for line in lines:
                print_escaped(line)
        return 0
    infos = [describe_host_key(p) for p in paths]
    if args.json:
        print_json(
            [
                {
                    "algorithm": i.algorithm,
                    "bits": i.bits,
                    "fingerprint": i.fingerprint,
                    "public_key": i.public_line,
                }
                for i in infos
            ]
        )
        return 0
    print_table(
        [(i.algorithm, i.bits, i.fingerprint) for i in infos], ["type", "bits", "fingerprint"]
    )
    return 0
