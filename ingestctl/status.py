"""ingestctl status [NAME...] [--json] [--check]: every feed at a glance, worst first."""

from __future__ import annotations

import argparse

from ingest_core.console import local_time, print_json, print_table, with_local_times
from ingest_core.key_age import expiry_text
from loader.feed_status import TIME_FIELDS, feed_status

COLUMNS = (
    "account",
    "spec",
    "state",
    "last upload",
    "from",
    "last load",
    "rows",
    "changes",
    "missed",
    "last error",
    "waiting",
    "key age",
    "key expires",
)
ERROR_WIDTH = 100  # the table shows the start of the error; --json has all of it


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="every account's feeds at a glance: late, failing, never loaded, ok",
        description="One row per account and approved file, worst first: its state (failing, "
        "key expired, late, key expires soon, never loaded, ok, disabled), the last upload "
        "(when, from where), the last load (when, rows, what it changed), runs missed in a "
        "row, the last error, files waiting in the folder and the age and expiry of the "
        "account's oldest key. Read from the shared databases: the same on every node.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="only these accounts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a feed is late or failing or a key expired (for cron)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    rows = feed_status(ctx.settings, args.names)
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(rows, zone, TIME_FIELDS))
    else:
        print_table(
            [
                (
                    r.account,
                    r.spec or "-",
                    r.state,
                    local_time(r.last_upload, zone),
                    r.last_upload_address,
                    local_time(r.last_load, zone),
                    r.last_load_rows,
                    r.last_load_changes,
                    r.runs_missed,
                    _short(r.last_error),
                    r.files_waiting,
                    "" if r.oldest_key_age_days is None else f"{r.oldest_key_age_days}d",
                    ""
                    if r.oldest_key_expiry is None
                    else expiry_text(r.oldest_key_expires, r.oldest_key_expiry, zone),
                )
                for r in rows
            ],
            COLUMNS,
            empty="no accounts (ingestctl account create NAME)",
        )
    return 1 if args.check and any(r.needs_attention for r in rows) else 0


def _short(text: str) -> str:
    return text if len(text) <= ERROR_WIDTH else text[: ERROR_WIDTH - 1] + "…"
