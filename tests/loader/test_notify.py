"""Failure e-mail to the operators, against a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

from ingest_core.settings import PoolSettings, SmtpSettings
from loader.nightly import run_account
from loader.pool import import_ids, publish_pool


def _with_mail(settings, port: int):
    smtp = SmtpSettings(host="127.0.0.1", port=port, recipients=["ops@example.edu"], timeout=10)
    return settings.replace(smtp=smtp)


def test_failed_load_mails_the_operators(acme, kit, smtp_sink):
    sink, port = smtp_sink
    s = _with_mail(acme.settings, port)
    text = kit.data_text(3).replace("First1\t", "First1\tx\t")
    acme.data_file.write_text(text, encoding="utf-8", newline="")
    assert not run_account(s, acme.name).ok
    (message,) = sink.wait(1)
    assert message["To"] == "ops@example.edu"
    assert message["Subject"] == "[sis-ingest] Load failed for acme: sis_hr_user_info.txt"
    body = message.get_payload(decode=True).decode()
    assert "account: acme" in body and "file:    sis_hr_user_info.txt" in body
    assert "line 3: 5 fields, expected 4" in body
    assert "time:    20" in body


def test_good_load_sends_nothing_and_no_smtp_host_means_no_mail(acme, kit, smtp_sink):
    sink, port = smtp_sink
    kit.write_data(acme.data_file, 3)
    assert run_account(_with_mail(acme.settings, port), acme.name).ok
    acme.data_file.write_text("garbage\n", encoding="utf-8")
    assert not run_account(acme.settings, acme.name).ok  # smtp.host empty: mail is off
    assert sink.messages == []


def test_failed_pool_publish_mails_the_operators(settings, onboard, smtp_sink, tmp_path):
    sink, port = smtp_sink
    on = onboard(settings, "defer", deferred_fetch=True)
    broken = PoolSettings(source="query", query_url=f"sqlite:///{tmp_path}/x.db", query="SELEC")
    s = _with_mail(on.settings, port).replace(pool=broken)
    assert not publish_pool(s, on.name).ok
    (message,) = sink.wait(1)
    assert message["Subject"] == "[sis-ingest] Pool publish failed for defer: applicant_pool.txt"
    assert "SELEC" in message.get_payload(decode=True).decode()  # the operators get the real error


def test_pool_never_imported_is_refused_and_mailed_not_published_empty(
    settings, onboard, smtp_sink, tmp_path
):
    """An account whose applicant list was never imported gets no pool file (an empty one
    would say "no active applicants"); the operators are told what to run. An imported empty
    list is a real answer and is published."""
    sink, port = smtp_sink
    on = onboard(settings, "defer", deferred_fetch=True)
    s = _with_mail(on.settings, port)
    result = publish_pool(s, on.name)
    assert not result.ok and not on.folder.pool_file.exists()
    (message,) = sink.wait(1)
    body = message.get_payload(decode=True).decode()
    assert "no applicant list has been imported" in body
    assert "ingestctl pool import defer FILE" in body
    empty = tmp_path / "none.txt"
    empty.write_text("")
    assert import_ids(s, on.name, empty) == 0
    result = publish_pool(s, on.name)
    assert result.ok and result.count == 0
    assert on.folder.pool_file.read_bytes() == b""
    assert sink.messages == [message]  # nothing more to tell


def test_values_from_the_file_stay_in_the_clients_log_only(acme, kit, smtp_sink):
    """A refusal that quotes a value from the file (a duplicated ID) tells the client the
    value, in its own folder log; the operators' e-mail and log get the line numbers and the
    kind of problem, not the value."""
    sink, port = smtp_sink
    lines = kit.data_text(5).splitlines(keepends=True)
    acme.data_file.write_text("".join([*lines, lines[2]]), encoding="utf-8", newline="")
    assert not run_account(_with_mail(acme.settings, port), acme.name).ok
    client = acme.folder.log_file.read_text()
    assert "line 7: duplicate key UUUID 'U0000001' (also on line 3" in client
    (message,) = sink.wait(1)
    body = message.get_payload(decode=True).decode()
    assert "line 7: duplicate key UUUID '…' (also on line 3" in body
    server_log = (acme.settings.log_dir / "loader.jsonl").read_text(encoding="utf-8")
    assert "duplicate key UUUID" in server_log
    assert "U0000001" not in body and "U0000001" not in server_log
