"""ingestctl defender list|unban: addresses banned after repeated failed logins."""

from __future__ import annotations

import argparse

from ingest_core.console import (
    local_time,
    print_escaped,
    print_json,
    print_table,
    with_local_times,
)
from ingest_server.defender import list_bans, unban


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "defender",
        help="list or lift brute-force bans",
        description="Source addresses banned by the server's brute-force defender. A banned "
        "address is dropped before the SSH banner until its ban ends or is lifted. Scores and "
        "bans are kept in the control DB: every node adds to one score per address and "
        "refuses the same bans.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = nouns.add_parser("list", help="bans in force now")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=list_)
    u = nouns.add_parser(
        "unban", help="lift the ban on one address and forget its failed logins (every node)"
    )
    u.add_argument("address")
    u.set_defaults(func=unban_)


def list_(args: argparse.Namespace, ctx) -> int:
    bans = list_bans(ctx.settings)
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(bans, zone, ["banned_at", "banned_until"]))
        return 0
    print_table(
        [
            (
                b.address,
                local_time(b.banned_at, zone),
                local_time(b.banned_until, zone),
                b.score,
                b.reason,
            )
            for b in bans
        ],
        ["address", "banned at", "until", "score", "reason"],
        empty="no address is banned",
    )
    return 0


def unban_(args: argparse.Namespace, ctx) -> int:
    address = unban(ctx.settings, args.address)
    ctx.registry.record(None, "defender.unban", address=address)
    print_escaped(f"{address} is no longer banned")
    return 0
