"""ingestctl activity NAME: an account's recent connections and received files."""

from __future__ import annotations

import argparse

from ingest_core.console import print_json, print_table
from ingest_server.activity import account_activity


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "activity",
        help="an account's recent logins and received files",
        description="What the server logged about one account: logins (and failed ones), "
        "files received (with size and SHA-256), downloads, renames, removals, session ends. "
        "This is how to confirm a client's test upload arrived.",
    )
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=50, help="newest N events (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    events = account_activity(ctx.settings.log_dir, args.name, args.limit)
    if args.json:
        print_json(events)
        return 0
    rows = []
    for e in events:
        detail = e.get("name") or e.get("reason") or e.get("fingerprint") or e.get("request") or ""
        if e.get("event") == "file.renamed":
            detail = f"{e.get('old_name')} -> {e.get('name')}"
        sha = (e.get("sha256") or "")[:16]
        rows.append((e.get("timestamp", ""), e.get("event"), e.get("address"), detail,
                     e.get("bytes", ""), sha))  # fmt: skip
    print_table(
        rows,
        ["when", "event", "address", "detail", "bytes", "sha256"],
        empty=f"no server activity logged for {args.name!r}",
    )
    return 0
