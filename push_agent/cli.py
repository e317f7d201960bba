"""``ingest-push``: the sending side's command line (thin: each command calls one function).

Errors a person can act on are one line on stderr and exit 1 (configuration errors 2);
a failed test or run prints one of the five failure messages and the cause and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ingest_core.console import (
    OneLineErrorParser,
    local_time,
    print_fields,
    print_json,
    print_table,
    warn,
)
from ingest_core.errors import IngestError, Refused
from push_agent import connections, daemon, runs
from push_agent.agent import Agent, open_agent
from push_agent.connections import Connection, parse_delimiter
from push_agent.settings import load_agent_settings
from push_agent.state import describe_state_error

PROG = "ingest-push"


def _local(agent: Agent, value: datetime | None) -> str | None:
    """A time as every sis-ingest command shows it: ISO 8601 in the agent's zone, with its
    offset (the same helper ingestctl uses)."""
    return None if value is None else local_time(value, agent.settings.zone)


# -- passwords -------------------------------------------------------------------------------


def _password(args: argparse.Namespace, required: bool) -> str | None:
    """From --password-file, --password-stdin, or a prompt; never from the command line."""
    if args.password_file:
        try:
            text = Path(args.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise Refused(
                f"cannot read the password file {args.password_file} ({exc.strerror})"
            ) from None
        return text.rstrip("\r\n")
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if getattr(args, "password_prompt", False) or required:
        if not sys.stdin.isatty():
            raise Refused("password auth needs a password: use --password-stdin or --password-file")
        first = getpass.getpass("SFTP password: ")
        if getpass.getpass("Again: ") != first:
            raise Refused("the two passwords differ")
        return first
    return None


# -- connection ------------------------------------------------------------------------------

SETTING_FLAGS = {
    "host": "host",
    "port": "port",
    "path": "remote_dir",
    "user": "username",
    "auth": "auth",
    "frequency": "frequency",
    "remote_name": "remote_name",
    "row_terminator": "row_terminator",
    "quoting": "quoting",
    "header": "header",
    "pool_remote": "pool_remote",
    "pool_local": "pool_local",
    "verify_fingerprint": "verify_fingerprint",
    "since": "since_initial",
    "db_url": "source_url",
    "bind_address": "bind_address",
    "allow_empty": "allow_empty",
}


def parse_line_share(text: str) -> float:
    """``--min-line-share``: 0.5 or 50% (half the lines of the last successful transfer)."""
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        raise Refused(
            f"{text!r} is not a line share; accepted: 0 (off) to 1 or 0% to 100%, "
            "e.g. 0.5 for half the lines of the last successful transfer"
        )
    return share


def _settings_from(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        field: getattr(args, flag)
        for flag, field in SETTING_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.delimiter is not None:
        values["delimiter"] = parse_delimiter(args.delimiter)
    if args.notify is not None:
        values["notify"] = [a for a in args.notify if a]
    if args.min_line_share is not None:
        values["min_line_share"] = parse_line_share(args.min_line_share)
    if args.file is not None:
        # Absolute: the daemon runs in another folder than the one this command ran in.
        path = os.path.expanduser(args.file)
        values.update(source_kind="file", source_path=path and os.path.abspath(path))
    if args.command is not None:
        values.update(source_kind="command", source_command=args.command)
    if args.query is not None:
        values.update(source_kind="query", source_query=args.query)
    if args.no_source:
        values.update(source_kind="none")
    if values.get("pool_local"):
        values["pool_local"] = str(Path(values["pool_local"]).expanduser().resolve())
    return values


def cmd_add(args: argparse.Namespace, agent: Agent) -> int:
    values = _settings_from(args)
    conn = Connection(name=args.name, host=values.pop("host"), **values)
    password = _password(args, required=conn.auth == "password")
    connections.add(agent, conn, password)
    print(f"connection {conn.name} created")
    for note in connections.warnings_for(conn):
        warn(note)
    if conn.auth == "key":
        print(f"next: 'ingest-push key generate {conn.name}', install the public key, then test")
    print(f"next: 'ingest-push connection test {conn.name}' (Test and Save)")
    return 0


def cmd_edit(args: argparse.Namespace, agent: Agent) -> int:
    updates = _settings_from(args)
    if args.no_pool:
        updates.update(pool_remote=None, pool_local=None)
    password = _password(args, required=False)
    changes = connections.edit(agent, args.name, updates, password)
    print(f"connection {args.name} edited: {', '.join(k for k, _, _ in changes)}")
    if {k for k, _, _ in changes} & {"source_kind", "source_path", "source_url"}:
        for note in connections.warnings_for(connections.get(agent, args.name)):
            warn(note)
    return 0


def cmd_delete(args: argparse.Namespace, agent: Agent) -> int:
    connections.delete(agent, args.name)
    print(f"connection {args.name} deleted (its password and key are removed)")
    return 0


def cmd_list(args: argparse.Namespace, agent: Agent) -> int:
    rows = [connections.Connection.from_row(r) for r in connections.all_rows(agent)]
    if args.json:
        print_json([c.public_view() for c in rows])
        return 0
    print_table(
        [
            (
                c.name,
                f"{c.username}@{connections.host_port(c.host, c.port)}",
                c.remote_dir,
                c.auth,
                c.frequency,
                c.source_kind,
            )
            for c in rows
        ],
        ["name", "login", "path", "auth", "frequency", "source"],
        "no connections (add one with 'ingest-push connection add')",
    )
    return 0


def cmd_show(args: argparse.Namespace, agent: Agent) -> int:
    row = connections.get_row(agent, args.name)
    view = Connection.from_row(row).public_view()
    view.update(
        key_fingerprint=connections.key_fingerprint(agent, args.name),
        password_stored=connections.password_path(agent, args.name).exists(),
        db_password_stored=connections.db_password_path(agent, args.name).exists(),
        last_sent_lines=row["last_sent_lines"],
        pinned_fingerprint=row["pinned_fingerprint"],
        seen_fingerprint=row["seen_fingerprint"],
        tested_at=row["test_passed_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
    if args.json:
        print_json(view)
        return 0
    print_fields([(k, _local(agent, v) if isinstance(v, datetime) else v) for k, v in view.items()])
    return 0


def _confirm(host_key: str) -> bool:
    """``host_key`` is the type beside the fingerprint: "ssh-ed25519 SHA256:..."."""
    if not sys.stdin.isatty():
        return False
    answer = input(f"The server's host key is {host_key}. Confirm it? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _print_attempts(failures: Sequence[Any]) -> None:
    """Every failed attempt's cause, when there was more than one."""
    if len(failures) > 1:
        print(f"Every attempt ({len(failures)}):")
        for number, failure in enumerate(failures, 1):
            print(f"  {number}. {failure.category}: {failure.cause}")


def _report(outcome: runs.Outcome, args: argparse.Namespace, what: str) -> int:
    if args.json:
        print_json(outcome.as_dict())
        return 0 if outcome.ok and outcome.pool_failure is None else 1
    if outcome.failure is not None:
        print(f"{what} of {outcome.connection} FAILED")
        print(outcome.failure.message)
        print(f"Cause: {outcome.failure.cause}")
        _print_attempts(outcome.attempt_failures)
        return 1
    print(f"{what} of {outcome.connection} passed")
    for key in ("fingerprint", "since", "remote_file", "bytes", "pool_file", "attempts"):
        # The host key's type beside its fingerprint: "ssh-ed25519 SHA256:...".
        value = outcome.host_key if key == "fingerprint" else getattr(outcome, key)
        if value:
            print(f"  {key}: {value}")
    if outcome.pool_failure is not None:
        # Recorded apart: the upload above succeeded and moved the since-date.
        print(f"pool file pickup of {outcome.connection} FAILED")
        print(outcome.pool_failure.message)
        print(f"Cause: {outcome.pool_failure.cause}")
        _print_attempts(outcome.pool_attempt_failures)
        return 1
    return 0


def cmd_test(args: argparse.Namespace, agent: Agent) -> int:
    confirm = None if args.json else _confirm
    outcome = asyncio.run(runs.test_connection(agent, args.name, args.accept, confirm))
    code = _report(outcome, args, "test")
    if not args.json and outcome.ok:
        if outcome.pinned:
            print(f"  fingerprint confirmed: {outcome.host_key}; transfers may start")
            if outcome.note:
                print(f"  note: {outcome.note}")
        elif outcome.needs_confirmation:
            print(
                f"  fingerprint NOT confirmed ({outcome.host_key}): after checking it, run "
                f"'ingest-push connection test {args.name} --accept {outcome.fingerprint}'; "
                "transfers wait until then"
            )
    return code


# -- keys, runs, export, status, daemon ------------------------------------------------------


def cmd_key_generate(args: argparse.Namespace, agent: Agent) -> int:
    public, fingerprint = connections.generate_key(agent, args.name, args.regenerate)
    print("Install this public key at the SFTP server (it is shown only now):")
    print(public)
    print(f"fingerprint: {fingerprint}")
    return 0


def cmd_key_show(args: argparse.Namespace, agent: Agent) -> int:
    connections.get(agent, args.name)
    fingerprint = connections.key_fingerprint(agent, args.name)
    if args.json:
        print_json({"connection": args.name, "fingerprint": fingerprint})
    else:
        print(fingerprint or f"{args.name} has no key (ingest-push key generate {args.name})")
    return 0


def cmd_run(args: argparse.Namespace, agent: Agent) -> int:
    return _report(asyncio.run(runs.run_connection(agent, args.name, "manual")), args, "run")


def cmd_export(args: argparse.Namespace, agent: Agent) -> int:
    path, since = runs.export_connection(agent, args.name, Path(args.out))
    print(f"wrote {path} (data since {since.text}); schedule and since date unchanged")
    return 0


def cmd_status(args: argparse.Namespace, agent: Agent) -> int:
    entries = runs.status(agent)
    if args.json:
        print_json(entries)
        return 0
    if not entries:
        print("no connections")
        return 0
    for entry in entries:
        print(f"{entry['name']}  ({entry['host']}, {entry['frequency']})")
        failed = _local(agent, entry["last_failure"])
        if failed and entry["last_failure_of"]:
            failed += f" ({entry['last_failure_of']})"
        if failed and entry["last_failure_older"]:
            failed += ", older than the last success: the connection has worked since"
        fields: list[tuple[str, Any]] = [
            ("  last success", _local(agent, entry["last_success"]) or "never"),
            ("  sends data since", entry["since"]),
            ("  last failure", failed or "never"),
            ("  failure message", entry["last_failure_message"]),
            ("  failure cause", entry["last_failure_cause"]),
        ]
        attempts = entry["last_failure_attempts"]
        if len(attempts) > 1:
            fields += [
                (f"  attempt {n}", f"{a['category']}: {a['cause']}")
                for n, a in enumerate(attempts, 1)
            ]
        fields += [
            ("  next run", _local(agent, entry["next_run"])),
            ("  verified fingerprint", entry["verified_fingerprint"] or "none"),
            ("  blocked", entry["blocked"] or "no"),
        ]
        print_fields(fields)
    return 0


def cmd_history(args: argparse.Namespace, agent: Agent) -> int:
    rows = agent.state.history(args.name, args.limit)
    if args.json:
        print_json(rows)
        return 0
    print_table(
        [
            (
                _local(agent, r["started_at"]),
                f"{r['trigger']} ({r['part']})" if r.get("part") else r["trigger"],
                "ok" if r["ok"] else ("FAILED" if r["finished_at"] else "unfinished"),
                r["since"],
                r["bytes"],
                r["category"],
                r["cause"],
            )
            for r in rows
        ],
        ["started", "trigger", "result", "since", "bytes", "failure", "cause"],
        f"no runs of {args.name}",
    )
    return 0


def cmd_daemon(args: argparse.Namespace, agent: Agent) -> int:
    daemon.run_daemon(agent)
    return 0


# -- parser ----------------------------------------------------------------------------------


def _connection_options(p: argparse.ArgumentParser, adding: bool) -> None:
    p.add_argument("name", help="connection name (letters, digits, _ . -)")
    p.add_argument("--host", required=adding, help="SFTP server host name or IP")
    p.add_argument("--port", type=int, help="SSH port (default 22)")
    p.add_argument("--path", required=adding, help="remote directory to upload into")
    p.add_argument("--user", required=adding, help="SFTP user name")
    p.add_argument("--auth", choices=connections.AUTH_METHODS, help="password (default) or key")
    p.add_argument(
        "--frequency",
        required=adding,
        help="hourly | 'every N hours' | 'daily HH:MM' | 'weekly mon HH:MM' (agent time zone)",
    )
    source = p.add_mutually_exclusive_group(required=adding)
    source.add_argument("--file", metavar="PATH_OR_GLOB", help="send this file (newest match)")
    source.add_argument("--command", help="send this export command's standard output")
    source.add_argument("--query", help="send this SQL query's result as a delimited file")
    source.add_argument("--no-source", action="store_true", help="send nothing (pool pickup only)")
    p.add_argument("--db-url", help="SQLAlchemy URL the --query runs against")
    p.add_argument("--remote-name", help="file name on the server (default: the local name)")
    p.add_argument("--delimiter", help="tab, comma, pipe, semicolon or one character")
    p.add_argument("--header", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--row-terminator", choices=tuple(connections.ROW_TERMINATORS))
    p.add_argument("--quoting", choices=connections.QUOTING)
    p.add_argument("--pool-remote", help="pool file to pick up (relative to --path or absolute)")
    p.add_argument("--pool-local", help="where the picked-up pool file goes")
    p.add_argument(
        "--verify-fingerprint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pin the server's host key fingerprint (default on)",
    )
    p.add_argument("--since", metavar="YYYY-MM-DD", help="initial 'send data since' date")
    p.add_argument(
        "--notify", action="append", metavar="ADDRESS", help="e-mail address (repeatable)"
    )
    p.add_argument("--bind-address", help="local IP address to connect from")
    p.add_argument(
        "--allow-empty",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send an export with no data (default: such a run fails, nothing is sent)",
    )
    p.add_argument(
        "--min-line-share",
        metavar="SHARE",
        help="fail a file with fewer lines than this share of the last successful transfer "
        "(0.5 or 50%%: half; default 0: off)",
    )
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--password-file", help="read the password from this file")
    if not adding:
        p.add_argument(
            "--password", dest="password_prompt", action="store_true", help="prompt for a new one"
        )
        p.add_argument("--no-pool", action="store_true", help="stop picking up a pool file")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=PROG,
        description="Push files to SFTP servers on a schedule, with Test and Save, fingerprint "
        "pinning, classified failures and e-mail notifications.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="agent TOML (default: $INGEST_PUSH_CONFIG, else ./ingest-push.toml, else built-in)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True

    conn = sub.add_parser("connection", help="add, edit, delete, list, show, test connections")
    csub = conn.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineErrorParser)
    csub.required = True
    p = csub.add_parser("add", help="create a connection")
    _connection_options(p, adding=True)
    p.set_defaults(func=cmd_add)
    p = csub.add_parser("edit", help="change settings of a connection")
    _connection_options(p, adding=False)
    p.set_defaults(func=cmd_edit)
    p = csub.add_parser("delete", help="delete a connection, its password and key")
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)
    p = csub.add_parser("list", help="list connections")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = csub.add_parser("show", help="show one connection")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = csub.add_parser("test", help="Test and Save: connect, log in, check the path is writable")
    p.add_argument("name")
    p.add_argument("--accept", metavar="SHA256:...", help="confirm this server fingerprint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_test)

    key = sub.add_parser("key", help="generate, regenerate or show a connection's SSH key")
    ksub = key.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineErrorParser)
    ksub.required = True
    p = ksub.add_parser("generate", help="make a 4096-bit RSA key; prints the public key once")
    p.add_argument("name")
    p.set_defaults(func=cmd_key_generate, regenerate=False)
    p = ksub.add_parser("regenerate", help="delete the key and make a new one")
    p.add_argument("name")
    p.set_defaults(func=cmd_key_generate, regenerate=True)
    p = ksub.add_parser("show", help="show the key's fingerprint")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_key_show)

    p = sub.add_parser("run", help="push now")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("export", help="write what would be sent to a local file (no state)")
    p.add_argument("name")
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("status", help="per connection: last success, last failure, next run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("history", help="recent runs and tests of a connection")
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)
    p = sub.add_parser("daemon", help="run every connection on its schedule")
    p.set_defaults(func=cmd_daemon)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    agent: Agent | None = None
    try:
        agent = open_agent(load_agent_settings(args.config), echo=args.func is cmd_daemon)
        return int(args.func(args, agent) or 0)
    except IngestError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except SQLAlchemyError as exc:  # "disk I/O error" on a full disk: one plain line
        state_file = agent.state.path if agent is not None else Path("state.db")
        print(f"{PROG}: {describe_state_error(exc, state_file)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"{PROG}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    finally:
        if agent is not None:
            agent.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
