"""``ingestctl status``, every feed at a glance, worst first.

Real control and SIS databases (SQLite, and PostgreSQL for one case), real folders, loads
driven through the nightly run with an injected clock, and uploads recorded in the activity
journal as the server's journal writer records them (a real upload through a real server:
tests/test_serve.py).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nights import Nights
from sqlalchemy import update

from ingest_core.db import AccountKey, open_control_db, utcnow
from ingest_core.folders import account_folder
from ingest_core.journal import journal_row, record_rows
from ingest_core.registry import Registry
from ingest_core.settings import KeyPolicySettings
from ingest_core.structured_log import iter_events
from loader.approval import approve_spec
from loader.feed_status import feed_status
from loader.nightly import run_account

LOCAL_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$"


def _nights(on, clock: Nights, nights) -> None:
    for night in nights:
        clock.night = night
        run_account(on.settings, on.name, now=clock)


def _duplicate_key_file(kit, on) -> None:
    lines = kit.data_text(5).splitlines(keepends=True)
    on.data_file.write_text("".join([*lines, lines[2]]), encoding="utf-8", newline="")


@pytest.fixture
def feeds(settings, onboard, kit):
    """One account in each state (missing_file_runs is 2, the default)."""
    clock = Nights(settings.zone)
    made = {name: onboard(settings, name) for name in ("okay", "late", "slow", "broken", "newbie")}
    made["off"] = onboard(settings, "off")
    Registry(settings, actor="test").create_account("bare")  # no approved spec yet

    kit.write_data(made["okay"].data_file, 5)
    _nights(made["okay"], clock, [0])
    kit.write_data(made["late"].data_file, 3)
    _nights(made["late"], clock, [0, 1, 2, 3])
    kit.write_data(made["slow"].data_file, 3)
    _nights(made["slow"], clock, [0, 1, 2])
    kit.write_data(made["broken"].data_file, 4)
    _nights(made["broken"], clock, [0])
    _duplicate_key_file(kit, made["broken"])
    _nights(made["broken"], clock, [1])
    _nights(made["newbie"], clock, [0, 1, 2])
    kit.write_data(made["off"].data_file, 2)
    _nights(made["off"], clock, [0])
    Registry(settings, actor="test").set_status("off", "disabled")
    return made


def test_each_state_worst_first(settings, feeds):
    rows = feed_status(settings)

    assert [(r.account, r.state, r.runs_missed) for r in rows] == [
        ("broken", "failing", 1),
        ("late", "late", 3),
        ("slow", "late", 2),
        ("newbie", "never loaded", 3),
        ("bare", "never loaded", 0),
        ("okay", "ok", 0),
        ("off", "disabled", 0),
    ]
    by_name = {r.account: r for r in rows}
    assert [r.account for r in rows if r.needs_attention] == ["broken", "late", "slow"]
    assert all(r.spec == "sis_hr_user_info.txt" for r in rows if r.account != "bare")
    assert by_name["bare"].spec is None
    assert (by_name["okay"].last_load_rows, by_name["okay"].last_error) == (5, "")
    assert by_name["okay"].last_load is not None
    assert by_name["late"].last_load_rows == 3
    assert by_name["newbie"].last_load is None and by_name["newbie"].last_error == ""
    # The refusal as the load history has it: one line, without the file's values.
    broken = by_name["broken"]
    assert broken.last_load_rows == 4
    assert "duplicate key UUUID '…' (also on line 3" in broken.last_error
    assert "U0000001" not in broken.last_error and "\n" not in broken.last_error
    assert all(r.last_load_changes is None for r in rows)  # first loads: nothing to compare


def test_only_the_named_accounts_and_an_unknown_name_is_refused(settings, feeds, ingestctl):
    assert [r.account for r in feed_status(settings, ["okay", "late"])] == ["late", "okay"]

    run = ingestctl("status", "okay", "nosuch")

    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == "ingestctl: no account named 'nosuch' (see 'ingestctl account list')\n"


def test_a_first_file_refused_is_failing_not_never_loaded(settings, acme, kit):
    _duplicate_key_file(kit, acme)
    _nights(acme, Nights(settings.zone), [0])

    (row,) = feed_status(settings)

    assert (row.state, row.needs_attention, row.last_load, row.runs_missed) == (
        "failing",
        True,
        None,
        1,
    )
    assert row.last_error.startswith("not loaded:")


def test_the_table_worst_first_and_check_exit_codes(feeds, ingestctl):
    table = ingestctl("status")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:4] == ["ACCOUNT", "SPEC", "STATE", "LAST"]
    assert [line.split()[0] for line in lines] == [
        "broken",
        "late",
        "slow",
        "newbie",
        "bare",
        "okay",
        "off",
    ]
    assert lines[0].split()[2] == "failing" and lines[3].split()[2:4] == ["never", "loaded"]
    assert lines[4].split()[:3] == ["bare", "-", "never"]

    assert ingestctl("status", "--check").returncode == 1
    assert ingestctl("status", "slow", "--check").returncode == 1  # late
    assert ingestctl("status", "broken", "--check", "--json").returncode == 1  # failing
    quiet = ingestctl("status", "okay", "newbie", "bare", "off", "--check")
    assert quiet.returncode == 0, quiet.stderr
    assert len(quiet.stdout.splitlines()) == 5  # --check still prints the table


def _journal(settings, node: str = "node-a", **event: Any) -> None:
    """One server event, recorded in the activity journal as a node's journal writer does."""
    row = journal_row({"timestamp": datetime.now(UTC).isoformat(), **event}, node)
    record_rows(open_control_db(settings.control_db_url), [row])


def test_json_fields(settings, feeds, ingestctl, kit):
    _journal(
        settings,
        event="file.received",
        account="okay",
        address="192.0.2.7",
        name=kit.SPEC_FILE,
        bytes=10,
    )
    run = ingestctl("status", "--json", "okay", "broken", "bare")

    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["account"] for r in rows] == ["broken", "bare", "okay"]
    broken, bare, okay = rows
    assert set(okay) == {
        "account",
        "spec",
        "state",
        "needs_attention",
        "last_upload",
        "last_upload_address",
        "last_load",
        "last_load_rows",
        "last_load_changes",
        "runs_missed",
        "last_error",
        "files_waiting",
        "oldest_key_added",
        "oldest_key_age_days",
        "oldest_key_expires",
        "oldest_key_expiry",
    }
    assert okay["spec"] == kit.SPEC_FILE and okay["state"] == "ok"
    assert okay["needs_attention"] is False and broken["needs_attention"] is True
    assert okay["last_upload_address"] == "192.0.2.7"
    assert re.match(LOCAL_TIME, okay["last_upload"]) and re.match(LOCAL_TIME, okay["last_load"])
    assert (okay["last_load_rows"], okay["last_load_changes"], okay["runs_missed"]) == (5, None, 0)
    assert (broken["state"], broken["runs_missed"], broken["last_load_rows"]) == ("failing", 1, 4)
    assert broken["last_upload_address"] is None  # known from the load history only
    assert re.match(LOCAL_TIME, broken["last_upload"])
    assert "duplicate key UUUID '…'" in broken["last_error"]
    assert bare["spec"] is None and bare["last_upload"] is None and bare["last_load"] is None
    assert bare["oldest_key_added"] is None and bare["oldest_key_age_days"] is None
    assert bare["oldest_key_expires"] is None and bare["oldest_key_expiry"] is None


def test_last_upload_comes_from_the_journal_newest_first_on_every_node(
    settings, acme, kit, ingestctl, tmp_path
):
    kit.write_data(acme.data_file, 3)
    _nights(acme, Nights(settings.zone), [0])
    (row,) = feed_status(settings)
    assert row.last_upload_address is None  # nothing journaled yet: the load history's time
    loaded_at = row.last_upload
    assert loaded_at is not None and abs(loaded_at - row.last_load) < timedelta(seconds=5)

    received = {"event": "file.received", "bytes": 1}
    _journal(settings, **received, account="acme", address="192.0.2.1", name=kit.SPEC_FILE)
    _journal(settings, **received, account="other", address="192.0.2.2", name=kit.SPEC_FILE)
    _journal(settings, **received, account="acme", address="192.0.2.3", name="test.txt")
    (row,) = feed_status(settings)
    assert row.last_upload_address == "192.0.2.1"
    assert row.last_upload != loaded_at

    # A client that uploads under a temporary name and renames it into place, on another
    # node; this node's own log holds none of it.
    _journal(
        settings,
        node="node-b",
        event="file.renamed",
        account="acme",
        address="198.51.100.9\x1b[31m",
        name=kit.SPEC_FILE,
        old_name="upload.part",
    )
    assert not list(iter_events(settings.log_dir, "server"))
    (row,) = feed_status(settings)
    assert row.last_upload_address == "198.51.100.9\x1b[31m"
    table = ingestctl("status").stdout
    assert "198.51.100.9\\x1b[31m" in table and "\x1b" not in table
    assert json.loads(ingestctl("status", "--json").stdout)[0]["last_upload_address"] == (
        "198.51.100.9\x1b[31m"
    )
    # Another node, with its own log folder, shows the same row.
    elsewhere = settings.replace(log_dir=tmp_path / "node-b-logs")
    assert feed_status(elsewhere) == feed_status(settings)


def test_an_account_without_a_spec_shows_its_last_upload_of_any_file(settings, ingestctl):
    """Onboarding: before any format is approved, the row says whether the client's test
    upload arrived, and from where (the newest upload of any name)."""
    Registry(settings, actor="test").create_account("newco")
    (row,) = feed_status(settings, ["newco"])
    assert (row.spec, row.last_upload, row.last_upload_address) == (None, None, None)

    received = {"event": "file.received", "bytes": 6}
    _journal(settings, **received, account="newco", address="192.0.2.5", name="test.txt")
    _journal(settings, **received, account="newco", address="192.0.2.6", name="second.txt")
    _journal(settings, **received, account="other", address="192.0.2.9", name="x.txt")
    (row,) = feed_status(settings, ["newco"])
    assert (row.spec, row.state, row.last_upload_address) == (None, "never loaded", "192.0.2.6")
    assert row.last_upload is not None
    (shown,) = json.loads(ingestctl("status", "newco", "--json").stdout)
    assert shown["last_upload_address"] == "192.0.2.6" and shown["spec"] is None


def test_files_waiting_and_the_oldest_key_age(settings, acme, kit, make_key):
    kit.upload(acme.folder, "test.txt", "hello\n")
    kit.upload(acme.folder, kit.SPEC_FILE, kit.data_text(2))
    (acme.folder.root / ".in-flight.part").write_text("x")  # not a complete file
    (row,) = feed_status(settings)
    assert (row.files_waiting, row.oldest_key_added, row.oldest_key_age_days) == (2, None, None)

    registry = Registry(settings.replace(keys=KeyPolicySettings(accept_ed25519=True)))
    for label in ("old", "new"):
        registry.add_key("acme", make_key("ed25519", 256, label).with_suffix(".pub").read_text())
    control = open_control_db(settings.control_db_url)
    long_ago = utcnow() - timedelta(days=400, hours=1)
    with control.session() as session:
        session.execute(
            update(AccountKey).where(AccountKey.comment == "test-old").values(added_at=long_ago)
        )
        session.commit()

    (row,) = feed_status(settings)
    assert row.oldest_key_age_days == 400
    assert abs(row.oldest_key_added - long_ago) < timedelta(seconds=1)
    (later,) = feed_status(settings, now=lambda: utcnow() + timedelta(days=10))
    assert later.oldest_key_age_days == 410

    _nights(acme, Nights(settings.zone), [0])  # the good file loads; the stray stays
    (row,) = feed_status(settings)
    assert (row.state, row.files_waiting) == ("ok", 1)


@pytest.mark.postgres
def test_late_on_postgresql(acme_pg, kit):
    clock = Nights(acme_pg.settings.zone)
    kit.write_data(acme_pg.data_file, 7)
    _nights(acme_pg, clock, [0])
    (row,) = feed_status(acme_pg.settings)
    assert (row.state, row.last_load_rows, row.runs_missed) == ("ok", 7, 0)

    _nights(acme_pg, clock, [1])
    assert feed_status(acme_pg.settings)[0].state == "ok"  # one run missed: not late yet
    _nights(acme_pg, clock, [2])
    (row,) = feed_status(acme_pg.settings)
    assert (row.state, row.needs_attention, row.runs_missed, row.last_load_rows) == (
        "late",
        True,
        2,
        7,
    )


# -- what the last load changed ------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_last_load_changes_come_from_the_load_history(
    backend, request, settings, onboard, kit, ingestctl, config_file
):
    if backend == "sqlite":
        on = onboard(settings)
    else:
        pg_url = request.getfixturevalue("pg_url")
        on = onboard(settings.replace(sis_db_url=pg_url))
        config_file.write_text(f'sis_db_url = "{pg_url}"\n' + config_file.read_text())
    clock = Nights(on.settings.zone)
    kit.write_data(on.data_file, 5)  # U0..U4
    _nights(on, clock, [0])
    (row,) = feed_status(on.settings, [on.name])
    assert (row.last_load_rows, row.last_load_changes) == (5, None)  # a first load

    kit.write_data(on.data_file, 5, start=2, tag="x")  # U0, U1 gone; U5, U6 new; 3 changed
    _nights(on, clock, [1])
    (row,) = feed_status(on.settings, [on.name])
    assert (row.last_load_rows, row.last_load_changes) == (5, "2 new, 2 gone, 3 changed")

    _nights(on, clock, [2])  # no file: the last load's changes stay
    (row,) = feed_status(on.settings, [on.name])
    assert row.last_load_changes == "2 new, 2 gone, 3 changed"
    assert json.loads(ingestctl("status", "--json", on.name).stdout)[0]["last_load_changes"] == (
        "2 new, 2 gone, 3 changed"
    )
    header, line = ingestctl("status", on.name).stdout.splitlines()
    assert "2 new, 2 gone, 3 changed" in line
    assert line.index("2 new") == header.index("CHANGES")


def test_last_load_changes_blank_without_a_key_column(settings, tmp_path, kit, ingestctl):
    registry = Registry(settings, actor="test")
    registry.create_account("nokey")
    sample = kit.write_data(tmp_path / kit.SPEC_FILE, 3)
    approve_spec(registry, "nokey", sample)  # no key column: nothing to compare by
    clock = Nights(settings.zone)
    for night, start in ((0, 0), (1, 2)):
        kit.upload(account_folder(settings, "nokey"), kit.SPEC_FILE, kit.data_text(4, start))
        clock.night = night
        assert run_account(settings, "nokey", now=clock).ok
    (row,) = feed_status(settings, ["nokey"])
    assert (row.state, row.last_load_rows, row.last_load_changes) == ("ok", 4, None)
    header, line = ingestctl("status", "nokey").stdout.splitlines()
    assert line[header.index("CHANGES") :].split()[0] == "0"  # blank: MISSED comes next


# -- key age and expiry ([keys] max_age_days) --------------------------------------------------


def _age_key(settings, comment: str, days: float) -> None:
    """Make the key with ``comment`` look added ``days`` days ago (the control DB row)."""
    control = open_control_db(settings.control_db_url)
    with control.session() as session:
        session.execute(
            update(AccountKey)
            .where(AccountKey.comment == comment)
            .values(added_at=utcnow() - timedelta(days=days))
        )
        session.commit()


def _with_max_age(config_file, days: int) -> None:
    with open(config_file, "a", encoding="utf-8") as handle:
        handle.write(f"\n[keys]\naccept_ed25519 = true\nmax_age_days = {days}\n")


def test_expired_and_expiring_keys_in_status(
    settings, onboard, kit, make_key, ingestctl, config_file
):
    _with_max_age(config_file, 365)
    for name, age in (("fresh", 10), ("soon", 350), ("stale", 400), ("late", 400)):
        on = onboard(settings, name)
        key = make_key("ed25519", 256, name).with_suffix(".pub")
        assert ingestctl("key", "add", name, str(key)).returncode == 0
        _age_key(settings, f"test-{name}", age)
        if name != "late":
            kit.write_data(on.data_file, 3)
            _nights(on, Nights(settings.zone), [0])
        else:
            _nights(on, Nights(settings.zone), [0])  # never loaded

    run = ingestctl("status", "--json")
    assert run.returncode == 0, run.stderr
    rows = {r["account"]: r for r in json.loads(run.stdout)}
    assert [r["account"] for r in json.loads(run.stdout)] == ["late", "stale", "soon", "fresh"]
    assert (rows["stale"]["state"], rows["stale"]["needs_attention"]) == ("key expired", True)
    assert rows["stale"]["oldest_key_expiry"] == "expired"
    assert rows["late"]["state"] == "key expired"  # says more than "never loaded"
    assert (rows["soon"]["state"], rows["soon"]["needs_attention"]) == ("key expires soon", False)
    assert rows["soon"]["oldest_key_expiry"] == "expires soon"
    assert (rows["fresh"]["state"], rows["fresh"]["oldest_key_expiry"]) == ("ok", "ok")
    assert rows["fresh"]["oldest_key_age_days"] == 10
    assert re.match(LOCAL_TIME, rows["fresh"]["oldest_key_expires"])
    expires = utcnow() + timedelta(days=355)
    assert rows["fresh"]["oldest_key_expires"][:10] == expires.astimezone(settings.zone).strftime(
        "%Y-%m-%d"
    )

    assert ingestctl("status", "stale", "--check").returncode == 1
    assert ingestctl("status", "soon", "fresh", "--check").returncode == 0
    header, *lines = ingestctl("status").stdout.splitlines()
    table = {line.split()[0]: line for line in lines}
    column = header.index("KEY EXPIRES")
    assert table["stale"][column:].startswith("expired 20")
    assert table["soon"][column:].endswith("(soon)")
    assert table["fresh"][column:] == expires.astimezone(settings.zone).strftime("%Y-%m-%d")


def test_keys_that_never_expire_say_never(settings, acme, make_key, ingestctl, config_file):
    with open(config_file, "a", encoding="utf-8") as handle:
        handle.write("\n[keys]\naccept_ed25519 = true\n")
    key = make_key("ed25519", 256, "acme").with_suffix(".pub")
    assert ingestctl("key", "add", "acme", str(key)).returncode == 0
    _age_key(settings, "test-acme", 4000)

    (row,) = json.loads(ingestctl("status", "--json").stdout)
    assert (row["state"], row["oldest_key_expiry"], row["oldest_key_expires"]) == (
        "never loaded",
        "never",
        None,
    )
    assert row["oldest_key_age_days"] == 4000
    header, line = ingestctl("status").stdout.splitlines()
    assert line[header.index("KEY EXPIRES") :] == "never"
