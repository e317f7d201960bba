"""Property tests of the validator: valid files pass, and any single corruption is caught.

Files are drawn in every approved format (4 delimiters, CRLF/LF, quoting none/all, BOM or
not, with or without a key column, with or without a final line end) with awkward values:
any Unicode, spaces to trim, and, for quoted files, quotes, delimiters and tabs inside values.
A valid file holds no blank line and no second header: a one-column file's values
are never blank, and no row repeats the header line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from loader.approval import detect_spec
from loader.spec import BOM, DELIMITERS, SQL_RESERVED_WORDS, Spec
from loader.validate import ValidationReport, iter_copy_blocks, iter_rows, validate_file

PROPERTY_SETTINGS = hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

CORRUPTION_SETTINGS = hsettings(PROPERTY_SETTINGS, max_examples=50)

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True).filter(
    lambda name: name.lower() not in SQL_RESERVED_WORDS
)
KEYS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,9}", fullmatch=True)


@dataclass(frozen=True)
class DataFile:
    """A file as its parts, so one part can be corrupted and the bytes rebuilt."""

    spec: Spec
    rows: tuple[tuple[str, ...], ...]
    final_terminator: bool

    def line(self, values: tuple[str, ...] | list[str], delimiter: str | None = None) -> str:
        d = delimiter or self.spec.delimiter
        if self.spec.quoting == "all":
            out = io.StringIO()
            csv.writer(out, delimiter=d, quoting=csv.QUOTE_ALL, lineterminator="").writerow(values)
            return out.getvalue()
        return d.join(values)

    def lines(self) -> list[str]:
        return [self.line(self.spec.columns), *(self.line(r) for r in self.rows)]

    def encode(self, lines: list[str] | None = None, terminators: list[str] | None = None) -> bytes:
        lines = self.lines() if lines is None else lines
        if terminators is None:
            terminators = [self.spec.terminator] * len(lines)
            if not self.final_terminator:
                terminators[-1] = ""
        body = "".join(text + end for text, end in zip(lines, terminators, strict=True))
        return (BOM if self.spec.bom else b"") + body.encode("utf-8")

    def expected_rows(self) -> list[list[str]]:
        trim = " " if self.spec.delimiter == "\t" else " \t"
        return [[value.strip(trim) for value in row] for row in self.rows]


@st.composite
def data_files(draw: st.DrawFn, min_columns: int = 1, min_rows: int = 1) -> DataFile:
    n = draw(st.integers(min_columns, 6))
    columns = tuple(draw(st.lists(NAMES, min_size=n, max_size=n, unique_by=str.lower)))
    delimiter = draw(st.sampled_from(DELIMITERS))
    quoting = draw(st.sampled_from(["none", "all"]))
    key_index = draw(st.none() | st.integers(0, n - 1))
    count = draw(st.integers(min_rows, 12))
    if quoting == "all":
        values = st.text(st.characters(exclude_characters="\r\n\x00", codec="utf-8"), max_size=8)
    else:
        trim = " " if delimiter == "\t" else " \t"
        values = st.text(
            st.characters(exclude_characters=f"\r\n\x00{delimiter}", codec="utf-8"),
            min_size=1 if n == 1 else 0,
            max_size=8,
        ).filter(lambda v: not v.startswith('"') and (n > 1 or v.strip(trim) != ""))
    keys = draw(st.lists(KEYS, min_size=count, max_size=count, unique=True))
    rows = []
    for i in range(count):
        row = draw(st.lists(values, min_size=n, max_size=n))
        if key_index is not None:
            row[key_index] = draw(st.sampled_from(["", " "])) + keys[i]
        rows.append(tuple(row))
    spec = Spec(
        account="acme",
        file_name="data.txt",
        encoding="utf-8",
        bom=draw(st.booleans()),
        delimiter=delimiter,
        terminator=draw(st.sampled_from(["\n", "\r\n"])),
        quoting=quoting,
        columns=columns,
        key_column=None if key_index is None else columns[key_index],
    )
    data = DataFile(spec, tuple(rows), final_terminator=draw(st.booleans()))
    header = data.line(columns)
    assume(all(data.line(row) != header for row in rows))  # that is a repeated header
    return data


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@PROPERTY_SETTINGS
@given(data_files())
def test_valid_files_pass_with_every_value_intact(folder: Path, data: DataFile) -> None:
    path = folder / "data.txt"
    path.write_bytes(data.encode())
    report = ValidationReport(path.name)
    rows = [list(r) for r in iter_rows(path, data.spec, report)]
    assert report.ok, report.errors
    assert report.rows == len(data.rows)
    assert rows == data.expected_rows()
    copy_report = ValidationReport(path.name)
    blocks = list(iter_copy_blocks(path, data.spec, copy_report))
    assert copy_report.ok, copy_report.errors
    assert sum(count for count, _ in blocks) == len(data.rows)
    assert parse_copy_text("".join(text for _, text in blocks)) == data.expected_rows()
    if len(data.spec.columns) > 1:  # a single column has no delimiter to detect
        assert detect_spec(path, "acme", None, data.spec.key_column) == data.spec


def parse_copy_text(text: str) -> list[list[str]]:
    """PostgreSQL COPY text format back to values (what the server does with it)."""
    escapes = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    rows = []
    for line in text.split("\n")[:-1]:
        values = []
        for raw in line.split("\t"):
            out, i = [], 0
            while i < len(raw):
                if raw[i] == "\\":
                    out.append(escapes[raw[i + 1]])
                    i += 2
                else:
                    out.append(raw[i])
                    i += 1
            values.append("".join(out))
        rows.append(values)
    return rows


CORRUPTIONS = (
    "drop a field",
    "add a field",
    "change the delimiter on a line",
    "break the encoding",
    "duplicate a key",
    "change a header name",
    "flip a line terminator",
    "add an unterminated quote",
    "repeat the header",
    "insert a blank line",
)
# Corruptions that any spec, one column included, must catch.
ANY_SPEC = ("repeat the header", "insert a blank line")


@st.composite
def corrupted_files(draw: st.DrawFn, kind: str) -> tuple[DataFile, bytes, int]:
    """A valid file, the corruption applied: the corrupted bytes and the line to be named."""
    data = draw(data_files(min_columns=1 if kind in ANY_SPEC else 2, min_rows=2))
    if kind == "duplicate a key" and data.spec.key_column is None:
        key_column = data.spec.columns[draw(st.integers(0, len(data.spec.columns) - 1))]
        key = data.spec.columns.index(key_column)
        rows = tuple((*row[:key], f"k{i}", *row[key + 1 :]) for i, row in enumerate(data.rows))
        data = replace(data, spec=replace(data.spec, key_column=key_column), rows=rows)
    lines = data.lines()
    row = draw(st.integers(0, len(data.rows) - 1))
    number = row + 2  # line numbers are 1-based and line 1 is the header
    values = list(data.rows[row])
    spec = data.spec
    if kind == "drop a field":
        values.pop(draw(st.integers(0, len(values) - 1)))
        lines[number - 1] = data.line(values)
    elif kind == "add a field":
        values.insert(draw(st.integers(0, len(values))), draw(KEYS))
        lines[number - 1] = data.line(values)
    elif kind == "change the delimiter on a line":
        other = draw(st.sampled_from([d for d in DELIMITERS if d != spec.delimiter]))
        lines[number - 1] = data.line(values, other)
    elif kind == "duplicate a key":
        key = spec.columns.index(spec.key_column)  # type: ignore[arg-type]
        first, second = sorted(draw(st.lists(st.integers(0, len(data.rows) - 1), min_size=2,
                                             max_size=2, unique=True)))  # fmt: skip
        values = list(data.rows[second])
        values[key] = data.rows[first][key]
        number = second + 2
        lines[number - 1] = data.line(values)
    elif kind == "change a header name":
        columns = list(spec.columns)
        columns[draw(st.integers(0, len(columns) - 1))] += "X"
        lines[0] = data.line(columns)
        number = 1
    elif kind == "add an unterminated quote":
        if spec.quoting == "all":
            lines[number - 1] = lines[number - 1][:-1]  # the last field's closing quote
        else:
            field = draw(st.integers(0, len(values) - 1))
            values[field] = '"' + values[field]
            lines[number - 1] = data.line(values)
    if kind == "break the encoding":
        raw = [line.encode("utf-8") for line in lines]
        target = raw[number - 1]
        at = draw(st.integers(0, len(target)))
        raw[number - 1] = target[:at] + b"\xff" + target[at:]
        ends = [spec.terminator.encode()] * len(raw)
        if not data.final_terminator:
            ends[-1] = b""
        body = b"".join(text + end for text, end in zip(raw, ends, strict=True))
        return data, (BOM if spec.bom else b"") + body, number
    if kind in ANY_SPEC:
        # Before a data row, or after the last one (then with its own line end, so the file
        # does not merely gain a final line end, which is not a blank line).
        at = draw(st.integers(1, len(lines)))
        if kind == "repeat the header":
            inserted = ("\ufeff" if spec.bom and draw(st.booleans()) else "") + lines[0]
        else:
            inserted = draw(st.sampled_from(["", " ", "  "]))
        lines.insert(at, inserted)
        number = at + 1
        terminators = [spec.terminator] * len(lines)
        if not data.final_terminator and at < len(lines) - 1:
            terminators[-1] = ""
        return data, data.encode(lines, terminators), number
    # An empty last line with no line end is no line at all (a row of one empty value that lost
    # it): nothing is left to catch.
    assume(lines[-1] != "" or data.final_terminator)
    terminators = [spec.terminator] * len(lines)
    if not data.final_terminator:
        terminators[-1] = ""
    if kind == "flip a line terminator":
        last = len(lines) - (1 if data.final_terminator else 2)
        index = draw(st.integers(0, last))
        terminators[index] = "\n" if spec.terminator == "\r\n" else "\r\n"
        number = index + 1
    return data, data.encode(lines, terminators), number


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_any_single_corruption_is_caught_and_its_line_named(folder: Path, kind: str) -> None:
    @CORRUPTION_SETTINGS
    @given(corrupted_files(kind))
    def check(case: tuple[DataFile, bytes, int]) -> None:
        caught(folder, kind, *case)

    check()


def caught(folder: Path, kind: str, data: DataFile, corrupted: bytes, number: int) -> None:
    path = folder / "data.txt"
    path.write_bytes(corrupted)
    copy_report = ValidationReport(path.name)
    for _ in iter_copy_blocks(path, data.spec, copy_report):
        pass
    assert not copy_report.ok, f"{kind} was not caught on the COPY path"
    report = validate_file(path, data.spec)
    assert not report.ok, f"{kind} was not caught"
    assert any(error.startswith(f"line {number}: ") for error in report.errors), (
        kind,
        report.errors,
    )


@PROPERTY_SETTINGS
@given(data_files(min_columns=2), st.sampled_from(DELIMITERS), st.booleans())
def test_a_file_in_another_format_is_refused_on_line_1(
    folder: Path, data: DataFile, delimiter: str, flip_terminator: bool
) -> None:
    """The whole file exported differently (another delimiter or line end) stops at line 1."""
    other = replace(
        data.spec,
        delimiter=delimiter,
        terminator=({"\n": "\r\n", "\r\n": "\n"}[data.spec.terminator] if flip_terminator
                    else data.spec.terminator),
    )  # fmt: skip
    if other == data.spec:
        return
    path = folder / "data.txt"
    path.write_bytes(replace(data, spec=other).encode())
    report = validate_file(path, data.spec)
    assert not report.ok
    assert report.errors[0].startswith("line 1: ")
