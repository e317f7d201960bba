"""ingestctl contact ...: the client institution's addresses that receive an account's alerts.

Contacts get the account's late-feed, resumed-feed and failed-load mails (with the words the
client's folder log has, never the operators' details); the operators ([smtp] recipients)
always get them too. Every change is audited.
"""

from __future__ import annotations

import argparse

from ingest_core.console import local_time, print_escaped, print_json, print_table, with_local_times


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "contact",
        help="add, list, remove the e-mail addresses that receive an account's alerts",
        description="An account's contacts: the client institution's IT people. They receive "
        "the account's alerts (late feed, feed resumed, failed load); the operators "
        "([smtp] recipients) always do too.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = nouns.add_parser("add", help="add a contact address")
    a.add_argument("name")
    a.add_argument("email")
    a.set_defaults(func=add)
    r = nouns.add_parser("remove", help="remove a contact address")
    r.add_argument("name")
    r.add_argument("email")
    r.set_defaults(func=remove)
    ls = nouns.add_parser("list", help="list an account's contacts")
    ls.add_argument("name")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=list_)


def add(args: argparse.Namespace, ctx) -> int:
    email = ctx.registry.add_contact(args.name, args.email)
    print_escaped(f"added contact {email} to {args.name}")
    return 0


def remove(args: argparse.Namespace, ctx) -> int:
    email = ctx.registry.remove_contact(args.name, args.email)
    print_escaped(f"removed contact {email} from {args.name}")
    return 0


def list_(args: argparse.Namespace, ctx) -> int:
    contacts = ctx.registry.list_contacts(args.name)
    zone = ctx.settings.zone
    if args.json:
        print_json(with_local_times(contacts, zone, ["added_at"]))
        return 0
    print_table(
        [(c.email, local_time(c.added_at, zone)) for c in contacts],
        ["email", "added"],
        empty=f"{args.name} has no contacts: only the operators get its alerts "
        f"(ingestctl contact add {args.name} EMAIL)",
    )
    return 0
