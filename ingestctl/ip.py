"""ingestctl ip ...: an account's allowed client addresses (at most four, no ranges)."""

from __future__ import annotations

import argparse

from ingest_core.console import print_escaped, print_json, print_table, warn


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ip",
        help="add, list, remove an account's allowed addresses",
        description="Allowed client addresses: single IPv4/IPv6 addresses, at "
        "most four per account (settings: [ips] max_per_account); no ranges.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = nouns.add_parser("add", help="allow one address")
    a.add_argument("name")
    a.add_argument("address")
    a.set_defaults(func=add)
    r = nouns.add_parser("remove", help="remove an allowed address")
    r.add_argument("name")
    r.add_argument("address")
    r.set_defaults(func=remove)
    ls = nouns.add_parser("list", help="list allowed addresses")
    ls.add_argument("name")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=list_)


def add(args: argparse.Namespace, ctx) -> int:
    address, warning = ctx.registry.add_ip(args.name, args.address)
    if warning:
        warn(warning)
    print_escaped(f"allowed {address} for {args.name}")
    return 0


def remove(args: argparse.Namespace, ctx) -> int:
    address = ctx.registry.remove_ip(args.name, args.address)
    print_escaped(f"removed {address} from {args.name}")
    return 0


def list_(args: argparse.Namespace, ctx) -> int:
    ips = ctx.registry.list_ips(args.name)
    if args.json:
        print_json(ips)
        return 0
    limit = ctx.settings.ips.max_per_account
    print_table(
        [(ip,) for ip in ips],
        ["address"],
        empty=f"{args.name} has no allowed addresses (no client can connect)",
    )
    print_escaped(f"({len(ips)} of {limit} allowed)")
    return 0
