"""The folder log with any file name: one event is one line for every reader, nothing raises,
nothing is forged."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from ingest_core import folder_log
from ingest_core.folders import AccountFolder, create_account_folder
from ingest_core.settings import Settings

NY = ZoneInfo("America/New_York")
FORGED = "2026-11-23T03:00:01-05:00 LOADED sis_hr_user_info.txt 48,213 rows imported"
# Every separator str.splitlines() knows, and the ones seen to forge entries.
SEPARATORS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.fixture
def folder(settings: Settings) -> AccountFolder:
    return create_account_folder(settings, "uni")


@pytest.mark.parametrize("separator", SEPARATORS)
def test_a_name_holding_a_line_separator_forges_no_entry(
    folder: AccountFolder, separator: str
) -> None:
    name = f"x.txt{separator}{FORGED}"
    folder_log.append(folder, NY, "ERROR", name, f"not loaded{separator}{FORGED}")
    data = folder.log_file.read_bytes()
    text = data.decode("utf-8")  # strict: always UTF-8 on disk
    assert len(text.splitlines()) == 1  # even a reader that splits eagerly sees one line
    (line,) = folder_log.read_lines(folder)
    entry = folder_log.parse_line(line)
    assert entry["status"] == "ERROR"
    assert entry["file"].startswith("x.txt\\") and entry["file"].endswith(FORGED)
    assert not any(c in line for c in "".join(SEPARATORS))


def test_a_name_that_is_not_utf8_is_written_escaped(folder: AccountFolder) -> None:
    name = os.fsdecode(b"\xff\xfe-x.txt")
    line = folder_log.append(folder, NY, "ERROR", name, "not loaded: \x1b[31mred")
    assert "ERROR \\xff\\xfe-x.txt not loaded: \\x1b[31mred" in line
    assert folder.log_file.read_bytes().decode("utf-8") == line


def test_the_reader_splits_on_line_feeds_only(folder: AccountFolder) -> None:
    """A log written before names were escaped (or edited by hand) still reads one event
    per line: a raw U+2028 or NEL inside a line does not start another."""
    raw = (
        f"2026-11-22T03:00:01-05:00 ERROR a\u2028{FORGED} x\n"
        "2026-11-22T03:00:02-05:00 NO FILE - y\x85z\n"
    )
    folder.log_file.write_bytes(raw.encode("utf-8"))
    lines = folder_log.read_lines(folder)
    assert len(lines) == 2
    assert [folder_log.parse_line(ln)["status"] for ln in lines] == ["ERROR", "NO FILE"]


def test_undecodable_bytes_in_the_log_are_read_and_kept_by_a_trim(folder: AccountFolder) -> None:
    now = datetime(2027, 6, 1, 12, tzinfo=UTC)
    old = (now - timedelta(days=500)).astimezone(NY).isoformat(timespec="seconds")
    recent = (now - timedelta(days=1)).astimezone(NY).isoformat(timespec="seconds")
    kept = f"{recent} ERROR bad-\xff.txt kept".encode("latin-1")
    folder.log_file.write_bytes(f"{old} LOADED a.txt old\n".encode() + kept + b"\n")
    lines = folder_log.read_lines(folder)
    assert lines[1] == os.fsdecode(kept)
    assert folder_log.trim(folder, 400, now) == 1
    assert folder.log_file.read_bytes() == kept + b"\n"  # byte for byte
