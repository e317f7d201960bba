"""The nightly run: no file, good file, bad file, misnamed file, in-flight files, the row-count
guard, a file arriving mid-run, one run per account, accounts independent."""

from __future__ import annotations

import os
import threading

import pytest

from ingest_core import folder_log
from ingest_core.folders import lock_path
from ingest_core.structured_log import read_events
from loader.nightly import account_lock, run_account, run_accounts
from loader.sis_db import open_sis_db
from loader.spec import table_name


def _log(on) -> list[str]:
    return folder_log.read_lines(on.folder)


def _table(on) -> list[tuple[str, ...]]:
    return open_sis_db(on.settings.sis_db_url).table_rows(table_name(on.spec))


def test_no_file_logs_no_file_and_changes_nothing(acme):
    result = run_account(acme.settings, acme.name)
    assert result.ok
    (line,) = _log(acme)
    assert " NO FILE sis_hr_user_info.txt no file received" in line
    assert line[:19].count("T") == 1 and line[19:25] in ("-05:00", "-04:00")
    loads = open_sis_db(acme.settings.sis_db_url).loads(acme.name)
    assert [r.status for r in loads] == ["no_file"]
    events = read_events(acme.settings.log_dir, "loader")
    assert any(e["event"] == "load_no_file" and e["account"] == "acme" for e in events)


def test_good_file_is_loaded_then_deleted_and_logged(acme, kit):
    kit.write_data(acme.data_file, 7)
    assert run_account(acme.settings, acme.name).ok
    assert len(_table(acme)) == 7
    assert not acme.data_file.exists()
    assert _log(acme)[-1].split(" ", 1)[1] == "LOADED sis_hr_user_info.txt 7 rows imported"
    done = [e for e in read_events(acme.settings.log_dir, "loader") if e["event"] == "load_done"]
    assert done[-1]["rows"] == 7 and done[-1]["deleted"] is True


def test_invalid_file_stays_and_the_error_names_the_line(acme, kit):
    kit.write_data(acme.data_file, 3)
    assert run_account(acme.settings, acme.name).ok
    text = kit.data_text(5).replace("U0000003\tFirst3", "U0000003\tFirst3\textra")
    acme.data_file.write_text(text, encoding="utf-8", newline="")
    result = run_account(acme.settings, acme.name)
    assert not result.ok
    assert acme.data_file.read_text(encoding="utf-8") == text
    assert len(_table(acme)) == 3
    line = _log(acme)[-1]
    assert " ERROR sis_hr_user_info.txt not loaded: " in line
    assert "line 5: 5 fields, expected 4" in line
    assert line.endswith("the SIS data stays as it was")


def test_a_near_miss_of_the_missing_approved_file_is_its_error_and_stays(acme, kit):
    """The approved file did not come and a near miss of its name did: the approved file's
    line is an ERROR naming it (the one stray that fails the run)."""
    wrong = acme.folder.root / "SIS_HR_User_Info.txt"
    kit.write_data(wrong, 3)
    result = run_account(acme.settings, acme.name)
    assert not result.ok
    assert wrong.exists()
    (error,) = _log(acme)
    assert " ERROR sis_hr_user_info.txt not loaded: no sis_hr_user_info.txt; found " in error
    assert "found SIS_HR_User_Info.txt (the name differs in upper/lower case): rename it" in error


def test_in_flight_files_are_never_picked_up(acme, kit):
    names = [
        ".ingest-upload-abc-sis_hr_user_info.txt",
        "sis_hr_user_info.txt.filepart",
        ".ingest-pool-x",
    ]
    for name in names:
        kit.write_data(acme.folder.root / name, 3)
    assert run_account(acme.settings, acme.name).ok
    assert all((acme.folder.root / n).exists() for n in names)
    assert [line.split(" ")[1] for line in _log(acme)] == ["NO"]  # NO FILE, nothing else


def test_row_count_guard_refuses_a_big_drop_and_force_overrides_it_once(acme, kit):
    kit.write_data(acme.data_file, 100)
    assert run_account(acme.settings, acme.name).ok
    kit.write_data(acme.data_file, 49)
    result = run_account(acme.settings, acme.name)
    assert not result.ok
    assert acme.data_file.exists() and len(_table(acme)) == 100
    assert "49 data rows, less than 50% of the 100 rows loaded" in _log(acme)[-1]
    assert "--force" in _log(acme)[-1]

    kit.write_data(acme.data_file, 50)  # exactly half passes
    assert run_account(acme.settings, acme.name).ok
    assert len(_table(acme)) == 50

    kit.write_data(acme.data_file, 10)
    assert not run_account(acme.settings, acme.name).ok
    assert run_account(acme.settings, acme.name, force=True).ok
    assert len(_table(acme)) == 10
    kit.write_data(acme.data_file, 2)  # the guard is back for the next run
    assert not run_account(acme.settings, acme.name).ok


def test_guard_share_comes_from_settings(settings, onboard, kit):
    loose = onboard(settings.replace(loader=settings.loader.__class__(min_row_share=0.0)))
    kit.write_data(loose.data_file, 100)
    assert run_account(loose.settings, loose.name).ok
    kit.write_data(loose.data_file, 1)
    assert run_account(loose.settings, loose.name).ok


def test_a_newer_copy_arriving_mid_load_is_the_one_loaded(acme, kit):
    kit.write_data(acme.data_file, 20_000)
    swapped = []

    def progress(account, file_name, rows):
        if not swapped:  # the client re-uploads while we are reading the old copy
            kit.upload(acme.folder, acme.spec.file_name, kit.data_text(20_000, tag="new"))
            swapped.append(rows)

    result = run_account(acme.settings, acme.name, progress=progress)
    assert result.ok, result.summary()
    assert swapped
    rows = _table(acme)
    assert len(rows) == 20_000 and rows[0][1] == "First0new"
    assert not acme.data_file.exists()


def test_a_file_replaced_again_and_again_stays_and_nothing_changes(acme, kit):
    kit.write_data(acme.data_file, 3)
    assert run_account(acme.settings, acme.name).ok
    kit.write_data(acme.data_file, 20_000)

    def progress(account, file_name, rows):
        kit.upload(acme.folder, acme.spec.file_name, kit.data_text(20_000, tag=str(rows)))

    result = run_account(acme.settings, acme.name, progress=progress)
    assert not result.ok
    assert acme.data_file.exists() and len(_table(acme)) == 3
    assert "a newer copy of the file arrived during the load" in _log(acme)[-1]


def test_a_new_file_arriving_mid_run_is_left_for_the_next_run(acme, onboard, settings, kit):
    kit.write_data(acme.data_file, 20_000)
    late = acme.folder.root / "custom_fields.txt"

    def progress(account, file_name, rows):
        if not late.exists():
            kit.upload(acme.folder, late.name, kit.data_text(3))

    assert run_account(acme.settings, acme.name, progress=progress).ok
    assert late.exists()  # not in the run's snapshot: untouched, no line about it
    assert not any("custom_fields.txt" in line for line in _log(acme))


def test_two_runs_of_one_account_never_overlap(acme, kit):
    kit.write_data(acme.data_file, 5)
    with account_lock(acme.settings, acme.name) as got:
        assert got
        other = run_account(acme.settings, acme.name)
        # not a failure: the run holding the lock does the work; nothing is written
        assert other.busy and other.ok
        assert other.skipped == "acme: another run of this account is running"
        assert acme.data_file.exists() and not _log(acme)
        # and from another thread too (the daemon and a manual run in one process)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(run_account(acme.settings, "acme")))
        thread.start()
        thread.join()
        assert seen[0].busy
    assert run_account(acme.settings, acme.name).ok


def test_one_account_crashing_does_not_stop_the_others(settings, onboard, kit):
    broken = onboard(settings, "broken")
    good = onboard(settings, "good")
    kit.write_data(broken.data_file, 3)
    kit.write_data(good.data_file, 3)
    os.makedirs(lock_path(settings, "broken"))  # the lock cannot be opened: a crash
    results = {r.account: r for r in run_accounts(settings)}
    assert results["broken"].crashed and not results["broken"].ok
    assert results["good"].ok
    assert broken.data_file.exists() and not good.data_file.exists()
    assert "a problem on our side" in folder_log.read_lines(broken.folder)[-1]


def test_force_needs_account_names(acme):
    from ingest_core.errors import Refused

    with pytest.raises(Refused, match="name the account"):
        run_accounts(acme.settings, None, force=True)


def test_log_is_trimmed_to_the_retention(acme):
    from datetime import datetime, timedelta

    now = datetime.now(acme.settings.zone)
    old = now - timedelta(days=acme.settings.loader.log_retention_days + 1)
    folder_log.append(acme.folder, acme.settings.zone, "NO FILE", "x", "old", when=old)
    folder_log.append(acme.folder, acme.settings.zone, "NO FILE", "x", "recent", when=now)
    run_account(acme.settings, acme.name)
    lines = _log(acme)
    assert not any(line.endswith(" old") for line in lines)
    assert any(line.endswith(" recent") for line in lines)


def test_sis_database_unreachable_keeps_the_file_and_says_so(acme, kit):
    kit.write_data(acme.data_file, 3)
    down = acme.settings.replace(sis_db_url="sqlite:////proc/no-such-dir/sis.db")
    result = run_account(down, acme.name)
    assert not result.ok and result.crashed
    assert acme.data_file.exists()
    line = _log(acme)[-1]
    assert " ERROR - the load stopped because of a problem on our side" in line
    assert "/proc" not in line  # internals go to the operators, not the client's log
    assert run_account(acme.settings, acme.name).ok  # and the next run loads it
    assert not acme.data_file.exists()


def test_the_second_specs_file_arriving_during_the_first_load_loads_in_the_same_run(
    acme, kit, tmp_path
):
    from ingest_core.registry import Registry
    from loader.approval import approve_spec

    sample = tmp_path / "custom_fields.txt"
    sample.write_text("UUUID\tprogram\nU1\tX\n", encoding="utf-8")
    custom = approve_spec(Registry(acme.settings, actor="test"), acme.name, sample, key="UUUID")
    kit.write_data(acme.data_file, 20_000)
    arrived = acme.folder.root / custom.file_name

    def progress(account, file_name, rows):
        if file_name == acme.spec.file_name and not arrived.exists():
            kit.upload(acme.folder, custom.file_name, "UUUID\tprogram\nU1\tA\nU2\tB\n")

    result = run_account(acme.settings, acme.name, progress=progress)
    assert result.ok, result.summary()
    assert [(o.status, o.file_name, o.rows) for o in result.outcomes] == [
        ("LOADED", "sis_hr_user_info.txt", 20_000),
        ("LOADED", "custom_fields.txt", 2),
    ]
    assert not arrived.exists()
