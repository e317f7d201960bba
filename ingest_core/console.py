r"""How command lines show things: aligned tables for people, `--json` for programs.

Shared by `ingestctl` and `ingest-push`. Whatever is shown passes through
:func:`~ingest_core.file_names.escape_for_operator`: a file name or a logged value can hold
escape sequences and line separators, and they must neither drive the operator's terminal nor
split a row. JSON escapes control characters itself; lone surrogates (undecodable bytes of a
file name) are shown as ``\xff`` there too, so any JSON reader can take the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any, TextIO

from ingest_core.file_names import escape_for_operator, escape_surrogates


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {escape_surrogates(str(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, str):
        return escape_surrogates(value)
    return value


def local_time(value: datetime | str | None, zone: tzinfo) -> str:
    """One instant as every command shows it: ISO 8601 to the second in ``zone`` (the
    configured ``[schedule] timezone``), with its offset, e.g. ``2026-11-23T03:00:04-05:00``.

    Takes an aware datetime (a naive one is UTC, as the databases store it) or an ISO 8601
    string as logged (``...Z``, ``+00:00`` or another offset). ``None`` and an empty string
    give ""; a string that is not such a timestamp (a hand-edited log line) comes back as it is.
    """
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return value
        if parsed.utcoffset() is None:
            return value
        value = parsed
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(zone).isoformat(timespec="seconds")


def with_local_times(value: Any, zone: tzinfo, keys: Iterable[str]) -> Any:
    """``value`` made JSON-ready (a dataclass, a dict or a list of them), with the fields
    named by ``keys`` shown by :func:`local_time`, at any depth: what every ``--json`` output
    passes its records through, so its times read like the tables'."""
    names = frozenset(keys)

    def convert(item: Any) -> Any:
        if isinstance(item, dict):
            return {
                k: local_time(v, zone)
                if k in names and isinstance(v, datetime | str)
                else convert(v)
                for k, v in item.items()
            }
        if isinstance(item, list):
            return [convert(v) for v in item]
        return item

    return convert(_plain(value))


def _plain(value: Any) -> Any:
    """Dataclasses as dicts (datetimes kept as they are, for :func:`local_time`)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """JSON on stdout: ASCII only, so no raw control character or line separator (U+2028,
    U+0085) reaches a reader that splits lines more eagerly than JSON does."""
    text = json.dumps(to_jsonable(value), indent=2, default=_escaped_str, ensure_ascii=True)
    sys.stdout.write(text + "\n")


def _escaped_str(value: Any) -> str:
    return escape_surrogates(str(value))


def print_escaped(text: str = "", file: TextIO | None = None, flush: bool = False) -> None:
    """print() for operator-facing text: control characters are shown as escapes."""
    print(escape_for_operator(text), file=file or sys.stdout, flush=flush)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], empty: str = "") -> None:
    if not rows:
        if empty:
            print_escaped(empty)
        return
    cells = [[escape_for_operator("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers))
    print(line.rstrip())
    for row in cells:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print_escaped(f"{key.ljust(width)}  {'' if value is None else value}")


def warn(message: str) -> None:
    print_escaped(f"warning: {message}", file=sys.stderr)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other refusal."""

    def error(self, message: str) -> None:  # type: ignore[override]
        line = escape_for_operator(f"{self.prog}: error: {message} (see '{self.prog} --help')")
        self.exit(2, line + "\n")
