"""A full disk mid-load or mid-publish: the previous data stays whole, the file stays in the
folder, the client's log says so in words when it can, and the next run (with space again)
works. A real ENOSPC: a small tmpfs (the ``small_disk`` fixture).
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

from conftest import fill_disk

from loader.nightly import run_account
from loader.pool import import_ids, publish_pool
from loader.sis_db import FAILED, LOADED, open_sis_db
from loader.spec import table_name


def test_disk_full_during_a_load_keeps_the_previous_data_and_the_file(
    settings, onboard, kit, small_disk: Path
) -> None:
    database = small_disk / "sis.db"
    on = onboard(settings.replace(sis_db_url=f"sqlite:///{database}"), "fulldisk")
    kit.write_data(on.data_file, 50)
    assert run_account(on.settings, on.name).ok
    table = table_name(on.spec)

    def live_rows() -> list[tuple[str, ...]]:
        with sqlite3.connect(database) as conn:  # a reader of its own, not the loader's
            return conn.execute(f'SELECT * FROM "{table}"').fetchall()

    before = live_rows()
    assert len(before) == 50
    kit.write_data(on.data_file, 60_000, start=1000)  # ~4 MB of rows: more than the disk
    result = run_account(on.settings, on.name)
    assert not result.ok
    assert on.data_file.exists()  # never deleted without a commit
    assert live_rows() == before
    line = on.folder.log_file.read_text().splitlines()[-1]
    assert " ERROR " in line and "could not be updated" in line, line
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    statuses = [r.status for r in open_sis_db(on.settings.sis_db_url).loads(on.name)]
    assert statuses[-1] == FAILED
    # Space again (a smaller file here): the next run loads and deletes it.
    kit.write_data(on.data_file, 5_000, start=1000)
    assert run_account(on.settings, on.name).ok
    assert not on.data_file.exists()
    assert len(live_rows()) == 5_000
    assert open_sis_db(on.settings.sis_db_url).loads(on.name)[-1].status == LOADED


def test_pool_publish_on_a_full_folder_keeps_the_previous_pool_file(
    settings, onboard, small_disk: Path, tmp_path: Path
) -> None:
    """The pool file is replaced whole or not at all; with the disk too full even for the
    ERROR line, the publish still fails cleanly (the operators hear of it) and the log holds
    no half line; with room again, the next publish works."""
    on = onboard(settings, "poolfull", deferred_fetch=True)
    subprocess.run(["mount", "--bind", str(small_disk), str(on.folder.root)], check=True)
    try:
        ids = tmp_path / "ids.txt"
        ids.write_text("K1\nK2\n")
        import_ids(on.settings, on.name, ids)
        assert publish_pool(on.settings, on.name).ok
        too_many = tmp_path / "too_many.txt"  # a 3.6 MB pool file: more than the disk
        too_many.write_text("".join(f"U{i:09d}\n" for i in range(300_000)))
        import_ids(on.settings, on.name, too_many)
        assert not publish_pool(on.settings, on.name).ok
        assert on.folder.pool_file.read_bytes() == b"K1\r\nK2\r\n"
        assert " ERROR applicant_pool.txt the pool file was not updated" in _last_line(on)
        many = tmp_path / "many.txt"  # 1.2 MB: fits, once there is room
        many.write_text("".join(f"U{i:09d}\n" for i in range(100_000)))
        import_ids(on.settings, on.name, many)
        with open(on.folder.log_file, "ab") as log:  # end the log on a page boundary:
            log.write(b"#" * (-(log.tell() + 1) % 4096) + b"\n")  # no room left even there
        filler = fill_disk(small_disk)
        log_before = on.folder.log_file.read_bytes()
        result = publish_pool(on.settings, on.name)
        assert not result.ok and "No space left" in result.message
        assert on.folder.pool_file.read_bytes() == b"K1\r\nK2\r\n"
        assert on.folder.log_file.read_bytes() == log_before
        assert sorted(p.name for p in small_disk.iterdir() if p.name.startswith(".ingest-p")) == []
        filler.unlink()
        assert publish_pool(on.settings, on.name).ok
        assert on.folder.pool_file.stat().st_size == 100_000 * 12
        assert " POOL applicant_pool.txt 100,000 active applicant IDs" in _last_line(on)
    finally:
        subprocess.run(["umount", str(on.folder.root)], check=False)


def _last_line(on) -> str:
    return on.folder.log_file.read_text().splitlines()[-1]


def test_a_load_the_log_cannot_record_keeps_its_file_for_the_next_run(
    settings, onboard, kit, small_disk: Path
) -> None:
    """The folder's disk is full when the LOADED line is due: the load is committed, but the
    file is deleted only once the client has been told, so it stays; the next run (with room
    again) loads it again and the log says so. No night's load goes unreported."""
    on = onboard(settings, "logfull")
    subprocess.run(["mount", "--bind", str(small_disk), str(on.folder.root)], check=True)
    try:
        kit.write_data(on.data_file, 50)
        assert run_account(on.settings, on.name).ok
        kit.write_data(on.data_file, 40, start=500)
        with open(on.folder.log_file, "ab") as log:  # end the log on a page boundary
            log.write(b"#" * (-(log.tell() + 1) % 4096) + b"\n")
        log_before = on.folder.log_file.read_bytes()
        filler = fill_disk(small_disk, ".filler")  # hidden: not a file the loader looks at
        result = run_account(on.settings, on.name)
        assert result.crashed and "No space left" in result.crashed
        assert len(open_sis_db(on.settings.sis_db_url).table_rows(table_name(on.spec))) == 40
        assert on.data_file.exists()  # the client was not told: the file stays
        assert on.folder.log_file.read_bytes() == log_before
        filler.unlink()
        assert run_account(on.settings, on.name).ok
        assert not on.data_file.exists()
        assert _last_line(on).endswith(
            " LOADED sis_hr_user_info.txt 40 rows imported (0 new, 0 gone, 0 changed)"
        )
    finally:
        subprocess.run(["umount", str(on.folder.root)], check=False)
