"""ingestctl account ...: client accounts (one SSH folder each)."""

from __future__ import annotations

import argparse
import sys

from ingest_core.console import (
    local_time,
    print_escaped,
    print_fields,
    print_json,
    print_table,
    with_local_times,
)
from ingest_core.errors import Refused
from ingest_core.registry import AccountView
from ingestctl.serve import ingestctl_command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "account",
        help="create, list, show, enable, disable, delete accounts",
        description="Client accounts. The account name is the SSH user name.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = nouns.add_parser("create", help="create an account and its folder")
    c.add_argument("name", help="SSH user name: 1-32 of a-z 0-9 _ -")
    c.add_argument("--institution", help="the client institution's name")
    c.add_argument("--description", help="free text for operators")
    c.add_argument(
        "--deferred-fetch",
        action="store_true",
        help="publish a nightly pool file of active applicant IDs into the folder",
    )
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=create)

    ls = nouns.add_parser("list", help="list accounts")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=list_)

    s = nouns.add_parser("show", help="show one account with its keys and addresses")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=show)

    for action, helptext in (
        ("enable", "allow logins again"),
        ("disable", "refuse new logins (files and data are kept)"),
    ):
        e = nouns.add_parser(action, help=helptext)
        e.add_argument("name")
        e.set_defaults(func=set_status, status="active" if action == "enable" else "disabled")

    d = nouns.add_parser("delete", help="delete an account (its folder's files are kept)")
    d.add_argument("name")
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    d.add_argument("--purge", action="store_true", help="also delete the folder and its files")
    d.set_defaults(func=delete)


# Every time an account's JSON carries, shown in the configured zone.
ACCOUNT_TIMES = ("created_at", "updated_at", "added_at", "expires_at")


def _show(view: AccountView, zone) -> None:
    print_fields(
        [
            ("name", view.name),
            ("institution", view.institution),
            ("description", view.description),
            ("status", view.status),
            ("deferred fetch", "yes" if view.deferred_fetch else "no"),
            ("folder", view.folder),
            ("created", local_time(view.created_at, zone)),
            ("updated", local_time(view.updated_at, zone)),
            ("allowed IPs", ", ".join(view.ips) or "(none: no client can connect yet)"),
        ]
    )
    print_escaped()
    print_table(
        [
            (k.key_type, k.bits, k.fingerprint, k.comment, local_time(k.added_at, zone))
            for k in view.keys
        ],
        ["type", "bits", "fingerprint", "comment", "added"],
        empty="keys: (none: no client can log in yet)",
    )


def create(args: argparse.Namespace, ctx) -> int:
    view = ctx.registry.create_account(
        args.name, args.institution, args.description, args.deferred_fetch
    )
    if args.json:
        print_json(with_local_times(view, ctx.settings.zone, ACCOUNT_TIMES))
    else:
        me = ingestctl_command(ctx.config)  # as the operator runs it: works when pasted
        print_escaped(f"created account {view.name}; folder {view.folder}")
        print_escaped(f"next: {me} key add {view.name} FILE.pub; {me} ip add {view.name} ADDRESS")
        if view.deferred_fetch:
            print_escaped(
                f"and: {me} pool import {view.name} FILE (the applicant list; no pool "
                "file is published until it is imported)"
            )
    return 0


def list_(args: argparse.Namespace, ctx) -> int:
    views = ctx.registry.list_accounts()
    if args.json:
        print_json(with_local_times(views, ctx.settings.zone, ACCOUNT_TIMES))
        return 0
    print_table(
        [
            (
                v.name,
                v.status,
                v.institution,
                "yes" if v.deferred_fetch else "no",
                len(v.keys),
                len(v.ips),
            )
            for v in views
        ],
        ["name", "status", "institution", "deferred", "keys", "ips"],
        empty="no accounts yet (ingestctl account create NAME)",
    )
    return 0


def show(args: argparse.Namespace, ctx) -> int:
    view = ctx.registry.get_account(args.name)
    if args.json:
        print_json(with_local_times(view, ctx.settings.zone, ACCOUNT_TIMES))
    else:
        _show(view, ctx.settings.zone)
    return 0


def set_status(args: argparse.Namespace, ctx) -> int:
    view = ctx.registry.set_status(args.name, args.status)
    print_escaped(f"account {view.name} is {view.status}")
    return 0


def delete(args: argparse.Namespace, ctx) -> int:
    view = ctx.registry.get_account(args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            raise Refused(f"deleting {args.name!r} needs confirmation: add --yes")
        what = "and DELETE its folder and files" if args.purge else "(its folder's files are kept)"
        answer = input(f"delete account {args.name} {what}? type the account name: ")
        if answer.strip() != args.name:
            raise Refused("not confirmed: nothing was deleted")
    ctx.registry.delete_account(args.name, purge=args.purge)
    kept = "" if args.purge else f"; files kept in {view.folder}"
    print_escaped(f"deleted account {args.name}{kept}")
    return 0
