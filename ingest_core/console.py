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
from collections.abc import Sequence
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
