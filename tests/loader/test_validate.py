"""Streaming validation: one real file per failure kind, each message naming its line."""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from sample_files import COLUMNS, make_spec, people, render, write, write_people

from loader.spec import Spec
from loader.validate import (
    BLANK_LINE,
    BLOCK_BYTES,
    CHANGED_WHILE_READ,
    ENDS_MID_LINE,
    ENDS_WITHOUT_LINE_END,
    REPEATED_HEADER,
    ValidationReport,
    header_difference,
    iter_copy_blocks,
    iter_row_blocks,
    iter_rows,
    key_problem,
    validate_file,
)

HEADER = "\t".join(COLUMNS)
ROW2 = "U0000001\tFirst1\tLast 1\tp1@example.edu\tMain"
ROW3 = "U0000002\tFirst2\tLast 2\tp2@example.edu\tMain"
ROW4 = "U0000003\tFirst3\tLast 3\tp3@example.edu\tMain"


def only_error(report: ValidationReport) -> str:
    assert not report.ok
    assert report.error_count == 1, report.errors
    return report.errors[0]


# -- files that pass ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt",
    [
        {"delimiter": "\t", "terminator": "\n"},
        {"delimiter": ",", "terminator": "\r\n"},
        {"delimiter": "|", "terminator": "\n", "bom": True},
        {"delimiter": ";", "terminator": "\r\n", "quoting": "all"},
        {"delimiter": "\t", "terminator": "\r\n", "quoting": "all", "bom": True},
    ],
)
def test_a_file_in_its_approved_format_passes_and_yields_every_row(
    tmp_path: Path, fmt: dict[str, object]
) -> None:
    path = write_people(tmp_path / "f.txt", 7, **fmt)
    report = ValidationReport(path.name)
    rows = [list(r) for r in iter_rows(path, make_spec(**fmt), report)]  # type: ignore[arg-type]
    assert report.ok, report.errors
    assert report.rows == 7
    assert rows == people(7)
    assert report.summary() == "f.txt: 7 rows, valid"


def test_values_are_trimmed_and_the_key_is_compared_trimmed(tmp_path: Path) -> None:
    path = write(
        tmp_path / "f.txt",
        f"{HEADER}\n U1 \tAnn\t Lee\ta@x\tMain \nU2\t Mary Ann \tKay\tb@x\tMain\n",
    )
    report = ValidationReport(path.name)
    rows = [list(r) for r in iter_rows(path, make_spec(), report)]
    assert report.ok, report.errors
    assert rows == [["U1", "Ann", "Lee", "a@x", "Main"], ["U2", "Mary Ann", "Kay", "b@x", "Main"]]
    dup = write(tmp_path / "g.txt", f"{HEADER}\nU1\ta\tb\tc\td\n U1 \ta\tb\tc\td\n")
    assert "line 3: duplicate key UUUID 'U1' (also on line 2" in only_error(
        validate_file(dup, make_spec())
    )


def test_quote_all_values_with_quotes_delimiters_and_spaces_round_trip(tmp_path: Path) -> None:
    rows = [["U1", 'say "hi"', "a,b;c|d\te", " padded ", ""], ["U2", '"', '""', "x", "y"]]
    path = tmp_path / "q.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n").writerows([COLUMNS, *rows])
    spec = make_spec(delimiter=",", terminator="\r\n", quoting="all")
    report = ValidationReport(path.name)
    got = [list(r) for r in iter_rows(path, spec, report)]
    assert report.ok, report.errors
    rows[0][3] = "padded"
    assert got == rows


def test_the_last_line_may_lack_its_terminator(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", render(COLUMNS, people(3), final_terminator=False))
    report = validate_file(path, make_spec())
    assert report.ok and report.rows == 3


def test_a_quote_inside_an_unquoted_value_is_plain_data(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", f'{HEADER}\nU1\tRobert "Bob"\tLee\ta@x\tMain\n')
    rows = [list(r) for r in iter_rows(path, make_spec(), ValidationReport("f"))]
    assert rows == [["U1", 'Robert "Bob"', "Lee", "a@x", "Main"]]


# -- one file per failure kind -----------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    assert only_error(validate_file(write(tmp_path / "f.txt", b""), make_spec())) == (
        "the file is empty"
    )


def test_header_but_no_rows(tmp_path: Path) -> None:
    for data in (f"{HEADER}\n", HEADER):
        path = write(tmp_path / "f.txt", data)
        assert only_error(validate_file(path, make_spec())) == (
            "the file has a header (line 1) but no data rows"
        )


def test_wrong_encoding_names_the_line_of_the_first_bad_byte(tmp_path: Path) -> None:
    data = f"{HEADER}\n{ROW2}\n".encode() + "U2\tJos\xe9\tL\tj@x\tMain\n".encode("latin-1")
    report = validate_file(write(tmp_path / "f.txt", data + f"{ROW4}\n".encode()), make_spec())
    assert only_error(report).startswith("line 3: not valid UTF-8 (byte 0xE9 at column 7)")


def test_bad_byte_far_into_the_file_is_on_its_exact_line(tmp_path: Path) -> None:
    rows = people(6000)  # ~ 300 KB: many blocks, the bad byte well past the first
    rows[4321][1] = "Ren\udce9"  # a lone 0xE9 byte after surrogateescape encoding
    text = render(COLUMNS, [], final_terminator=True).decode()
    body = "".join("\t".join(r) + "\n" for r in rows)
    data = text.encode() + body.encode("utf-8", "surrogateescape")
    assert len(data) > 4 * BLOCK_BYTES
    report = validate_file(write(tmp_path / "f.txt", data), make_spec())
    assert only_error(report).startswith("line 4323: not valid UTF-8 (byte 0xE9 at column 13)")


@pytest.mark.parametrize(
    ("codec", "how"),
    [
        ("utf-16", "little-endian, with a byte order mark"),
        ("utf-16-le", "little-endian, without a byte order mark"),
        ("utf-16-be", "big-endian, without a byte order mark"),
    ],
)
def test_utf16_file_is_named_utf16(tmp_path: Path, codec: str, how: str) -> None:
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n".encode(codec))
    assert only_error(validate_file(path, make_spec())) == (
        f"the file is UTF-16 ({how}), not UTF-8; the approved encoding is UTF-8: export or "
        "save the file as UTF-8"
    )


def test_nul_byte_is_refused_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\nU2\ta\x00\tb\tc\td\n")
    assert "line 3: contains a NUL byte" in only_error(validate_file(path, make_spec()))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "UUUID\tFirst_Name\tLast_Name\tEmail",
            "line 1: the header differs from the approved one: missing: Campus",
        ),
        (
            "UUUID\tFirst_Name\tLast_Name\tEmail\tCampus\tPhone",
            "line 1: the header differs from the approved one: extra: 'Phone'",
        ),
        (
            "UUUID\tFirstName\tLast_Name\tEmail\tCampus",
            "line 1: the header differs from the approved one: renamed: column 2 First_Name "
            "is now 'FirstName'",
        ),
        (
            "UUUID\tLast_Name\tFirst_Name\tEmail\tCampus",
            "line 1: the header columns are reordered: got UUUID, Last_Name, First_Name, Email, "
            "Campus; approved order: UUUID, First_Name, Last_Name, Email, Campus",
        ),
    ],
)
def test_header_differences_say_which_columns(tmp_path: Path, header: str, expected: str) -> None:
    n = header.count("\t") + 1
    path = write(tmp_path / "f.txt", f"{header}\n" + "\t".join(["v"] * n) + "\n")
    assert only_error(validate_file(path, make_spec(key=None))) == expected


def test_a_renamed_column_does_not_hide_the_rows_problems(tmp_path: Path) -> None:
    """Both problems at once: the client fixes the file in one go, not in two nights."""
    text = "UUUID\tFirstName\tLast_Name\tEmail\tCampus\nA1\tAda\tL\ta@x\tMain\nA2\tBo\n"
    report = validate_file(write(tmp_path / "f.txt", text), make_spec(key=None))
    assert len(report.errors) == 2, report.errors
    assert report.errors[0].startswith("line 1: the header differs from the approved one: renamed")
    assert report.errors[1].startswith("line 3: 2 fields, expected 5")


def test_header_difference_mixes_missing_extra_and_order() -> None:
    text = header_difference(("B", "A", "X"), ("A", "B", "C"))
    assert "renamed: column 3 C is now 'X'" in text
    assert "reordered: B, A" in text


def test_delimiter_differs_for_the_whole_file(tmp_path: Path) -> None:
    path = write_people(tmp_path / "f.txt", 3, delimiter=",")
    assert only_error(validate_file(path, make_spec())) == (
        "line 1: header: fields are separated by comma instead of the approved tab"
    )


def test_delimiter_differs_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n{ROW3.replace(chr(9), '|')}\n{ROW4}\n")
    assert only_error(validate_file(path, make_spec())) == (
        "line 3: fields are separated by pipe instead of the approved tab"
    )


def test_terminator_differs_for_the_whole_file(tmp_path: Path) -> None:
    path = write_people(tmp_path / "f.txt", 3, terminator="\r\n")
    assert only_error(validate_file(path, make_spec())) == (
        "line 1: lines end with CRLF; the approved format ends every line with LF"
    )


def test_mixed_terminators_name_each_odd_line(tmp_path: Path) -> None:
    lf_file = write(tmp_path / "lf.txt", f"{HEADER}\n{ROW2}\r\n{ROW3}\n{ROW4}\n")
    assert only_error(validate_file(lf_file, make_spec())) == (
        "line 2: ends with CRLF; the approved format ends every line with LF only"
    )
    crlf_file = write(tmp_path / "crlf.txt", f"{HEADER}\r\n{ROW2}\r\n{ROW3}\r\n{ROW4}\n")
    assert only_error(validate_file(crlf_file, make_spec(terminator="\r\n"))) == (
        "line 4: ends with LF only; the approved format ends every line with CRLF"
    )
    stray = write(tmp_path / "cr.txt", f"{HEADER}\n{ROW2}\n{ROW3[:10]}\r{ROW3[10:]}\n")
    assert "line 3: contains a carriage return (CR) inside the row" in (
        validate_file(stray, make_spec()).summary()
    )


def test_wrong_field_counts_name_every_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "f.txt",
        f"{HEADER}\n{ROW2}\tEXTRA\n{ROW3}\nU3\tonly three\tfields\n\n{ROW4}\n",
    )
    report = validate_file(path, make_spec())
    assert report.errors == [
        "line 2: 6 fields, expected 5",
        "line 4: 3 fields, expected 5",
        f"line 5: {BLANK_LINE}",
    ]


@pytest.mark.parametrize("value", ['"First2', '"Doc" Smith', '"'])
def test_a_value_starting_with_a_quote_in_an_unquoted_file(tmp_path: Path, value: str) -> None:
    """The rule is that a value may not begin with a quote (elsewhere a quote is plain data),
    and the message says so, rather than "a quote that is never closed"."""
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\nU2\t{value}\tLast\tp@x\tMain\n{ROW4}\n")
    assert only_error(validate_file(path, make_spec())) == (
        f"line 3: field 2 {value!r} starts with a quote mark: the approved format quotes no "
        "field, so a value may not begin with a quote (a quote inside or at the end of a value "
        "is plain data); remove the quote or move it"
    )


def test_unterminated_quote_in_a_quoted_file_stops_at_its_line(tmp_path: Path) -> None:
    good = render(COLUMNS, people(3), quoting="all").decode().splitlines(keepends=True)
    good[2] = good[2].replace('"Last 2"', '"Last 2')
    path = write(tmp_path / "f.txt", "".join(good))
    report = validate_file(path, make_spec(quoting="all"))
    assert only_error(report) == (
        "line 3: a quote is never closed (the line has an odd number of quote marks)"
    )
    assert report.rows == 3


def test_mixed_quoting_is_refused_both_ways(tmp_path: Path) -> None:
    quoted = render(COLUMNS, people(2), quoting="all").decode().replace('"Main"', "Main", 1)
    report = validate_file(write(tmp_path / "q.txt", quoted), make_spec(quoting="all"))
    assert only_error(report) == (
        "line 2: field 5 is not quoted, but the approved format quotes every field (mixed quoting)"
    )
    bare = write(tmp_path / "b.txt", f'{HEADER}\n{ROW2}\nU2\t"First2"\tLast\tp@x\tMain\n')
    assert only_error(validate_file(bare, make_spec())) == (
        "line 3: field 2 is quoted, but the approved format quotes no field (mixed quoting)"
    )


def test_quoted_header_in_an_unquoted_format(tmp_path: Path) -> None:
    path = write_people(tmp_path / "f.txt", 2, quoting="all")
    assert only_error(validate_file(path, make_spec())).startswith(
        "line 1: header: field 1 is quoted, but the approved format quotes no field"
    )


def test_empty_key_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n  \tA\tB\tC\tD\n")
    assert only_error(validate_file(path, make_spec())) == "line 3: the key column UUUID is empty"


def test_duplicate_key_names_the_value_and_both_lines(tmp_path: Path) -> None:
    rows = people(3000)
    rows[2500][0] = rows[10][0]
    path = write(tmp_path / "f.txt", render(COLUMNS, rows))
    assert only_error(validate_file(path, make_spec())) == (
        "line 2502: duplicate key UUUID 'U0000011' (also on line 12; each row needs its own)"
    )


def test_bom_must_match_the_approved_sample(tmp_path: Path) -> None:
    with_bom = write_people(tmp_path / "a.txt", 2, bom=True)
    assert only_error(validate_file(with_bom, make_spec())) == (
        "line 1: the file starts with a UTF-8 byte order mark (BOM); the approved format has none"
    )
    without = write_people(tmp_path / "b.txt", 2)
    assert only_error(validate_file(without, make_spec(bom=True))) == (
        "line 1: the file lacks the UTF-8 byte order mark (BOM) that the approved format has"
    )


# -- the report --------------------------------------------------------------------------


def test_report_keeps_the_first_errors_and_counts_them_all(tmp_path: Path) -> None:
    rows = people(40)
    for row in rows:
        row.pop()
    path = write(tmp_path / "f.txt", render(COLUMNS, rows))
    report = validate_file(path, make_spec(), max_errors=20)
    assert report.error_count == 40
    assert len(report.errors) == 20
    assert report.errors[0] == "line 2: 4 fields, expected 5"
    assert report.errors[19] == "line 21: 4 fields, expected 5"
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith("f.txt: refused, 40 errors: line 2: 4 fields, expected 5; ")
    assert summary.endswith("; and 20 more")


def test_rows_stop_coming_after_the_first_error_but_errors_are_still_counted(
    tmp_path: Path,
) -> None:
    rows = people(20000)
    rows[15000].pop()
    rows[19000].pop()
    path = write(tmp_path / "f.txt", render(COLUMNS, rows))
    report = ValidationReport(path.name)
    yielded = sum(1 for _ in iter_rows(path, make_spec(), report))
    assert yielded < 15000
    assert report.rows == 20000
    assert report.errors == ["line 15002: 4 fields, expected 5", "line 19002: 4 fields, expected 5"]


# -- COPY text for PostgreSQL -------------------------------------------------------------


@pytest.mark.postgres
def test_copy_blocks_load_into_postgresql_exactly_as_the_rows_read(
    tmp_path: Path, pg_url: str
) -> None:
    import psycopg

    rows = people(3000)
    rows[5][1] = "back\\slash \\N"
    rows[6][2] = "  padded  "
    rows[7][3] = "Zoë 東京 😀"
    rows[8][4] = ""
    plain = write(tmp_path / "plain.txt", render(COLUMNS, rows, terminator="\r\n"))
    rows[9][1] = 'tab\tand "quote" and, comma'
    quoted = write(tmp_path / "quoted.csv", render(COLUMNS, rows, delimiter=",", quoting="all"))
    cases = [
        (plain, make_spec(terminator="\r\n")),
        (quoted, make_spec(delimiter=",", quoting="all")),
    ]
    cols = ", ".join(f"{c} text" for c in COLUMNS)
    with psycopg.connect(dbname=pg_url.rsplit("/", 1)[1]) as conn:
        for path, spec in cases:
            expected = [list(r) for r in iter_rows(path, spec, ValidationReport(path.name))]
            report = ValidationReport(path.name)
            conn.execute(f"DROP TABLE IF EXISTS t; CREATE TABLE t (n serial, {cols})")
            with conn.cursor().copy(f"COPY t ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for _, text in iter_copy_blocks(path, spec, report):
                    copy.write(text)
            assert report.ok, report.errors
            got = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM t ORDER BY n").fetchall()
            assert [list(r) for r in got] == expected
            assert expected[6][2] == "padded" and expected[5][1] == "back\\slash \\N"


def test_a_line_without_end_is_cut_off_at_16_mib(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n".encode() + b"x" * (17 << 20))
    report = validate_file(path, make_spec())
    assert only_error(report) == (
        "line 3: longer than the 16 MiB limit for one line, and it never ends: from its start "
        "to the end of the file (17,825,792 bytes (17.0 MiB)) there is no line end (is this a "
        "text file in the approved format?)"
    )


@pytest.mark.parametrize("key", ["UUUID", "Last_Name", "Campus"], ids=["first", "middle", "last"])
@pytest.mark.parametrize("terminator", ["\n", "\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("final_terminator", [True, False], ids=["ends", "open"])
def test_loader_pass_finds_an_empty_key_and_its_line(
    tmp_path: Path, key: str, terminator: str, final_terminator: bool
) -> None:
    """The loader's pass (uniqueness left to the database) still refuses an empty key with its
    line, wherever the key column is, in the middle of a file or on its unterminated end."""
    column = COLUMNS.index(key)
    spec = make_spec(key=key, terminator=terminator)
    for broken in (700, 1200):  # a line in the middle; the last line
        rows = people(1200)
        rows[broken - 1][column] = ""
        data = render(COLUMNS, rows, terminator=terminator, final_terminator=final_terminator)
        path = write(tmp_path / "sis_hr_user_info.txt", data)
        copied = ValidationReport(path.name)
        copy_rows = sum(n for n, _ in iter_copy_blocks(path, spec, copied, 20, True))
        listed = ValidationReport(path.name)
        listed_rows = sum(len(list(b)) for b in iter_row_blocks(path, spec, listed, 20, True))
        for report in (copied, listed):
            assert report.errors == [f"line {broken + 1}: the key column {key} is empty"]
        # No row of the bad line's block, nor after it, reaches the database.
        assert copy_rows < broken and listed_rows < broken


def test_the_loader_pass_hashes_the_file_it_reads(tmp_path: Path) -> None:
    """``hash_file``: the load's SHA-256 comes from its one pass over the file, on both
    paths, for a clean file and for one with a late error (read to the end all the same);
    a pass that stops early (bad header) or reads back (duplicate report) leaves it empty
    so the loader hashes the file itself."""
    spec = make_spec(key="UUUID")
    rows = people(3 * BLOCK_BYTES // 40)  # several blocks
    clean = render(COLUMNS, rows)
    late_error = clean + b"U9999999\tonly three\tfields\n"
    for text in (clean, late_error):
        path = write(tmp_path / "sis_hr_user_info.txt", text)
        expected = hashlib.sha256(path.read_bytes()).hexdigest()
        copied, listed, unhashed = (ValidationReport(path.name) for _ in range(3))
        for _ in iter_copy_blocks(path, spec, copied, 20, True, True):
            pass
        for _ in iter_row_blocks(path, spec, listed, 20, True, True):
            pass
        for _ in iter_copy_blocks(path, spec, unhashed, 20, True):
            pass
        assert copied.sha256 == listed.sha256 == expected
        assert unhashed.sha256 == ""
    bad_header = write(tmp_path / "sis_hr_user_info.txt", "UUUID\tOther\n" + ROW2 + "\n")
    duplicate = write(tmp_path / "dup.txt", f"{HEADER}\n{ROW2}\n{ROW3}\n{ROW2}\n")
    for path in (bad_header, duplicate):
        report = ValidationReport(path.name)
        for _ in iter_row_blocks(path, spec, report, 20, False, True):
            pass
        assert not report.ok and report.sha256 == ""


# -- rules every file follows, and messages that say what happened ----------------


def all_passes(path: Path, spec: Spec) -> list[ValidationReport]:
    """The pre-check's pass and the loader's two passes (rows for SQLite, COPY text for
    PostgreSQL; uniqueness left to the database), each read to the end."""
    reports = [validate_file(path, spec)]
    for blocks in (iter_row_blocks, iter_copy_blocks):
        report = ValidationReport(path.name)
        for _ in blocks(path, spec, report, 20, True, True):
            pass
        reports.append(report)
    return reports


def errors_of_every_pass(path: Path, spec: Spec) -> list[str]:
    """The errors, the same on every pass (the key's duplicates aside: the database finds them
    on the loader's passes)."""
    first, *others = all_passes(path, spec)
    for other in others:
        assert other.errors == [e for e in first.errors if "duplicate key" not in e]
    return first.errors


@pytest.mark.parametrize("quoting", ["none", "all"])
@pytest.mark.parametrize("bom", [False, True])
def test_a_header_repeated_mid_file_is_refused_with_its_line(
    tmp_path: Path, quoting: str, bom: bool
) -> None:
    """Two exports joined: the second header (with its BOM, if the export writes one) is on
    line 5002, far past the first block."""
    first = render(COLUMNS, people(5000), quoting=quoting, bom=bom)
    second = render(COLUMNS, people(10, start=6000), quoting=quoting, bom=bom)
    path = write(tmp_path / "f.txt", first + second)
    spec = make_spec(quoting=quoting, bom=bom)
    errors = errors_of_every_pass(path, spec)
    assert errors[0] == f"line 5002: {REPEATED_HEADER}"
    assert "several exports joined together; send one header only" in REPEATED_HEADER
    assert len([e for e in errors if "repeats the header" in e]) == 1


def test_a_repeated_header_as_the_last_line_without_line_end(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n{HEADER}")
    assert errors_of_every_pass(path, make_spec()) == [f"line 3: {REPEATED_HEADER}"]


def test_a_value_that_only_contains_the_header_text_is_data(tmp_path: Path) -> None:
    """Only a whole line equal to the header is refused (a one-column file shows it best)."""
    spec = make_spec(columns=("person_id",), key=None)
    path = write(tmp_path / "f.txt", "person_id\nperson_id_2\nxperson_id\nperson_id \n")
    reports = all_passes(path, spec)
    assert all(r.ok and r.rows == 3 for r in reports), [r.errors for r in reports]
    repeated = write(tmp_path / "g.txt", "person_id\nA1\nperson_id\nA2\n")
    assert errors_of_every_pass(repeated, spec) == [f"line 3: {REPEATED_HEADER}"]


@pytest.mark.parametrize("key", [None, "person_id"])
@pytest.mark.parametrize("quoting", ["none", "all"])
@pytest.mark.parametrize("terminator", ["\n", "\r\n"])
def test_blank_lines_are_refused_in_a_one_column_spec(
    tmp_path: Path, key: str | None, quoting: str, terminator: str
) -> None:
    """A one-column file: a blank line would pass the field count as one empty field. The
    final line end is not a blank line; an extra one at the end is."""
    spec = make_spec(columns=("person_id",), key=key, quoting=quoting, terminator=terminator)
    ids = [[f"A{i}"] for i in range(3000)]
    good = render(("person_id",), ids, terminator=terminator, quoting=quoting)
    assert all(r.ok and r.rows == 3000 for r in all_passes(write(tmp_path / "g", good), spec))
    t = terminator.encode()
    lines = good.split(t)
    lines.insert(1501, b"")  # line 1502, in a later block
    lines.insert(2001, b"   ")  # line 2002: spaces only
    data = t.join(lines) + t  # and an extra line end at the end: line 3003 is blank
    assert errors_of_every_pass(write(tmp_path / "f", data), spec) == [
        f"line 1502: {BLANK_LINE}",
        f"line 2002: {BLANK_LINE}",
        f"line 3004: {BLANK_LINE}",
    ]


def test_blank_lines_are_refused_in_a_multi_column_spec(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n\n{ROW3}\n  \n{ROW4}\n")
    assert errors_of_every_pass(path, make_spec(key=None)) == [
        f"line 3: {BLANK_LINE}",
        f"line 5: {BLANK_LINE}",
    ]


def test_a_line_over_16_mib_that_ends_says_how_long_it_is(tmp_path: Path) -> None:
    """A 50 MB value on a line that does end: the line is over the limit (it has an end)."""
    data = (
        f"{HEADER}\n{ROW2}\nU2\t".encode() + b"x" * (50 << 20) + f"\tL\tp@x\tM\n{ROW4}\n".encode()
    )
    path = write(tmp_path / "f.txt", data)
    length = len(data.split(b"\n")[2])  # up to, not including, the line end
    assert only_error(validate_file(path, make_spec())) == (
        f"line 3: longer than the 16 MiB limit for one line: it is {length:,} bytes "
        f"({length / (1 << 20):.1f} MiB) long, up to its line end; no row of a data file can "
        "be that long: check the export"
    )


def test_a_line_just_under_16_mib_passes_and_one_just_over_is_refused(tmp_path: Path) -> None:
    """The limit is exact (a line and its line end, at most 16 MiB), not block-rounded."""
    spec = make_spec(columns=("v",), key=None)
    head = b"v\n" + b"a\n" * 1000
    fits = write(tmp_path / "fits.txt", head + b"x" * ((16 << 20) - 1) + b"\nb\n")
    assert validate_file(fits, spec).ok
    over = write(tmp_path / "over.txt", head + b"x" * (16 << 20) + b"\nb\n")
    assert only_error(validate_file(over, spec)).startswith(
        "line 1002: longer than the 16 MiB limit for one line: it is 16,777,216 bytes"
    )


def test_a_header_over_16_mib_is_refused_in_the_same_words(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", b"x" * (17 << 20) + b"\n" + ROW2.encode() + b"\n")
    assert only_error(validate_file(path, make_spec())).startswith(
        "line 1: longer than the 16 MiB limit for one line: it is 17,825,792 bytes (17.0 MiB)"
    )


def test_a_file_that_grows_while_it_is_read_is_refused_as_changed(tmp_path: Path) -> None:
    """Written in place while the loader reads it: rows are appended between two blocks."""
    rows = people(6000)
    path = write(tmp_path / "f.txt", render(COLUMNS, rows[:3000]))
    for blocks in (iter_row_blocks, iter_copy_blocks):
        path.write_bytes(render(COLUMNS, rows[:3000]))
        report = ValidationReport(path.name)
        for number, _ in enumerate(blocks(path, make_spec(), report, 20, True, True)):
            if number == 1:
                with path.open("ab") as out:
                    out.write(render(COLUMNS, rows[3000:]).split(b"\n", 1)[1])
        size = len(render(COLUMNS, rows[:3000]))
        assert report.errors == [
            CHANGED_WHILE_READ.format(
                change=f"its size went from {size:,} to {path.stat().st_size:,} bytes",
                name="sis_hr_user_info.txt",
            )
        ]
        assert (
            "upload it under a temporary name and rename it to sis_hr_user_info.txt"
            in (report.errors[0])
        )
        assert "only complete files, renamed into place, are read" in report.errors[0]


def test_a_file_rewritten_in_place_with_the_same_size_is_refused_as_changed(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "f.txt", render(COLUMNS, people(3000)))
    report = ValidationReport(path.name)
    for number, _ in enumerate(iter_row_blocks(path, make_spec(), report)):
        if number == 1:
            with path.open("r+b") as out:
                out.seek(len(HEADER) + 1)
                out.write(b"V")  # same size, new mtime
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert report.errors[0].startswith(
        "the file changed while it was being read (it was written to while it was read): "
        "it looks like it was still being written"
    )


@pytest.mark.parametrize(
    ("spec_kw", "cut_line"),
    [
        ({}, "U0000003\tFirst3\tLa"),  # fewer fields
        ({"terminator": "\r\n"}, f"{ROW4}\r"),  # cut between CR and LF
        ({"quoting": "all"}, '"U0000003"\t"First3"\t"Last 3"\t"p3@exa'),  # inside a value
        ({"quoting": "all"}, '"U0000003"\t"First3"\t'),  # right after a delimiter
    ],
)
def test_a_file_cut_in_the_middle_of_its_last_line_looks_incomplete(
    tmp_path: Path, spec_kw: dict[str, str], cut_line: str
) -> None:
    """A file read while it is being written ends inside a line: the message says the file
    looks incomplete (first), not only that the line is wrong."""
    spec = make_spec(**spec_kw)
    head = render(COLUMNS, people(2), **spec_kw)  # type: ignore[arg-type]
    path = write(tmp_path / "sis_hr_user_info.txt", head + cut_line.encode())
    for report in all_passes(path, spec):
        assert report.errors[0] == f"line 4: {ENDS_MID_LINE.format(name=spec.file_name)}"
        assert len(report.errors) == 2 and report.errors[1].startswith("line 4: ")


def test_a_cut_inside_a_utf8_character_looks_incomplete(tmp_path: Path) -> None:
    data = f"{HEADER}\n{ROW2}\nU2\tZo".encode() + "ë".encode()[:1]
    errors = errors_of_every_pass(write(tmp_path / "f.txt", data), make_spec())
    assert errors[0].startswith("line 3: the file ends in the middle of this line")


def test_a_header_cut_short_looks_incomplete(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", HEADER[:12])
    errors = validate_file(path, make_spec()).errors
    assert errors[0].startswith("line 1: the header differs from the approved one")
    assert errors[1].startswith("line 1: the file ends in the middle of this line")


def test_a_complete_last_line_with_an_error_is_not_called_incomplete(tmp_path: Path) -> None:
    """Only a line cut short (too few fields, open quote, cut character) says "incomplete"."""
    for last in ("\tFirst3\tLast 3\tp3@x\tMain", f"{ROW4}\textra", ROW4.replace("\t", ",")):
        path = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n{ROW3}\n{last}")
        errors = errors_of_every_pass(path, make_spec())
        assert len(errors) == 1 and "looks incomplete" not in errors[0]


def test_a_spec_whose_files_end_with_a_line_end_refuses_one_without(tmp_path: Path) -> None:
    """When the spec records that its files end with a line end (``final_line_end``), a file
    without one is incomplete even if its last line parses (cut inside the last value)."""

    @dataclass(frozen=True)
    class EndingSpec(Spec):
        final_line_end: bool = True

    spec = EndingSpec(**{f.name: getattr(make_spec(), f.name) for f in fields(Spec)})
    cut = write(tmp_path / "f.txt", f"{HEADER}\n{ROW2}\n{ROW3[:-2]}")
    assert errors_of_every_pass(cut, spec) == [
        f"line 3: {ENDS_WITHOUT_LINE_END.format(name=spec.file_name)}"
    ]
    assert errors_of_every_pass(cut, make_spec()) == []  # older specs: the last line may end
    ends = write(tmp_path / "g.txt", f"{HEADER}\n{ROW2}\n{ROW3}\n")
    assert errors_of_every_pass(ends, spec) == []


def _keyed(tmp_path: Path, keys: list[str], name: str = "f.txt") -> Path:
    rows = people(3000)  # several blocks, with non-ASCII text in every one
    for i, row in enumerate(rows):
        row[2] = f"Zoë {i}"
    for i, key in enumerate(keys):
        rows[700 * i + 10][0] = key  # lines 12, 712, 1412, 2112
    return write(tmp_path / name, render(COLUMNS, rows))


def test_keys_that_look_the_same_are_refused_with_both_lines(tmp_path: Path) -> None:
    """NFD 'José' and NFC 'José' (and a key with a no-break space) are one key to a reader:
    the bad key is refused on its line, and the clash is named with both lines."""
    nfc, nfd = "Jos\u00e9", "Jose\u0301"
    path = _keyed(tmp_path, [nfc, nfd, "U0000100\u00a0"])
    report = validate_file(path, make_spec())
    assert report.errors == [
        f"line 712: {key_problem(nfd, 'UUUID')}",
        f"line 1412: {key_problem('U0000100' + chr(0xA0), 'UUUID')}",
        f"line 712: duplicate key UUUID: {nfd!r} is the same key as {nfc!r} on line 12 (code "
        "points 'Jose\\u0301' and 'Jos\\xe9': they differ only in Unicode form or in invisible "
        "or non-ASCII space characters; each row needs its own key)",
        "line 1412: duplicate key UUUID: 'U0000100\\xa0' is the same key as 'U0000100' on line "
        "101 (code points 'U0000100\\xa0' and 'U0000100': they differ only in Unicode form or "
        "in invisible or non-ASCII space characters; each row needs its own key)",
    ]
    assert "is not in Unicode NFC form" in report.errors[0]
    assert (
        "holds a no-break space (U+00A0); a key may hold no space other than the ordinary "
        in (report.errors[1])
    )


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("A\u00a01", "no-break space (U+00A0)"),
        ("A\u20071", "figure space (U+2007)"),
        ("A\u202f1", "narrow no-break space (U+202F)"),
        ("A1\u200b", "zero width space (U+200B)"),
        ("\ufeffA1", "zero width no-break space (U+FEFF)"),
    ],
)
def test_a_key_with_a_non_ascii_space_or_invisible_character_is_refused(
    tmp_path: Path, key: str, named: str
) -> None:
    path = _keyed(tmp_path, ["A0", key])
    errors = errors_of_every_pass(path, make_spec())
    assert errors == [f"line 712: {key_problem(key, 'UUUID')}"]
    assert f"holds a {named}" in errors[0]


def test_non_ascii_keys_in_nfc_pass_on_every_path(tmp_path: Path) -> None:
    path = _keyed(tmp_path, ["Jos\u00e9", "Zoë", "東京", "Ana María"])
    reports = all_passes(path, make_spec())
    assert all(r.ok and r.rows == 3000 for r in reports), [r.errors for r in reports]
    quoted = people(3)
    quoted[0][0] = "Jose\u0301"
    bad = write(tmp_path / "q.csv", render(COLUMNS, quoted, delimiter=",", quoting="all"))
    spec = make_spec(delimiter=",", quoting="all")
    assert errors_of_every_pass(bad, spec) == [
        f"line 2: {key_problem('Jose' + chr(0x301), 'UUUID')}"
    ]


def test_non_ascii_values_outside_the_key_are_free(tmp_path: Path) -> None:
    rows = people(3)
    rows[0][1] = "Jose\u0301\u00a0"  # NFD and a no-break space: fine in a name
    path = write(tmp_path / "f.txt", render(COLUMNS, rows))
    assert all(r.ok for r in all_passes(path, make_spec()))
