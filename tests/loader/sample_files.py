"""Builders of real data files on disk, shared by the spec and validation tests."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from loader.spec import Spec

COLUMNS = ("UUUID", "First_Name", "Last_Name", "Email", "Campus")


def people(count: int, start: int = 1) -> list[list[str]]:
    """Rows that match COLUMNS, with unique UUUIDs."""
    return [
        [f"U{i:07d}", f"First{i}", f"Last {i}", f"p{i}@example.edu", "Main"]
        for i in range(start, start + count)
    ]


def render(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    delimiter: str = "\t",
    terminator: str = "\n",
    quoting: str = "none",
    bom: bool = False,
    final_terminator: bool = True,
) -> bytes:
    """The bytes of a data file in the given format."""
    lines = [header, *rows]
    if quoting == "all":
        out = io.StringIO()
        writer = csv.writer(
            out, delimiter=delimiter, lineterminator=terminator, quoting=csv.QUOTE_ALL
        )
        writer.writerows(lines)
        text = out.getvalue()
    else:
        text = "".join(delimiter.join(line) + terminator for line in lines)
    if not final_terminator:
        text = text[: -len(terminator)]
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_people(path: Path, count: int = 5, **fmt: object) -> Path:
    return write(path, render(COLUMNS, people(count), **fmt))  # type: ignore[arg-type]


def make_spec(
    columns: Sequence[str] = COLUMNS,
    key: str | None = "UUUID",
    delimiter: str = "\t",
    terminator: str = "\n",
    quoting: str = "none",
    bom: bool = False,
    file_name: str = "sis_hr_user_info.txt",
    account: str = "acme",
) -> Spec:
    return Spec(
        account=account,
        file_name=file_name,
        encoding="utf-8",
        bom=bom,
        delimiter=delimiter,
        terminator=terminator,
        quoting=quoting,
        columns=tuple(columns),
        key_column=key,
    )
