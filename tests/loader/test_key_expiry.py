"""Key ages and expiry ([keys] max_age_days): what ``ingestctl key list`` shows, and the
reminder mails 30, 7 and 1 days before a key expires, each sent once.

Real control database, real keys (ssh-keygen), a real SMTP server (aiosmtpd) and an injected
clock: the reminders are worked out for any instant given to them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from datetime import datetime, timedelta

from sqlalchemy import update

from ingest_core.db import AccountKey, open_control_db, utcnow
from ingest_core.registry import Registry
from ingest_core.settings import KeyPolicySettings, SmtpSettings
from loader.daemon import LoaderDaemon
from loader.key_expiry import send_key_reminders

OPS = "ops@example.edu"
LOCAL_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$"


def _settings(settings, port: int, max_age_days: int = 365):
    return settings.replace(
        smtp=SmtpSettings(host="127.0.0.1", port=port, recipients=[OPS], timeout=10),
        keys=KeyPolicySettings(accept_ed25519=True, max_age_days=max_age_days),
    )


def _account(settings, make_key, name: str, contact: str, days_old: float = 0) -> str:
    """An account with one ed25519 key added ``days_old`` days ago; returns its fingerprint."""
    keys = dataclasses.replace(settings.keys, accept_ed25519=True)
    registry = Registry(settings.replace(keys=keys), actor="test")
    registry.create_account(name)
    registry.add_contact(name, contact)
    key = registry.add_key(name, make_key("ed25519", 256, name).with_suffix(".pub").read_text())
    if days_old:
        control = open_control_db(settings.control_db_url)
        with control.session() as session:
            session.execute(
                update(AccountKey)
                .where(AccountKey.fingerprint == key.fingerprint)
                .values(added_at=utcnow() - timedelta(days=days_old))
            )
            session.commit()
    return key.fingerprint


def _expiry(settings, name: str) -> datetime:
    (key,) = Registry(settings).list_keys(name)
    assert key.expires_at is not None
    return datetime.fromisoformat(key.expires_at)


def _to(messages, address: str) -> list:
    return [m for m in messages if m["To"] == address]


def _body(message) -> str:
    return message.get_payload(decode=True).decode()


def _config(config_file, port: int, max_age_days: int) -> None:
    with open(config_file, "a", encoding="utf-8") as handle:
        handle.write(
            f'\n[smtp]\nhost = "127.0.0.1"\nport = {port}\nrecipients = ["{OPS}"]\n'
            f"\n[keys]\naccept_ed25519 = true\nmax_age_days = {max_age_days}\n"
        )


# -- ingestctl key list ------------------------------------------------------------------------


def test_key_list_shows_age_and_expiry(settings, make_key, ingestctl, config_file):
    _config(config_file, 1, 365)
    fresh = _account(settings, make_key, "acme", "it@acme.edu", days_old=100.5)
    registry = Registry(settings.replace(keys=KeyPolicySettings(accept_ed25519=True)))
    old = registry.add_key("acme", make_key("ed25519", 256, "old").with_suffix(".pub").read_text())
    control = open_control_db(settings.control_db_url)
    with control.session() as session:
        session.execute(
            update(AccountKey)
            .where(AccountKey.fingerprint == old.fingerprint)
            .values(added_at=utcnow() - timedelta(days=400))
        )
        session.commit()

    run = ingestctl("key", "list", "acme", "--json")
    assert run.returncode == 0, run.stderr
    keys = {k["fingerprint"]: k for k in json.loads(run.stdout)}
    assert (keys[fresh]["age_days"], keys[fresh]["expiry"]) == (100, "ok")
    assert (keys[old.fingerprint]["age_days"], keys[old.fingerprint]["expiry"]) == (400, "expired")
    assert re.match(LOCAL_TIME, keys[fresh]["expires_at"])
    expires = datetime.fromisoformat(keys[fresh]["expires_at"])
    added = datetime.fromisoformat(keys[fresh]["added_at"])
    assert expires - added == timedelta(days=365)

    header, *lines = ingestctl("key", "list", "acme").stdout.splitlines()
    assert header.split()[-2:] == ["AGE", "EXPIRES"]
    table = {line.split()[2]: line for line in lines}
    assert table[fresh].split()[-2:] == ["100d", expires.date().isoformat()]
    assert table[old.fingerprint].split()[-3:-1] == ["400d", "expired"]


def test_key_list_says_never_when_keys_do_not_expire(settings, make_key, ingestctl, config_file):
    fingerprint = _account(settings, make_key, "acme", "it@acme.edu", days_old=4000)
    with open(config_file, "a", encoding="utf-8") as handle:
        handle.write("\n[keys]\naccept_ed25519 = true\n")

    (key,) = json.loads(ingestctl("key", "list", "acme", "--json").stdout)
    assert (key["fingerprint"], key["age_days"]) == (fingerprint, 4000)
    assert (key["expires_at"], key["expiry"]) == (None, "never")
    _, line = ingestctl("key", "list", "acme").stdout.splitlines()
    assert line.split()[-2:] == ["4000d", "never"]


# -- reminders -----------------------------------------------------------------------------


def test_reminders_30_7_1_days_before_once_each_to_operators_and_contacts(
    settings, make_key, smtp_sink
):
    sink, port = smtp_sink
    s = _settings(settings, port)
    fingerprint = _account(s, make_key, "acme", "it@acme.edu", days_old=100)
    _account(s, make_key, "other", "it@other.edu")  # expires 100 days later: not due
    expires = _expiry(s, "acme")

    sent_by_night = []
    for before in (40, 31, 29.9, 29, 20, 7.5, 6.5, 6, 2, 0.5, 0.2, -1, -30):
        sent = send_key_reminders(s, expires - timedelta(days=before))
        sent_by_night.append([(r.account, r.days, r.messages) for r in sent])

    assert sent_by_night == [
        [],
        [],
        [("acme", 30, 2)],
        [],
        [],
        [],
        [("acme", 7, 2)],
        [],
        [],
        [("acme", 1, 2)],
        [],
        [],
        [],
    ]
    messages = sink.messages
    assert len(messages) == 6
    operators, contacts = _to(messages, OPS), _to(messages, "it@acme.edu")
    assert len(operators) == 3 and len(contacts) == 3  # each alone on its own message
    assert not [m for m in messages if "it@other.edu" in m["To"] or "other" in m["Subject"]]
    assert [m["Subject"].split(" expires ")[1].split(" (")[0] for m in operators] == [
        "in 30 days",
        "in 7 days",
        "in 1 day",
    ]
    body = _body(contacts[0])
    local_expiry = expires.astimezone(s.zone)
    added = local_expiry - timedelta(days=365)
    for fact in (
        "account:      acme",
        f"key:          {fingerprint}",
        "comment:      test-acme",
        f"added:        {added.isoformat(timespec='seconds')}",
        f"expires:      {local_expiry.isoformat(timespec='seconds')}",
        "ingestctl key add acme NEW_KEY.pub",
        f"ingestctl key remove acme {fingerprint}",
        "as a contact of the account",
    ):
        assert fact in body, fact
    assert "as a contact" not in _body(operators[0])
    recorded = [e for e in Registry(s).audit_trail("acme") if e.action == "key.reminder"]
    assert [(e.actor, e.detail["days"], e.detail["fingerprint"]) for e in recorded] == [
        ("loader", 30, fingerprint),
        ("loader", 7, fingerprint),
        ("loader", 1, fingerprint),
    ]


def test_a_key_first_seen_late_gets_only_the_most_urgent_reminder(settings, make_key, smtp_sink):
    sink, port = smtp_sink
    s = _settings(settings, port)
    _account(s, make_key, "acme", "it@acme.edu")
    expires = _expiry(s, "acme")

    first = send_key_reminders(s, expires - timedelta(days=5))
    again = send_key_reminders(s, expires - timedelta(days=4))
    last = send_key_reminders(s, expires - timedelta(hours=20))

    assert [(r.days, r.days_left) for r in first] == [(7, 5)]
    assert again == []
    assert [(r.days, r.days_left) for r in last] == [(1, 1)]
    assert len(sink.messages) == 4  # operators and contact, twice


def test_a_reminder_that_could_not_be_mailed_goes_out_on_the_next_run(
    settings, make_key, smtp_sink
):
    sink, port = smtp_sink
    _account(settings, make_key, "acme", "it@acme.edu")
    down = _settings(settings, port)
    down = down.replace(smtp=SmtpSettings(host="127.0.0.1", port=1, recipients=[OPS], timeout=5))
    when = _expiry(down, "acme") - timedelta(days=3)

    assert send_key_reminders(down, when) == []  # connection refused: nothing recorded
    assert [r.days for r in send_key_reminders(_settings(settings, port), when)] == [7]
    assert len(sink.messages) == 2


def test_no_reminders_when_keys_do_not_expire_or_the_account_is_disabled(
    settings, make_key, smtp_sink
):
    sink, port = smtp_sink
    s = _settings(settings, port)
    _account(s, make_key, "acme", "it@acme.edu")
    expires = _expiry(s, "acme")
    off = _settings(settings, port, max_age_days=0)
    assert send_key_reminders(off, expires - timedelta(days=1)) == []

    Registry(s, actor="test").set_status("acme", "disabled")
    assert send_key_reminders(s, expires - timedelta(days=1)) == []
    assert sink.messages == []


def test_the_nightly_run_sends_reminders_for_accounts_with_no_file(
    settings, make_key, smtp_sink, ingestctl, config_file
):
    """``ingestctl loader run`` and the loader daemon's nightly job, on a night with no file."""
    sink, port = smtp_sink
    _config(config_file, port, 20)  # a key added now expires in 20 days: the 30-day reminder
    _account(settings, make_key, "acme", "it@acme.edu")
    _account(settings, make_key, "other", "it@other.edu")
    Registry(settings, actor="test").set_status("other", "disabled")

    first = ingestctl("loader", "run")
    second = ingestctl("loader", "run")

    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    assert sorted(m["To"] for m in sink.messages) == ["it@acme.edu", OPS]
    assert all("in 20 days" in m["Subject"] for m in sink.messages)

    # The daemon's nightly job: the next reminder, at its clock's time.
    s = _settings(settings, port, max_age_days=20)
    clock = _expiry(s, "acme") - timedelta(days=6)
    daemon = LoaderDaemon(s, now=lambda: clock, in_process=True)
    asyncio.run(daemon.run_loads())
    assert len(sink.messages) == 4
    assert all("in 6 days" in m["Subject"] for m in sink.messages[2:])
