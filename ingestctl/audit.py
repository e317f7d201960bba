"""ingestctl audit [NAME]: the registry's change trail (who, when, what)."""

from __future__ import annotations

import argparse
import json

from ingest_core.console import local_time, print_json, print_table, with_local_times


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="list registry changes: who, when, what",
        description="Every change made with ingestctl, oldest first.",
    )
    p.add_argument("name", nargs="?", help="only this account's changes")
    p.add_argument("--limit", type=int, default=200, help="newest N events (default 200)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    events = ctx.registry.audit_trail(args.name, args.limit)
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(events, zone, ["at"]))
        return 0
    print_table(
        [
            (
                local_time(e.at, zone),
                e.actor,
                e.account or "-",
                e.action,
                json.dumps(e.detail, sort_keys=True),
            )
            for e in events
        ],
        ["when", "who", "account", "action", "detail"],
        empty="no changes recorded",
    )
    return 0
