"""Alerted only when it matters.

Stray files are told once and fail nothing; a near miss of a missing approved file fails the
run; unloaded files are deleted after the retention (warned 7 days before); a feed that stops
is mailed once per streak (LATE line), and again when it resumes; the account's contacts get
exactly their account's mails. Real folders, a real SMTP server (aiosmtpd), real SQLite and
PostgreSQL (the streaks come from the SIS database's load history), and an injected clock.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from nights import Nights

from ingest_core import folder_log
from ingest_core.registry import Registry
from ingest_core.settings import AlertSettings, LoaderSettings, SmtpSettings
from loader.nightly import run_account

OPS = "ops@example.edu"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _mail(on, port: int, **changes):
    smtp = SmtpSettings(host="127.0.0.1", port=port, recipients=[OPS], timeout=10)
    return on.settings.replace(smtp=smtp, **changes)


def _entries(on) -> list[dict[str, str]]:
    return [folder_log.parse_line(ln) for ln in folder_log.read_lines(on.folder)]


def _night(s, on, clock: Nights, night: int):
    clock.night = night
    return run_account(s, on.name, now=clock)


def _body(message) -> str:
    return message.get_payload(decode=True).decode()


def _to(messages, address: str) -> list:
    return [m for m in messages if address in m["To"].split(", ")]


def _config_with_mail(config_file, port: int) -> None:
    with open(config_file, "a", encoding="utf-8") as handle:
        handle.write(f'\n[smtp]\nhost = "127.0.0.1"\nport = {port}\nrecipients = ["{OPS}"]\n')


@pytest.fixture(params=BACKENDS)
def account(request, acme, onboard, settings):
    if request.param == "sqlite":
        return acme
    return onboard(settings.replace(sis_db_url=request.getfixturevalue("pg_url")), "pgacme")


# -- 1. stray files ---------------------------------------------------------------------------


def test_a_stray_next_to_a_good_file_is_told_once_fails_nothing_and_mails_nobody(
    acme, kit, smtp_sink, ingestctl, config_file
):
    sink, port = smtp_sink
    _config_with_mail(config_file, port)
    Registry(acme.settings, actor="test").add_contact(acme.name, "it@acme.edu")
    kit.upload(acme.folder, "test.txt", "hello\n")
    kit.upload(acme.folder, acme.spec.file_name, kit.data_text(4))

    run = ingestctl("loader", "run", "acme")

    assert run.returncode == 0, (run.stdout, run.stderr)
    assert "LOADED sis_hr_user_info.txt 4 rows imported" in run.stdout
    stray = [e for e in _entries(acme) if e["file"] == "test.txt"]
    assert [e["status"] for e in stray] == ["SKIPPED"]
    assert "'test.txt' is not an approved file name" in stray[0]["detail"]
    assert "it is deleted on " in stray[0]["detail"]
    assert (acme.folder.root / "test.txt").exists()

    clock = Nights(acme.settings.zone)
    quiet = _mail(acme, port, alerts=AlertSettings(missing_file_runs=0))  # no late feed here
    again = _night(quiet, acme, clock, 1)  # the next night: not told again
    assert again.ok
    assert [e["status"] for e in _entries(acme) if e["file"] == "test.txt"] == ["SKIPPED"]
    assert sink.wait(1, timeout=1) == []

    kit.upload(acme.folder, "test.txt", "hello again\n")  # a new arrival is told once more
    assert _night(quiet, acme, clock, 2).ok
    assert [e["status"] for e in _entries(acme) if e["file"] == "test.txt"] == ["SKIPPED"] * 2
    assert sink.messages == []


def test_the_approved_file_missing_with_a_near_miss_present_fails_the_run(
    acme, kit, smtp_sink, ingestctl, config_file
):
    sink, port = smtp_sink
    _config_with_mail(config_file, port)
    kit.upload(acme.folder, "SIS_HR_User_Info.csv", kit.data_text(3))

    run = ingestctl("loader", "run", "acme")

    assert run.returncode == 1
    (entry,) = _entries(acme)
    assert (entry["status"], entry["file"]) == ("ERROR", "sis_hr_user_info.txt")
    assert entry["detail"].startswith(
        "not loaded: no sis_hr_user_info.txt; found SIS_HR_User_Info.csv (the name differs in "
        "its extension, .csv instead of .txt and upper/lower case): rename it or fix the export"
    )
    (message,) = sink.wait(1)
    assert message["Subject"] == "[sis-ingest] Load failed for acme: sis_hr_user_info.txt"
    assert "found SIS_HR_User_Info.csv" in _body(message)

    # The next night it is still the approved file's ERROR (and a failed run), not mailed again.
    clock = Nights(acme.settings.zone)
    result = _night(_mail(acme, port, alerts=AlertSettings(missing_file_runs=0)), acme, clock, 1)
    assert not result.ok
    assert [e["status"] for e in _entries(acme)] == ["ERROR", "ERROR"]
    assert sink.wait(2, timeout=1) == [message]


# -- 2. retention of unloaded files -----------------------------------------------------------


def test_unloaded_files_are_warned_7_days_before_and_removed_after_the_retention(
    acme, kit, smtp_sink
):
    sink, port = smtp_sink
    s = _mail(acme, port)
    kit.upload(acme.folder, "test.txt", "personal data\n")
    refused = kit.upload(acme.folder, acme.spec.file_name, "not\tthe\theader\n")
    clock = Nights(acme.settings.zone)

    _night(s, acme, clock, 0)
    _night(s, acme, clock, 22)  # 8 days before: no warning yet
    assert not [e for e in _entries(acme) if e["status"] in ("WARNING", "REMOVED")]

    _night(s, acme, clock, 23)
    warnings = [e for e in _entries(acme) if e["status"] == "WARNING"]
    assert sorted(e["file"] for e in warnings) == ["sis_hr_user_info.txt", "test.txt"]
    deadline = (clock.start + timedelta(days=30)).date().isoformat()
    assert all(f"it will be deleted on {deadline}" in e["detail"] for e in warnings)
    _night(s, acme, clock, 24)  # warned once
    assert len([e for e in _entries(acme) if e["status"] == "WARNING"]) == 2
    assert (acme.folder.root / "test.txt").exists() and refused.exists()

    _night(s, acme, clock, 31)
    removed = [e for e in _entries(acme) if e["status"] == "REMOVED"]
    assert sorted(e["file"] for e in removed) == ["sis_hr_user_info.txt", "test.txt"]
    assert all("not loaded within 30 days of its arrival" in e["detail"] for e in removed)
    assert not (acme.folder.root / "test.txt").exists() and not refused.exists()
    # The refusal was mailed once (its first night); warnings and removals mail nobody.
    assert [m["Subject"] for m in sink.wait(2, timeout=1)] == [
        "[sis-ingest] Load failed for acme: sis_hr_user_info.txt"
    ]


def test_a_retention_of_zero_keeps_unloaded_files(acme, kit):
    s = acme.settings.replace(loader=LoaderSettings(unloaded_file_retention_days=0))
    kit.upload(acme.folder, "test.txt", "x\n")
    clock = Nights(acme.settings.zone)
    _night(s, acme, clock, 400)
    assert (acme.folder.root / "test.txt").exists()
    assert not [e for e in _entries(acme) if e["status"] in ("WARNING", "REMOVED")]


# -- 3. missing-feed alerts -------------------------------------------------------------------


def test_three_nights_without_a_file_mail_once_and_the_next_load_mails_resumed(
    account, kit, smtp_sink
):
    sink, port = smtp_sink
    s = _mail(account, port)
    clock = Nights(account.settings.zone)
    kit.write_data(account.data_file, 5)
    assert _night(s, account, clock, 0).ok

    _night(s, account, clock, 1)
    assert not [e for e in _entries(account) if e["status"] == "LATE"] and sink.messages == []

    assert _night(s, account, clock, 2).ok  # late is not a failed run
    late = [e for e in _entries(account) if e["status"] == "LATE"]
    assert len(late) == 1 and late[0]["file"] == "sis_hr_user_info.txt"
    assert "for 2 runs in a row" in late[0]["detail"]
    (message,) = sink.wait(1)
    assert message["To"] == OPS
    assert message["Subject"] == (
        f"[sis-ingest] Late feed for {account.name}: sis_hr_user_info.txt"
    )
    body = _body(message)
    assert f"account:      {account.name}" in body and "runs missed:  2 in a row" in body
    assert "(5 rows)" in body and "no file received" in body

    _night(s, account, clock, 3)  # the same streak: nothing more
    assert len([e for e in _entries(account) if e["status"] == "LATE"]) == 1
    assert sink.wait(2, timeout=1) == [message]

    kit.write_data(account.data_file, 6)
    assert _night(s, account, clock, 4).ok
    resumed = sink.wait(2)[1:]
    assert [m["Subject"] for m in resumed] == [
        f"[sis-ingest] Feed resumed for {account.name}: sis_hr_user_info.txt"
    ]
    assert "after 3 runs without a load" in _body(resumed[0])
    assert "(6 rows)" in _body(resumed[0])


def test_a_manual_run_counts_as_a_run(acme, kit, smtp_sink, ingestctl, config_file):
    sink, port = smtp_sink
    _config_with_mail(config_file, port)
    kit.write_data(acme.data_file, 3)
    assert run_account(acme.settings, acme.name).ok
    assert run_account(acme.settings, acme.name).ok  # the nightly run: no file

    run = ingestctl("loader", "run", "acme")  # an operator's run: the second in a row

    assert run.returncode == 0, run.stderr
    assert [e["status"] for e in _entries(acme)].count("LATE") == 1
    (message,) = sink.wait(1)
    assert "Late feed for acme" in message["Subject"]


def test_a_file_refused_night_after_night_is_mailed_once_per_streak(acme, kit, smtp_sink):
    sink, port = smtp_sink
    s = _mail(acme, port)
    clock = Nights(acme.settings.zone)
    kit.write_data(acme.data_file, 4)
    assert _night(s, acme, clock, 0).ok
    bad = kit.data_text(4).replace("U0000002\tFirst2", "U0000002\tFirst2\textra")
    acme.data_file.write_text(bad, encoding="utf-8", newline="")

    assert not _night(s, acme, clock, 1).ok
    (failed,) = sink.wait(1)
    assert failed["Subject"] == "[sis-ingest] Load failed for acme: sis_hr_user_info.txt"

    assert not _night(s, acme, clock, 2).ok  # refused again: late now, not failed again
    messages = sink.wait(2)
    assert [m["Subject"] for m in messages[1:]] == [
        "[sis-ingest] Late feed for acme: sis_hr_user_info.txt"
    ]
    assert "line 4: 5 fields, expected 4" in _body(messages[1])  # what the latest run found

    for night in (3, 4, 5):
        assert not _night(s, acme, clock, night).ok
    assert len(sink.wait(3, timeout=1)) == 2
    assert [e["status"] for e in _entries(acme)].count("ERROR") == 5

    kit.write_data(acme.data_file, 4)
    assert _night(s, acme, clock, 6).ok
    assert sink.wait(3)[2]["Subject"] == "[sis-ingest] Feed resumed for acme: sis_hr_user_info.txt"


def test_a_spec_that_never_loaded_is_not_late(acme, smtp_sink):
    sink, port = smtp_sink
    s = _mail(acme, port)
    clock = Nights(acme.settings.zone)
    for night in range(4):
        assert _night(s, acme, clock, night).ok
    assert sink.wait(1, timeout=1) == []
    assert "LATE" not in [e["status"] for e in _entries(acme)]


# -- 4. contacts ------------------------------------------------------------------------------


def test_contacts_receive_exactly_their_accounts_mails(settings, onboard, kit, smtp_sink):
    sink, port = smtp_sink
    acme, beta = onboard(settings, "acme"), onboard(settings, "beta")
    registry = Registry(settings, actor="test")
    registry.add_contact("acme", "it@acme.edu")
    registry.add_contact("acme", "dba@acme.edu")
    registry.add_contact("beta", "it@beta.edu")
    clock = Nights(settings.zone)

    # acme: a refused file (the contacts get the client's words, no values from the file).
    lines = kit.data_text(5).splitlines(keepends=True)
    acme.data_file.write_text("".join([*lines, lines[2]]), encoding="utf-8", newline="")
    # beta: loads, then stops (late on the second night without a file).
    kit.write_data(beta.data_file, 3)
    for night in range(3):
        assert not _night(_mail(acme, port), acme, clock, night).ok
        assert _night(_mail(beta, port), beta, clock, night).ok

    messages = sink.wait(4)
    assert len(messages) == 4
    to_ops = _to(messages, OPS)
    assert [m["To"] for m in to_ops] == [OPS, OPS]  # never together with a client's address
    assert sorted(m["Subject"] for m in to_ops) == [
        "[sis-ingest] Late feed for beta: sis_hr_user_info.txt",
        "[sis-ingest] Load failed for acme: sis_hr_user_info.txt",
    ]
    (to_acme,) = _to(messages, "it@acme.edu")
    assert to_acme["To"] == "it@acme.edu, dba@acme.edu"
    assert to_acme["Subject"] == "[sis-ingest] Load failed for acme: sis_hr_user_info.txt"
    body = _body(to_acme)
    assert "line 7: duplicate key UUUID '…' (also on line 3" in body
    assert "U0000001" not in body and "ingestctl" not in body
    (to_beta,) = _to(messages, "it@beta.edu")
    assert to_beta["To"] == "it@beta.edu"
    assert to_beta["Subject"].startswith("[sis-ingest] Late feed for beta:")

    registry.remove_contact("acme", "DBA@acme.edu")
    kit.write_data(acme.data_file, 5)
    assert _night(_mail(acme, port), acme, clock, 3).ok  # acme never loaded: no "resumed"
    kit.write_data(beta.data_file, 3)
    assert _night(_mail(beta, port), beta, clock, 3).ok
    messages = sink.wait(6)
    assert [m["To"] for m in messages[4:]] == [OPS, "it@beta.edu"]
    assert all("Feed resumed for beta" in m["Subject"] for m in messages[4:])
