"""The account folder's result log: one whole line per event, appended durably, trimmed safely."""

from __future__ import annotations

import multiprocessing
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from ingest_core import folder_log
from ingest_core.folders import (
    AccountFolder,
    account_folder,
    create_account_folder,
    is_data_file_name,
)
from ingest_core.settings import Settings

NY = ZoneInfo("America/New_York")


@pytest.fixture
def folder(settings: Settings) -> AccountFolder:
    return create_account_folder(settings, "uni")


def test_line_format_has_offset_status_file_and_detail(folder: AccountFolder) -> None:
    when = datetime(2026, 3, 8, 7, 30, tzinfo=UTC)
    line = folder_log.append(
        folder, NY, "LOADED", "sis_hr_user_info.txt", "12345 rows imported", when=when
    )
    assert line == "2026-03-08T03:30:00-04:00 LOADED sis_hr_user_info.txt 12345 rows imported\n"
    folder_log.append(folder, NY, "NO FILE", "", "no data file was received", when=when)
    assert folder_log.read_lines(folder)[-1].endswith("NO FILE - no data file was received")


def test_a_detail_with_newlines_stays_one_line(folder: AccountFolder) -> None:
    folder_log.append(folder, NY, "ERROR", "x.txt", "line 3: bad\nline 9: worse\r\n")
    assert len(folder_log.read_lines(folder)) == 1
    with pytest.raises(ValueError):
        folder_log.append(folder, NY, "MAYBE", "x.txt", "unknown status")


def _append_many(root: str, n: int, tag: str) -> None:
    folder = AccountFolder("uni", Path(root))
    for i in range(n):
        folder_log.append(folder, NY, "RECEIVED", f"{tag}.txt", f"{tag} event {i} " + "x" * 300)


def test_concurrent_writers_never_interleave(folder: AccountFolder) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_append_many, args=(str(folder.root), 200, f"w{i}")) for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = folder_log.read_lines(folder)
    assert len(lines) == 800
    assert all(" RECEIVED w" in ln and ln.endswith("x" * 300) for ln in lines)


def test_trim_drops_only_old_lines_and_keeps_unreadable_ones(folder: AccountFolder) -> None:
    now = datetime(2027, 6, 1, 12, tzinfo=UTC)
    folder_log.append(folder, NY, "LOADED", "a.txt", "old", when=now - timedelta(days=500))
    folder_log.append(folder, NY, "LOADED", "a.txt", "recent", when=now - timedelta(days=10))
    with open(folder.log_file, "a") as handle:
        handle.write("hand-edited line with no timestamp\n")
    inode = folder.log_file.stat().st_ino
    assert folder_log.trim(folder, 400, now) == 1
    lines = folder_log.read_lines(folder)
    assert [ln.split(" ", 2)[-1] for ln in lines[:1]] == ["a.txt recent"]
    assert lines[1] == "hand-edited line with no timestamp"
    assert folder.log_file.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert folder_log.trim(folder, 400, now) == 0


def test_a_trim_killed_midway_leaves_nothing_in_the_way(folder: AccountFolder) -> None:
    """A trim killed before its rename leaves its temporary file; the next trim (same
    process id, as after a restart) removes it instead of failing on it forever."""
    now = datetime(2027, 6, 1, 12, tzinfo=UTC)
    folder_log.append(folder, NY, "LOADED", "a.txt", "old", when=now - timedelta(days=500))
    folder_log.append(folder, NY, "LOADED", "a.txt", "recent", when=now - timedelta(days=10))
    folder.log_trim_temp().write_text("half of a trimmed log")
    assert folder_log.trim(folder, 400, now) == 1
    assert [ln.split(" ", 2)[-1] for ln in folder_log.read_lines(folder)] == ["a.txt recent"]
    assert sorted(p.name for p in folder.root.iterdir()) == sorted(
        [folder.log_file.name, folder.log_lock.name]
    )


def test_service_files_are_never_data_files(settings: Settings) -> None:
    folder = account_folder(settings, "uni")
    assert not is_data_file_name(folder.log_file.name)
    assert not is_data_file_name(folder.pool_file.name)
    assert not is_data_file_name(folder.upload_temp("abc").name)
    assert not is_data_file_name("data.txt.filepart")
    assert not is_data_file_name(folder.log_lock.name)
    assert is_data_file_name("sis_hr_user_info.txt")


def test_lines_parse_back_even_with_spaces_in_file_names(folder: AccountFolder) -> None:
    when = datetime(2026, 11, 3, 8, 0, tzinfo=UTC)
    for status, name, detail in (
        ("LOADED", "sis_hr_user_info.txt", "10 rows imported"),
        ("NO FILE", "sis_hr_user_info.txt", "no file received"),
        ("ERROR", "SIS export (final).csv", "not an approved file name"),
        ("ERROR", '"quoted".txt', "odd name"),
        ("POOL", "", "0 active applicant IDs"),
    ):
        line = folder_log.append(folder, NY, status, name, detail, when=when).rstrip("\n")
        assert folder_log.parse_line(line) == {
            "time": "2026-11-03T03:00:00-05:00",
            "status": status,
            "file": name or "-",
            "detail": detail,
        }


def test_an_append_cut_short_by_a_full_disk_is_taken_back(
    settings: Settings, small_disk: Path
) -> None:
    """A full disk can let half a line through (the log's last page had room for a few
    bytes): that half is cut off again, so the next line never runs into it."""
    from conftest import fill_disk

    folder = AccountFolder("small", small_disk)
    before = b"x" * (4096 - 20 - 1) + b"\n"  # 20 bytes left in the log's last page
    folder.log_file.write_bytes(before)
    filler = fill_disk(small_disk)
    with pytest.raises(OSError):
        folder_log.append(folder, NY, "LOADED", "sis_hr_user_info.txt", "48,213 rows imported")
    assert folder.log_file.read_bytes() == before
    filler.unlink()
    line = folder_log.append(folder, NY, "LOADED", "sis_hr_user_info.txt", "48,213 rows imported")
    assert folder.log_file.read_bytes() == before + line.encode()


# -- hand edits, links and odd files ----------------------------------------------------------


def test_lines_without_an_aware_timestamp_are_kept_and_never_compared(
    folder: AccountFolder,
) -> None:
    """A naive timestamp once made every later trim raise (naive vs aware); such a line, or
    one with no or an unreadable timestamp, is kept as written and ignored by the trim."""
    now = datetime(2027, 6, 1, 12, tzinfo=UTC)
    odd = [
        "2020-01-01T03:00:00 LOADED a.txt typed by hand, no offset",
        "2020-13-45T99:00:00-05:00 ERROR a.txt unreadable date",
        "0001-01-01T00:00:00+14:00x note",
        "\xff\x00 binary-ish",
        "",
        "just a note",
    ]
    folder_log.append(folder, NY, "LOADED", "a.txt", "old", when=now - timedelta(days=500))
    with open(folder.log_file, "a", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write("\n".join(odd) + "\n")
    assert folder_log.trim(folder, 400, now) == 1
    assert folder_log.read_lines(folder) == odd
    assert [folder_log.line_time(line) for line in odd] == [None] * len(odd)
    assert folder_log.parse_line(odd[0]) == {
        "time": "",
        "status": "",
        "file": "",
        "detail": odd[0],
    }


def test_a_log_saved_without_a_final_line_feed_gets_one_before_the_next_event(
    folder: AccountFolder,
) -> None:
    folder.log_file.write_bytes(b"note added by hand")
    line = folder_log.append(folder, NY, "NO FILE", "a.txt", "no file received")
    assert folder.log_file.read_bytes() == b"note added by hand\n" + line.encode()
    assert folder_log.read_lines(folder) == ["note added by hand", line.rstrip("\n")]


def test_a_symlinked_log_is_neither_written_nor_read_through(
    folder: AccountFolder, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("secret\n")
    folder.log_file.symlink_to(outside)
    with pytest.raises(folder_log.UnsafeLogFile, match="is a symbolic link, not a regular file"):
        folder_log.append(folder, NY, "LOADED", "a.txt", "1 rows imported")
    with pytest.raises(folder_log.UnsafeLogFile):
        folder_log.read_lines(folder)
    with pytest.raises(folder_log.UnsafeLogFile):
        folder_log.check_writable(folder)
    with pytest.raises(OSError):  # and so, never trimmed into the client's folder either
        folder_log.trim(folder, 400, datetime.now(UTC))
    assert outside.read_text() == "secret\n"
    assert folder.log_file.is_symlink()
    dangling = tmp_path / "not-yet"
    folder.log_file.unlink()
    folder.log_file.symlink_to(dangling)
    with pytest.raises(folder_log.UnsafeLogFile):
        folder_log.append(folder, NY, "LOADED", "a.txt", "1 rows imported")
    assert not dangling.exists()  # O_CREAT never made the link's target


def test_a_fifo_or_folder_in_place_of_the_log_is_refused_without_blocking(
    folder: AccountFolder,
) -> None:
    os.mkfifo(folder.log_file)
    with pytest.raises(folder_log.UnsafeLogFile, match="a FIFO"):
        folder_log.append(folder, NY, "LOADED", "a.txt", "1 rows imported")
    with pytest.raises(folder_log.UnsafeLogFile, match="a FIFO"):
        folder_log.read_lines(folder)
    folder.log_file.unlink()
    folder.log_file.mkdir()
    with pytest.raises(folder_log.UnsafeLogFile, match="a folder"):
        folder_log.append(folder, NY, "LOADED", "a.txt", "1 rows imported")


def test_a_symlinked_log_lock_is_not_followed(folder: AccountFolder, tmp_path: Path) -> None:
    target = tmp_path / "lock-target"
    folder.log_lock.symlink_to(target)
    with pytest.raises(OSError):
        folder_log.append(folder, NY, "LOADED", "a.txt", "1 rows imported")
    assert not target.exists()
