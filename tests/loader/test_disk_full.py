"""A full disk under the SIS database mid-load: the previous data stays whole, the file stays
in the folder, the client's log says so in words, and the next run (with space again) loads.

A real ENOSPC: the SQLite database sits on a small tmpfs (mounting needs root, as CI has).
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader.nightly import run_account
from loader.sis_db import FAILED, LOADED, open_sis_db
from loader.spec import table_name


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr!r}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


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
