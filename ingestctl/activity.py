"""ingestctl activity NAME: an account's recent connections and received files."""

from __future__ import annotations

import argparse

from ingest_core.console import local_time, print_json, print_table, with_local_times
from ingest_server.activity import ACTIVITY_COLUMNS, account_activity, activity_row


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "activity",
        help="an account's recent logins and received files",
        description="What the servers recorded about one account in the control DB's "
        "journal, from every node: logins (and failed ones), files received (with size and "
        "SHA-256), downloads, renames, removals, session ends, each with the node that served "
        "it. This is how to confirm a client's test upload arrived.",
    )
    p.add_argument("name")
    p.add_argument(
        "--limit", type=_event_count, default=50, help="newest N events (default 50; 0: all)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _event_count(text: str) -> int:
    """--limit: a whole number, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of events (0 or more)")
    return int(text)


def run(args: argparse.Namespace, ctx) -> int:
    events = account_activity(ctx.settings, args.name, args.limit)
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(events, zone, ["timestamp"]))
        return 0
    rows = [activity_row(e) for e in events]
    print_table(
        [(local_time(when, zone), *rest) for when, *rest in rows],
        ACTIVITY_COLUMNS,
        empty=f"no activity recorded for {args.name!r}",
    )
    return 0
