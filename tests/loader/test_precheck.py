"""On-arrival pre-check with a real watchdog observer and a real rename into the folder."""

from __future__ import annotations

import time

from ingest_core import folder_log
from loader.precheck import PreCheckWatcher, precheck_file


def _wait_for_lines(folder, count: int, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = folder_log.read_lines(folder)
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    return folder_log.read_lines(folder)


def test_renamed_upload_gets_a_received_line_and_is_neither_loaded_nor_deleted(acme, kit):
    watcher = PreCheckWatcher(acme.settings)
    watcher.start()
    try:
        # in flight only: no line
        tmp = acme.folder.upload_temp("abc")
        tmp.write_text(kit.data_text(12), encoding="utf-8", newline="")
        assert watcher.idle()
        # the server's rename into place: one RECEIVED line
        tmp.rename(acme.data_file)
        (line,) = _wait_for_lines(acme.folder, 1)
        assert " RECEIVED sis_hr_user_info.txt passed the checks: 12 rows; it will load at " in line
        assert line.rstrip().endswith(("T03:00-05:00", "T03:00-04:00"))

        bad = kit.data_text(5).replace("U0000002", "U0000001")  # duplicate key
        kit.upload(acme.folder, acme.spec.file_name, bad)
        lines = _wait_for_lines(acme.folder, 2)
        assert len(lines) == 2
        assert " RECEIVED sis_hr_user_info.txt will NOT load: " in lines[1]
        assert "line 4: duplicate key UUUID 'U0000001' (also on line 3" in lines[1]
    finally:
        watcher.stop()
    assert acme.data_file.read_text(encoding="utf-8") == bad  # never deleted
    assert all(" LOADED " not in line for line in folder_log.read_lines(acme.folder))


def test_unknown_name_pre_check_says_which_name_is_approved(acme, kit):
    path = kit.upload(acme.folder, "sis_hr_user_info.csv", kit.data_text(2))
    line = precheck_file(acme.settings, path)
    assert line is not None
    assert "RECEIVED sis_hr_user_info.csv will NOT load" in line
    assert "did you mean sis_hr_user_info.txt" in line


def test_pre_check_ignores_service_files_and_foreign_folders(acme, kit, settings):
    assert precheck_file(settings, acme.folder.log_file) is None
    assert precheck_file(settings, acme.folder.root / ".ingest-upload-x-a.txt") is None
    stray = settings.data_root / "accounts" / "nobody"
    stray.mkdir()
    (stray / "a.txt").write_text(kit.data_text(2), encoding="utf-8")
    assert precheck_file(settings, stray / "a.txt") is None


def test_pre_check_warns_when_the_row_count_guard_will_refuse(acme, kit):
    from loader.nightly import run_account

    kit.write_data(acme.data_file, 100)
    assert run_account(acme.settings, acme.name).ok
    path = kit.upload(acme.folder, acme.spec.file_name, kit.data_text(10))
    line = precheck_file(acme.settings, path)
    assert line is not None
    assert "will NOT load: it has 10 data rows, less than 50% of the 100 rows" in line


def test_loader_daemon_command_prechecks_in_a_child_and_stops_on_sigterm(
    acme, kit, config_file, workdir
):
    import signal

    from conftest import start_loader_daemon

    from ingest_core.structured_log import read_events

    def events() -> list[str]:
        return [e["event"] for e in read_events(acme.settings.log_dir, "loader")]

    daemon = start_loader_daemon(workdir, config_file)
    try:
        deadline = time.monotonic() + 30
        while "daemon_started" not in events() and time.monotonic() < deadline:
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            time.sleep(0.05)
        kit.upload(acme.folder, acme.spec.file_name, kit.data_text(6))
        (line,) = _wait_for_lines(acme.folder, 1, timeout=30)
        assert "RECEIVED sis_hr_user_info.txt passed the checks: 6 rows" in line
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert "daemon_stopped" in events()
    assert acme.data_file.exists()  # first start: no catch-up load, and a pre-check never loads


def test_an_account_created_while_the_watcher_runs_is_watched_too(settings, onboard, kit):
    watcher = PreCheckWatcher(settings)
    watcher.start()
    try:
        late = onboard(settings, "late")  # folder made after the observer started
        kit.upload(late.folder, late.spec.file_name, kit.data_text(3))
        (line,) = _wait_for_lines(late.folder, 1)
    finally:
        watcher.stop()
    assert "RECEIVED sis_hr_user_info.txt passed the checks: 3 rows" in line
