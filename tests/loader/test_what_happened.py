"""Every line a run writes is true, on SQLite and PostgreSQL, through the real CLI:
a hand-edited or symlinked folder log, a file removed, completed in place or unreadable
during the load, values kept out of `loader history`, and `--force` recorded with its load.

Each test asserts the database, the file, the folder log line and the exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import INGESTCTL, REPO

from ingest_core import folder_log
from loader import nightly
from loader.sis_db import REFUSED, open_sis_db
from loader.spec import table_name

BIG = 20_000  # rows: the run reports progress every 10,000, where the tests act


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def on(request, settings, config_file, onboard):
    """An onboarded account on each backend; the CLI's config names the same database."""
    url = settings.sis_db_url
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        config_file.write_text(f'sis_db_url = "{url}"\n' + config_file.read_text())
    return onboard(settings.replace(sis_db_url=url))


def _rows(on) -> list[tuple[str, ...]]:
    return open_sis_db(on.settings.sis_db_url).table_rows(table_name(on.spec))


def _loads(on):
    return open_sis_db(on.settings.sis_db_url).loads(on.name)


def _log(on) -> list[str]:
    return folder_log.read_lines(on.folder)


def _load_first(on, kit, ingestctl, rows: int = 3) -> None:
    kit.write_data(on.data_file, rows)
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(_rows(on)) == rows


def _run_with_progress(monkeypatch, hook: Callable[[str, str, int], None]) -> None:
    """Make the CLI's run call ``hook`` as rows go in (what the progress bar sees)."""
    real = nightly.run_account

    def run_account(settings, account, force=False, progress=None, now=None):
        return real(settings, account, force=force, progress=hook, now=now)

    monkeypatch.setattr(nightly, "run_account", run_account)


# -- 5: the folder log -----------------------------------------------------------------------


def test_hand_edited_lines_break_no_run_and_are_kept(on, kit, ingestctl):
    now = datetime.now(on.settings.zone)
    old = (now - timedelta(days=on.settings.loader.log_retention_days + 5)).isoformat(
        timespec="seconds"
    )
    hand = [
        "2026-01-05T09:00:00 LOADED sis_hr_user_info.txt noted by hand (no offset)",
        "called the client about the late file",
        "",
        "yesterday: reloaded by hand",
    ]
    on.folder.log_file.write_text(
        f"{old} NO FILE sis_hr_user_info.txt old\n" + "\n".join(hand), encoding="utf-8"
    )  # saved without a final line feed
    kit.write_data(on.data_file, 5)
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(_rows(on)) == 5 and not on.data_file.exists()
    assert [r.status for r in _loads(on)] == ["loaded"]
    lines = _log(on)
    assert lines[:-1] == hand  # kept as written, the old line trimmed
    assert lines[-1].split(" ", 1)[1] == "LOADED sis_hr_user_info.txt 5 rows imported"
    assert not any(" ERROR " in line for line in lines)


def test_a_symlinked_log_is_never_followed_and_nothing_loads(on, kit, ingestctl, tmp_path):
    _load_first(on, kit, ingestctl)
    outside = tmp_path / "outside.log"
    outside.write_text("not the client's\n", encoding="utf-8")
    on.folder.log_file.unlink()
    on.folder.log_file.symlink_to(outside)
    kit.write_data(on.data_file, 5)
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 1
    assert "is a symbolic link, not a regular file" in done.stdout
    assert "nothing is loaded for this account" in done.stdout
    assert outside.read_text(encoding="utf-8") == "not the client's\n"  # never appended to
    assert on.folder.log_file.is_symlink()  # left for the operators, not repaired
    assert on.data_file.exists() and len(_rows(on)) == 3
    assert [r.status for r in _loads(on)] == ["loaded"]  # no load was even begun
    shown = ingestctl("log", on.name)
    assert shown.returncode == 1 and "not the client's" not in shown.stdout + shown.stderr
    assert "is a symbolic link" in shown.stderr and len(shown.stderr.splitlines()) == 1


# -- 6: what happened to the file during the load ---------------------------------------------


def test_a_file_removed_during_the_load_is_reported_as_removed(on, kit, ingestctl, monkeypatch):
    _load_first(on, kit, ingestctl)
    kit.write_data(on.data_file, BIG, start=100)
    _run_with_progress(monkeypatch, lambda *_: on.data_file.unlink(missing_ok=True))
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 0, done.stdout  # the client took its file back: nothing failed
    assert not on.data_file.exists() and len(_rows(on)) == 3
    line = _log(on)[-1]
    assert line.split(" ", 1)[1] == (
        "NO FILE sis_hr_user_info.txt not loaded: the file was removed from the folder while "
        "it was being loaded; nothing was changed: the SIS data stays as it was"
    )
    assert "newer copy" not in line
    last = _loads(on)[-1]
    assert last.status == "no_file" and "removed from the folder" in last.message


def test_a_file_still_written_in_place_is_reported_as_changed(on, kit, ingestctl, monkeypatch):
    """Another writer appends to the same file while it loads, and has not finished when the
    load does: the run says the file changed, not what its unfinished last line lacks."""
    _load_first(on, kit, ingestctl)
    kit.write_data(on.data_file, BIG, start=100)

    def writer(*_: object) -> None:
        with open(on.data_file, "a", encoding="utf-8", newline="") as handle:
            handle.write("U9000001\tMore\tRows\tm@example.edu\nU9000002\tHal")

    _run_with_progress(monkeypatch, writer)
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 1
    assert on.data_file.read_text(encoding="utf-8").endswith("U9000002\tHal")  # kept as is
    assert len(_rows(on)) == 3
    line = _log(on)[-1]
    assert " ERROR sis_hr_user_info.txt not loaded: the file changed while it was being loaded" in (
        line
    )
    assert "fields, expected" not in line and line.endswith("the SIS data stays as it was")
    assert _loads(on)[-1].status == REFUSED


def test_a_file_completed_in_place_after_it_was_read_is_not_called_valid(
    on, kit, ingestctl, monkeypatch
):
    """The load read a half-written last line; the writer finished before the file was read
    again for the report: the refusal says the file changed, never "valid"."""
    _load_first(on, kit, ingestctl)
    partial = kit.data_text(BIG, start=100) + "U9000001\tFirst"
    on.data_file.write_text(partial, encoding="utf-8", newline="")
    real = nightly.validate_file

    def completed_first(path, *args, **kwargs):
        with open(path, "a", encoding="utf-8", newline="") as handle:
            handle.write("\tLast\tu@example.edu\n")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(nightly, "validate_file", completed_first)
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 1
    assert on.data_file.read_text(encoding="utf-8") == partial + "\tLast\tu@example.edu\n"
    assert len(_rows(on)) == 3
    line = _log(on)[-1]
    assert "not loaded: the file changed while it was being loaded" in line
    assert "valid" not in line.replace("invalid", "")
    assert _loads(on)[-1].status == REFUSED


def _ingestctl_without_read_override(config_file: Path, workdir: Path, *args: str):
    """The CLI in a process that file permissions bind: as root, without the capabilities
    that let root read any file (a service user has none of them anyway)."""
    command = [*INGESTCTL, "--config", str(config_file), *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root's read override")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    return subprocess.run(
        command,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_a_file_the_loader_may_not_read_says_so(on, kit, ingestctl, config_file, workdir):
    _load_first(on, kit, ingestctl)
    kit.write_data(on.data_file, 5, start=100)
    on.data_file.chmod(0)
    done = _ingestctl_without_read_override(config_file, workdir, "loader", "run", on.name)
    assert done.returncode == 1, done.stderr
    assert on.data_file.exists() and on.data_file.stat().st_mode & 0o777 == 0
    assert len(_rows(on)) == 3
    line = _log(on)[-1]
    assert " ERROR sis_hr_user_info.txt not loaded: the loader is not allowed to read the file" in (
        line
    )
    assert "mode 000" in line and "upload it again" in line
    assert "could not be updated" not in line
    last = _loads(on)[-1]
    assert last.status == REFUSED and "may not read sis_hr_user_info.txt (mode 000" in last.message


# -- 7: no file values in operator channels ---------------------------------------------------


def test_history_holds_no_value_from_the_file(on, kit, ingestctl):
    _load_first(on, kit, ingestctl)
    text = kit.data_text(4).replace("U0000003\t", "U0000001\t")
    on.data_file.write_text(text, encoding="utf-8", newline="")
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 1
    assert on.data_file.exists() and len(_rows(on)) == 3
    assert "'U0000001'" in _log(on)[-1]  # the client's own log names the value
    stored = _loads(on)[-1]
    assert stored.status == REFUSED and "duplicate key" in stored.message
    assert "U0000001" not in stored.message and "'…'" in stored.message
    # and a row stored by an earlier version is shown without its values too
    db = open_sis_db(on.settings.sis_db_url)
    db.record(on.name, on.spec.file_name, table_name(on.spec), REFUSED, "line 9: key 'SECRET9'")
    history = ingestctl("loader", "history", on.name, "--json")
    assert history.returncode == 0
    assert "U0000001" not in history.stdout and "SECRET9" not in history.stdout
    assert [h["message"] for h in json.loads(history.stdout)][-1] == "line 9: key '…'"


# -- 8: --force -------------------------------------------------------------------------------


def test_force_is_recorded_with_the_load_it_let_through(on, kit, ingestctl):
    _load_first(on, kit, ingestctl, rows=10)
    none = ingestctl("loader", "run", on.name, "--force")  # no file: nothing to force
    assert none.returncode == 0 and "--force changed nothing" in none.stderr
    kit.write_data(on.data_file, 2)
    assert ingestctl("loader", "run", on.name).returncode == 1
    assert on.data_file.exists() and len(_rows(on)) == 10
    forced = ingestctl("loader", "run", on.name, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert not on.data_file.exists() and len(_rows(on)) == 2
    assert _log(on)[-1].split(" ", 1)[1] == (
        "LOADED sis_hr_user_info.txt 2 rows imported (0 new, 8 gone, 0 changed; forced past the "
        "row-count guard by an operator)"
    )
    history = json.loads(ingestctl("loader", "history", on.name, "--json").stdout)
    load = history[-1]
    assert load["status"] == "loaded" and load["rows"] == 2
    assert load["message"].startswith("forced past the row-count guard by an operator: 2 rows")
    assert not any(h["message"].startswith("forced") for h in history[:-1])
    audit = json.loads(ingestctl("audit", on.name, "--json").stdout)
    (entry,) = [e for e in audit if e["action"] == "loader.force"]
    assert entry["detail"]["load_id"] == load["id"]
    assert entry["detail"]["file"] == "sis_hr_user_info.txt" and entry["detail"]["rows"] == 2


def test_force_on_an_invalid_file_audits_nothing(on, kit, ingestctl):
    _load_first(on, kit, ingestctl, rows=10)
    on.data_file.write_text("UUUID\tfirst_name\nU1\tx\n", encoding="utf-8")
    done = ingestctl("loader", "run", on.name, "--force")
    assert done.returncode == 1
    assert on.data_file.exists() and len(_rows(on)) == 10
    assert " ERROR sis_hr_user_info.txt not loaded" in _log(on)[-1]
    audit = json.loads(ingestctl("audit", on.name, "--json").stdout)
    assert not [e for e in audit if e["action"] == "loader.force"]


def test_force_without_an_account_is_a_usage_error(on, kit, ingestctl):
    kit.write_data(on.data_file, 3)
    done = ingestctl("loader", "run", "--force")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "--force needs the account name" in done.stderr
    assert on.data_file.exists() and _log(on) == []
    assert _loads(on) == []
