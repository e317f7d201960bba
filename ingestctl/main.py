"""``ingestctl``: the operator's command line.

Thin by design: each noun module registers its subcommands, and each command is a few lines
over a function the tests also call. Errors are one line on stderr (exit 1; usage and
configuration errors exit 2), never a traceback.

Every command but ``init`` (and ``keygen``, which only writes a client's key pair) needs the
registry the settings point at to exist: run from a folder with no ``ingest.toml`` (and no
``/etc/sis-ingest/ingest.toml``), a command is refused rather than quietly create a new, empty
registry there that the running server never sees. ``--config`` is accepted before or after
the command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sqlite3
import sys
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc

from ingest_core.console import OneLineErrorParser, print_escaped
from ingest_core.errors import ConfigError, IngestError
from ingest_core.registry import Registry
from ingest_core.settings import Settings, load_settings

# One module per noun; each has register(subparsers). Order is the order in --help.
NOUN_MODULES = (
    "init",
    "serve",
    "account",
    "key",
    "ip",
    "contact",
    "spec",
    "hostkey",
    "keygen",
    "audit",
    "server",
    "defender",
    "activity",
    "loader",
    "pool",
    "log",
    "status",
)

# Commands that run without an existing registry: init creates it; keygen only writes a key
# pair for a client institution (on the client's machine, as like as not).
WITHOUT_REGISTRY = frozenset({"init", "keygen"})

CONFIG_HELP = (
    "TOML settings file (default: $INGEST_CONFIG, else ./ingest.toml, else "
    "/etc/sis-ingest/ingest.toml, else built-in)"
)


class Context:
    """What a command needs, built lazily so `--help` never touches the disk."""

    def __init__(self, config: str | None):
        self.config = config

    @cached_property
    def settings(self) -> Settings:
        return load_settings(self.config)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.settings)

    def require_registry(self) -> None:
        """Refuse (exit 2) unless the control database the settings name exists; nothing is
        created on the way (no ``./var``, no empty database file)."""
        where = control_db_location(self.settings.control_db_url)
        if not control_db_exists(self.settings.control_db_url):
            raise ConfigError(
                f"no sis-ingest registry at {where}; run `ingestctl init` there or pass --config"
            )


def control_db_location(url: str) -> str:
    """What the refusal names: the SQLite file, or the URL without its password."""
    if url.startswith("sqlite"):
        return url.split("///", 1)[-1]
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def control_db_exists(url: str) -> bool:
    """Has ``ingestctl init`` made the control database at ``url``: its Alembic version table
    is there. Looked at without creating anything (a missing SQLite file is not opened; a
    PostgreSQL database is only inspected)."""

    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[-1])
        if not path.is_file():
            return False
        try:
            # mode=rw: never creates the file (a deleted one between the two looks is missing).
            with sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=30
            ) as conn:
                row = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
                ).fetchone()
            conn.close()
        except sqlite3.Error:
            return True  # there, but not ours to read here: the command itself says why
        return row is not None
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return sqlalchemy.inspect(conn).has_table("alembic_version")
    except sqlalchemy.exc.OperationalError as exc:
        text = str(exc.orig or exc)
        if re.search(r'database ".*" does not exist', text):  # a server that answers
            return False
        reason = " ".join(text.split())[:300]
        raise ConfigError(
            f"cannot reach the control database at {control_db_location(url)}: {reason}"
        ) from None
    finally:
        engine.dispose()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="ingestctl",
        description="Operate sis-ingest: client accounts, keys, allowed addresses, host keys, "
        "the SFTP/SCP server and the nightly loader.",
    )
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for name in NOUN_MODULES:
        importlib.import_module(f"ingestctl.{name}").register(sub)
    _config_after_command(parser)
    return parser


def _config_after_command(parser: argparse.ArgumentParser) -> None:
    """Accept ``--config PATH`` after the command too (``ingestctl account list --config X``):
    every subcommand's parser gets the option, left unset unless given there."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                child.add_argument(
                    "--config", metavar="PATH", default=argparse.SUPPRESS, help=CONFIG_HELP
                )
                _config_after_command(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Context(args.config)
    try:
        if args.command not in WITHOUT_REGISTRY:
            ctx.require_registry()
        return int(args.func(args, ctx) or 0)
    except IngestError as exc:
        print_escaped(f"ingestctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print_escaped("ingestctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`... --json | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except OSError as exc:
        print_escaped(
            f"ingestctl: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 1
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        # A database server that is down, refuses us or drops the connection: nothing was
        # half-written (every change is one transaction), so say which and stop.
        reason = " ".join(str(exc.orig or exc).split())[:300]
        print_escaped(
            f"ingestctl: a database could not be reached ({reason}); check control_db_url and "
            "sis_db_url in the config and that the database server is running",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
