"""The file rules end to end: a real file in the account folder, a real nightly run
through ``ingestctl loader run`` on SQLite and on PostgreSQL. Each refusal leaves the SIS
table as it was and the file in the folder byte for byte, writes an ERROR line that says
what happened, records a refused load and exits 1."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest_core import folder_log
from ingest_core.registry import Registry
from ingest_core.settings import load_settings
from loader.approval import approve_spec
from loader.nightly import run_account
from loader.sis_db import open_sis_db
from loader.spec import Spec, table_name
from loader.validate import (
    BLANK_LINE,
    REPEATED_HEADER,
    key_problem,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
HEADER = "UUUID\tfirst_name\tlast_name\temail"


@pytest.fixture(params=BACKENDS)
def site(request, config_file: Path, onboard, kit):
    """An onboarded account whose SIS table holds 3 rows from a first load, with the config
    file the CLI reads pointing at the backend under test."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        text = config_file.read_text(encoding="utf-8")
        config_file.write_text(f'sis_db_url = "{url}"\n{text}', encoding="utf-8")
    on = onboard(load_settings(config_file))
    kit.write_data(on.data_file, 3)
    assert run_account(on.settings, on.name).ok
    return on


def approve(on, tmp_path: Path, name: str, sample: str, key: str | None) -> Spec:
    path = tmp_path / f"sample-{name}"
    path.write_text(sample, encoding="utf-8", newline="")
    return approve_spec(Registry(on.settings, actor="test"), on.name, path, as_name=name, key=key)


def table(on, spec: Spec) -> list[tuple[str, ...]]:
    return open_sis_db(on.settings.sis_db_url).table_rows(table_name(spec))


def refused(
    on, spec: Spec, data: bytes, run: Callable[[], int], *expected: str, kept: bytes = b""
) -> tuple[str, int]:
    """Put ``data`` in place as the spec's file, run, and check everything a refusal leaves:
    the table unchanged, the file kept (as ``data``, or ``kept`` if it grew meanwhile), a
    refused load, the folder log's ERROR line (returned, with the exit code) holding each
    expected text."""
    path = on.folder.root / spec.file_name
    path.write_bytes(data)
    before = table(on, spec)
    code = run()
    assert table(on, spec) == before
    assert path.read_bytes() == (kept or data)
    loads = open_sis_db(on.settings.sis_db_url).loads(on.name)
    assert [r for r in loads if r.spec_file == spec.file_name][-1].status == "refused"
    (line,) = [
        ln
        for ln in folder_log.read_lines(on.folder)[-3:]
        if f" ERROR {spec.file_name} not loaded: " in ln
    ]
    for text in expected:
        assert text in line, (text, line)
    assert line.endswith("the SIS data stays as it was")
    return line, code


def cli_run(on, ingestctl) -> Callable[[], int]:
    def run() -> int:
        result = ingestctl("loader", "run", on.name)
        assert " ERROR " in result.stdout, result
        return result.returncode

    return run


def test_a_header_repeated_mid_file_is_refused_with_its_line(site, kit, ingestctl):
    """Two exports concatenated: the second header would load as a row."""
    data = (kit.data_text(5000) + kit.data_text(10, start=5000)).encode()
    _, code = refused(
        site, site.spec, data, cli_run(site, ingestctl), f"line 5002: {REPEATED_HEADER}"
    )
    assert code == 1


def test_blank_lines_are_refused_in_a_one_column_spec_without_a_key(site, tmp_path, ingestctl):
    """The one spec where a blank line passed every check (it is one empty field)."""
    ids = approve(site, tmp_path, "ids.txt", "person_id\nA1\nA2\n", key=None)
    (site.folder.root / "ids.txt").write_text("person_id\nA1\nA2\nA3\n", encoding="utf-8")
    assert ingestctl("loader", "run", site.name).returncode == 0
    assert table(site, ids) == [("A1",), ("A2",), ("A3",)]
    data = b"person_id\nB1\n\nB2\n   \nB3\n"
    _, code = refused(
        site,
        ids,
        data,
        cli_run(site, ingestctl),
        f"line 3: {BLANK_LINE}; line 5: {BLANK_LINE}",
        "refused, 2 errors",
    )
    assert code == 1


def test_a_long_field_on_a_line_that_ends_says_the_line_is_over_the_limit(site, kit, ingestctl):
    big = "U9\t" + "x" * (17 << 20) + "\tb\tc\n"
    data = (kit.data_text(2) + big + "U8\ta\tb\tc\n").encode()
    length = len(big) - 1
    line, code = refused(
        site,
        site.spec,
        data,
        cli_run(site, ingestctl),
        f"line 4: longer than the 16 MiB limit for one line: it is {length:,} bytes",
        "up to its line end",
    )
    assert "no line end)" not in line and code == 1


def test_a_value_starting_with_a_quote_in_an_unquoted_spec_says_the_rule(site, kit, ingestctl):
    data = (kit.data_text(2) + 'U9\t"Doc" Smith\tb\tc\n').encode()
    line, code = refused(
        site,
        site.spec,
        data,
        cli_run(site, ingestctl),
        "line 4: field 2 '\"Doc\" Smith' starts with a quote mark: the approved format quotes "
        "no field, so a value may not begin with a quote",
    )
    assert "never closed" not in line and code == 1


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-16"])
def test_a_utf16_file_is_named_utf16(site, kit, ingestctl, codec):
    data = kit.data_text(3).encode(codec)
    line, code = refused(
        site, site.spec, data, cli_run(site, ingestctl), "the file is UTF-16 (", "not UTF-8"
    )
    assert "\\x00" not in line and "is now" not in line and code == 1


def test_a_file_still_being_written_is_refused_as_incomplete(site, kit, ingestctl):
    """Read while it is written in place: it ends in the middle of a row."""
    full = kit.data_text(5000).encode()
    data = full[: full.index(b"\n", 100_000) + 12]  # a row cut after 11 bytes
    cut_line = data.count(b"\n") + 1
    _, code = refused(
        site,
        site.spec,
        data,
        cli_run(site, ingestctl),
        f"line {cut_line}: the file ends in the middle of this line",
        "so it looks incomplete (was it still being written?)",
        "upload it under a temporary name and rename it to sis_hr_user_info.txt once it is "
        "complete (only complete files, renamed into place, are read",
    )
    assert code == 1


def test_a_file_completed_in_place_during_the_load_is_refused_as_changed(site, kit):
    """Written in place: cut mid-row when the load starts, completed while it reads. The load
    reads the grown file; it must be refused as changed, never as "..., valid". (The load's
    own check of the file's identity speaks first; the validator's check of the open file says
    the same where no load runs: the pre-check and approval.)"""
    full = kit.data_text(30_000).encode()
    cut = full.index(b"\n", 1_000_000) + 9  # past row 20,000: the load reads on after the
    # first progress call (10,000 rows) and finds the rest of the file there
    grown: list[int] = []

    def progress(account: str, file_name: str, rows: int) -> None:
        if not grown:
            with site.data_file.open("ab") as out:
                out.write(full[cut:])
            grown.append(rows)

    def run() -> int:
        return 0 if run_account(site.settings, site.name, progress=progress).ok else 1

    line, code = refused(
        site, site.spec, full[:cut], run, "the file changed while it was being", kept=full
    )
    assert grown and code == 1
    assert "valid" not in line.split("not loaded: ", 1)[1]
    assert "rename it" in line


def test_keys_that_differ_only_in_unicode_form_or_a_no_break_space_are_refused(
    site, kit, ingestctl
):
    nfc = "Jos\u00e9"
    nfd = unicodedata.normalize("NFD", nfc)
    rows = [f"{nfc}\ta\tb\tc", "U1\ta\tb\tc", f"{nfd}\ta\tb\tc", "U1\u00a0\ta\tb\tc"]
    data = (HEADER + "\n" + "\n".join(rows) + "\n").encode()
    _, code = refused(
        site,
        site.spec,
        data,
        cli_run(site, ingestctl),
        f"line 4: {key_problem(nfd, 'UUUID')}",
        f"line 5: {key_problem('U1' + chr(0xA0), 'UUUID')}",
        f"line 4: duplicate key UUUID: {nfd!r} is the same key as {nfc!r} on line 2",
        "line 5: duplicate key UUUID: 'U1\\xa0' is the same key as 'U1' on line 3",
    )
    assert code == 1


def test_a_sample_with_a_blank_line_or_a_second_header_is_refused_at_approval(
    site, tmp_path, ingestctl
):
    """What can never load is refused when the format is approved."""
    for name, text, said in (
        ("ids.txt", "person_id\nA1\n\nA2\n", f"line 3: {BLANK_LINE}"),
        ("more.txt", "person_id\nA1\nperson_id\nA2\n", f"line 3: {REPEATED_HEADER}"),
    ):
        sample = tmp_path / name
        sample.write_text(text, encoding="utf-8")
        result = ingestctl("spec", "approve", site.name, str(sample))
        assert result.returncode == 1, result
        assert said in result.stderr
