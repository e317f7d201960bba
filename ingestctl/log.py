"""ingestctl log NAME: the account's folder log, as the client reads it.

Each line's time is shown in the configured zone, like every other command's (the same instant
as in the file: a line written before a change of ``[schedule] timezone`` is shown in the new
zone). A line without a timestamp (a hand edit) is shown as it is.
"""

from __future__ import annotations

import argparse

from ingest_core.console import local_time, print_escaped, print_json
from ingest_core.folder_log import parse_line, read_lines
from ingest_core.folders import account_folder


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "log",
        help="print an account's folder log (loads, pre-checks, pool files)",
        description="The result log in the account's folder, oldest line first.",
    )
    p.add_argument("name")
    p.add_argument("--tail", type=int, metavar="N", help="only the newest N lines")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx) -> int:
    ctx.registry.get_account(args.name)
    lines = read_lines(account_folder(ctx.settings, args.name))
    if args.tail is not None:
        lines = lines[-args.tail :] if args.tail > 0 else []
    zone = ctx.settings.zone
    if args.json:
        entries = [parse_line(line) for line in lines]
        print_json([{**e, "time": local_time(e["time"], zone)} for e in entries])
        return 0
    for line in lines:
        print_escaped(_in_zone(line, zone))
    if not lines:
        print_escaped(f"(the folder log of {args.name} is empty)")
    return 0


def _in_zone(line: str, zone) -> str:
    """The line with its leading timestamp shown in ``zone``; any other line unchanged."""
    stamp = parse_line(line)["time"]
    if not stamp:
        return line
    return local_time(stamp, zone) + line[len(stamp) :]
