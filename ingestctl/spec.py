"""ingestctl spec ...: an account's approved data file formats (frozen at onboarding)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ingest_core.console import (
    local_time,
    print_escaped,
    print_fields,
    print_json,
    with_local_times,
)
from loader.approval import approve_spec
from loader.spec import (
    DELIMITER_NAMES,
    TERMINATOR_NAMES,
    Spec,
    remove_spec,
    specs_for,
    table_name,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spec",
        help="approve, show, remove an account's data file formats",
        description="Approved data file formats. 'approve' reads a sample file and freezes its "
        "name, encoding, delimiter, line ends, quoting, header and key column; any later "
        "file that differs is refused by the loader.",
    )
    nouns = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = nouns.add_parser("approve", help="approve the format of a sample file")
    a.add_argument("name", help="account name")
    a.add_argument("sample", help="an approved sample of the data file")
    a.add_argument(
        "--as",
        dest="as_name",
        metavar="FILENAME",
        help="the file name the client will upload (default: the sample's name); a plain "
        "name of printable characters, not '-', not a Windows device name (CON, NUL, COM1...), "
        "not ending in a dot or space",
    )
    a.add_argument("--key", metavar="COLUMN", help="a column that must be present and unique")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=approve)
    s = nouns.add_parser("show", help="show an account's approved formats")
    s.add_argument("name", help="account name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=show)
    r = nouns.add_parser("remove", help="remove an approved format (its table's data stays)")
    r.add_argument("name", help="account name")
    r.add_argument("file_name", metavar="FILENAME")
    r.set_defaults(func=remove)


def _show(spec: Spec, zone) -> None:
    print_fields(
        [
            ("file", spec.file_name),
            ("table", table_name(spec)),
            ("encoding", "UTF-8 with BOM" if spec.bom else "UTF-8"),
            ("delimiter", DELIMITER_NAMES[spec.delimiter]),
            ("line ends", TERMINATOR_NAMES[spec.terminator]),
            ("quoting", "every field" if spec.quoting == "all" else "none"),
            ("key column", spec.key_column or "(none)"),
            ("columns", ", ".join(spec.columns)),
            ("approved", f"{local_time(spec.approved_at, zone)} by {spec.approved_by}"),
        ]
    )


def approve(args: argparse.Namespace, ctx) -> int:
    spec = approve_spec(ctx.registry, args.name, Path(args.sample), args.as_name, args.key)
    if args.json:
        print_json(with_local_times(spec.as_dict(), ctx.settings.zone, ["approved_at"]))
    else:
        print_escaped(f"approved {spec.file_name} for {args.name}: {spec.describe()}")
        print_escaped(f"loads into table {table_name(spec)}")
    return 0


def show(args: argparse.Namespace, ctx) -> int:
    specs = specs_for(ctx.registry, args.name)
    if args.json:
        print_json(
            with_local_times([s.as_dict() for s in specs], ctx.settings.zone, ["approved_at"])
        )
        return 0
    if not specs:
        print_escaped(
            f"{args.name} has no approved file format (ingestctl spec approve {args.name} FILE)"
        )
    for number, spec in enumerate(specs):
        if number:
            print_escaped()
        _show(spec, ctx.settings.zone)
    return 0


def remove(args: argparse.Namespace, ctx) -> int:
    spec = remove_spec(ctx.registry, args.name, args.file_name)
    print_escaped(f"removed the approved format of {spec.file_name} from {args.name}")
    return 0
