"""ingestctl loader ...: run the nightly load now, run the loader daemon, list past loads."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ingest_core.console import (
    local_time,
    print_escaped,
    print_json,
    print_table,
    with_local_times,
)
from ingest_core.file_names import escape_for_operator

if TYPE_CHECKING:
    from loader.nightly import AccountResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loader",
        help="run the nightly load now, run the loader daemon, list past loads",
        description="The nightly loader: validate each account's data file, load it into the "
        "SIS database, delete it, and write the result into the account's folder log.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    r = nouns.add_parser(
        "run",
        help="load now (exit 1 if any account failed; an account another run is loading, "
        "here or on another node, is one line and no failure)",
    )
    r.add_argument("names", nargs="*", metavar="NAME", help="accounts (default: every active one)")
    r.add_argument(
        "--force",
        action="store_true",
        help="load even if the row count dropped below loader.min_row_share of the last load "
        "(this run only; needs NAME; each load it lets through is audited and marked)",
    )
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=run, parser=r)

    d = nouns.add_parser(
        "daemon", help="run loads and pool publishes on schedule, and on-arrival pre-checks"
    )
    d.set_defaults(func=daemon)

    h = nouns.add_parser(
        "history", help="list recorded loads (the service's load history table), oldest first"
    )
    h.add_argument("name", nargs="?", help="only this account")
    h.add_argument("--limit", type=int, default=50, help="newest N loads (default 50)")
    h.add_argument("--json", action="store_true", help="machine-readable output")
    h.set_defaults(func=history)


class _ProgressBar:
    """One self-rewriting line on a terminal: accounts done, and rows of the current file."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.current = ""

    def _draw(self, extra: str) -> None:
        width = 24
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} accounts {extra}"[:200].ljust(79))
        sys.stderr.flush()

    def rows(self, account: str, file_name: str, rows: int) -> None:
        self._draw(escape_for_operator(f"{account}: {file_name} {rows:,} rows"))

    def account_done(self, _result: object) -> None:
        self.done += 1
        self._draw("")

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _audit_forced(ctx, result: AccountResult) -> None:
    """Audit each load --force let past the row-count guard, after the fact: the account,
    the file and the load (its id in the service's load history table), never a run that
    forced nothing."""
    for outcome in result.outcomes:
        if outcome.forced:
            ctx.registry.record(
                result.account,
                "loader.force",
                file=outcome.file_name,
                load_id=outcome.load_id,
                rows=outcome.rows,
                reason="loaded past the row-count guard (--force)",
            )


def run(args: argparse.Namespace, ctx) -> int:
    from loader.nightly import accounts_to_run, run_accounts

    if args.force and not args.names:
        args.parser.error(
            "--force needs the account name(s) it is for: it lets their loads past the "
            "row-count guard once"
        )
    names = accounts_to_run(ctx.settings, args.names or None)
    bar = _ProgressBar(len(names)) if sys.stderr.isatty() and not args.json else None

    def account_done(result: AccountResult) -> None:
        _audit_forced(ctx, result)
        if bar:
            bar.account_done(result)

    try:
        results = run_accounts(
            ctx.settings,
            names if args.names else None,
            force=args.force,
            progress=bar.rows if bar else None,
            on_account=account_done,
        )
    finally:
        if bar:
            bar.close()
    if args.force and not any(o.forced for r in results for o in r.outcomes):
        print_escaped(
            "ingestctl: --force changed nothing: no load was below the row-count guard "
            "(nothing was audited)",
            file=sys.stderr,
        )
    if args.json:
        print_json(
            [
                {
                    "account": r.account,
                    "ok": r.ok,
                    "busy": r.busy,
                    "skipped": r.skipped,
                    "crashed": r.crashed,
                    "outcomes": r.outcomes,
                }
                for r in results
            ]
        )
    else:
        for r in results:  # one line per file, under its account: readable at 2 a.m.
            if r.outcomes and not (r.busy or r.crashed):
                print_escaped(f"{r.account}:")
                for o in r.outcomes:
                    print_escaped(f"  {o.status} {o.file_name} {o.detail}")
            else:
                print_escaped(r.summary())
        if not results:
            print_escaped("no active accounts")
    return 0 if all(r.ok for r in results) else 1


def daemon(args: argparse.Namespace, ctx) -> int:
    from loader.daemon import run_forever

    run_forever(ctx.settings)
    return 0


def history(args: argparse.Namespace, ctx) -> int:
    import dataclasses

    from loader.sis_db import REFUSED, open_sis_db
    from loader.validate import without_values

    if args.name:
        ctx.registry.get_account(args.name)
    # Rows stored before messages were kept free of file values get '…' here too.
    loads = [
        dataclasses.replace(r, message=without_values(r.message)) if r.status == REFUSED else r
        for r in open_sis_db(ctx.settings.sis_db_url).loads(args.name, args.limit)
    ]
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(loads, zone, ["started", "finished"]))
        return 0
    print_table(
        [
            (
                local_time(r.started, zone),
                r.account,
                r.file_name or r.spec_file,
                r.status,
                "" if r.rows is None else f"{r.rows:,}",
                (r.sha256 or "")[:12],
                r.message,
            )
            for r in loads
        ],
        ["started", "account", "file", "status", "rows", "sha256", "message"],
        empty="no loads recorded",
    )
    return 0
