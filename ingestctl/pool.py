"""ingestctl pool ...: the pool file of active applicant IDs (deferred-fetch accounts)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ingest_core.console import (
    local_time,
    print_escaped,
    print_fields,
    print_json,
    with_local_times,
)

if TYPE_CHECKING:
    from loader.pool import PoolView


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pool",
        help="import applicant IDs, publish pool files, show a pool",
        description="Deferred-fetch accounts get a nightly pool file: one active applicant ID "
        "per line, no header, CRLF line ends.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    i = nouns.add_parser("import", help="replace an account's applicant IDs from a file")
    i.add_argument("name")
    i.add_argument("file", type=Path, help="one applicant ID per line")
    i.set_defaults(func=import_)

    pub = nouns.add_parser("publish", help="write pool files now (exit 1 if any failed)")
    pub.add_argument("names", nargs="*", metavar="NAME", help="default: every deferred-fetch one")
    pub.add_argument("--json", action="store_true", help="machine-readable output")
    pub.set_defaults(func=publish)

    s = nouns.add_parser("show", help="where an account's IDs come from and its pool file")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=show)


def import_(args: argparse.Namespace, ctx) -> int:
    from loader.pool import import_ids

    count = import_ids(ctx.settings, args.name, args.file)
    ctx.registry.record(args.name, "pool.import", file=str(args.file), count=count)
    print_escaped(f"imported {count:,} applicant IDs for {args.name}")
    return 0


def publish(args: argparse.Namespace, ctx) -> int:
    from loader.pool import publish_pools

    results = publish_pools(ctx.settings, args.names or None)
    if args.json:
        print_json(results)
    else:
        for r in results:
            if r.skipped:  # another node's publish (done or going on): nothing written here
                print_escaped(r.skipped)
                continue
            state = "published" if r.ok else "FAILED"
            print_escaped(f"{r.account}: {state}: {r.message}")
        if not results:
            print_escaped("no active deferred-fetch accounts")
    return 0 if all(r.ok for r in results) else 1


def show(args: argparse.Namespace, ctx) -> int:
    from loader.pool import show_pool

    view = show_pool(ctx.settings, args.name)
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(view, zone, ["imported_at", "published_at"]))
        return 0
    print_fields(
        [
            ("account", view.account),
            ("deferred fetch", "yes" if view.deferred_fetch else "no (no pool file is published)"),
            ("source", view.source),
            ("IDs in source", "-" if view.ids_in_source is None else f"{view.ids_in_source:,}"),
            ("IDs imported", _imported(view, ctx.settings.pool.source == "table", zone)),
            ("pool file", view.pool_file),
            ("published", local_time(view.published_at, zone) or "never"),
            ("IDs in file", "-" if view.ids_in_file is None else f"{view.ids_in_file:,}"),
        ]
    )
    return 0


def _imported(view: PoolView, from_table: bool, zone) -> str:
    if not from_table:
        return "- (the query is read at each publish)"
    return (
        local_time(view.imported_at, zone)
        or "never (publishing is refused until `ingestctl pool import`)"
    )
