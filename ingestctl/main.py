"""``ingestctl``: the operator's command line.

Thin by design: each noun module registers its subcommands, and each command is a few lines
over a function the tests also call. Errors are one line on stderr (exit 1; usage and
configuration errors exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from functools import cached_property

from ingest_core.console import OneLineErrorParser, print_escaped
from ingest_core.errors import IngestError
from ingest_core.registry import Registry
from ingest_core.settings import Settings, load_settings

# One module per noun; each has register(subparsers). Order is the order in --help.
NOUN_MODULES = (
    "init",
    "serve",
    "account",
    "key",
    "ip",
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
)


class Context:
    """What a command needs, built lazily so `--help` never touches the disk."""

    def __init__(self, config: str | None):
        self._config = config

    @cached_property
    def settings(self) -> Settings:
        return load_settings(self._config)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.settings)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="ingestctl",
        description="Operate sis-ingest: client accounts, keys, allowed addresses, host keys, "
        "the SFTP/SCP server and the nightly loader.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML settings file (default: $INGEST_CONFIG, else ./ingest.toml, else built-in)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for name in NOUN_MODULES:
        importlib.import_module(f"ingestctl.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Context(args.config)
    try:
        return int(args.func(args, ctx) or 0)
    except IngestError as exc:
        print_escaped(f"ingestctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print_escaped("ingestctl: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print_escaped(
            f"ingestctl: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
