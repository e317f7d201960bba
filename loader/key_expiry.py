"""Reminders before a client key expires (``[keys] max_age_days``), once per nightly run.

Each key of an active account is reminded 30, 7 and 1 days before it expires, each reminder
once: a run sends the most urgent reminder the key has reached and not had yet, never
several at once (a key first seen 5 days before its expiry gets the 7-day reminder, then the
1-day one). A reminder is recorded as a ``key.reminder`` audit event once at least one of its
messages went out, so a later run, or a run on a day the mail server was down, does the right
thing. The record names the key's expiry: a key removed and added again, or a changed
``max_age_days``, starts a new series. Disabled accounts get none: they log in with no key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ingest_core.key_age import key_age
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.claims import KEYS, job_lock
from loader.notify import notify_key_expiry

EVERY_ACCOUNT = "all-accounts"


@dataclass(frozen=True)
class KeyReminder:
    """One reminder sent."""

    account: str
    fingerprint: str
    days: int  # the reminder: 30, 7 or 1 days before expiry
    days_left: int  # whole days left when it was sent
    expires_at: datetime
    messages: int  # 1: to the operators or the contacts; 2: to both


def send_key_reminders(settings: Settings, now: datetime | None = None) -> list[KeyReminder]:
    """Send every reminder due at ``now`` (default: the current time); returns those sent.
    Never raises: a control database or mail server that cannot be reached is logged, and the
    reminders still due go out on a later run."""
    max_age = settings.keys.max_age_days
    if max_age <= 0:
        return []
    when = now or datetime.now(UTC)
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    sent: list[KeyReminder] = []
    try:
        # One node at a time: the reminders already sent are read under the lock, so two
        # nodes' nightly runs at the same minute mail each reminder once.
        with job_lock(settings, KEYS, EVERY_ACCOUNT) as got:
            if not got:
                log.info("key_reminders_skipped", reason="another node is sending them")
                return sent
            _send_due(settings, when, max_age, log, sent)
    except Exception as exc:  # the nightly loads go on whatever happens here
        log.error("key_reminders_failed", error=f"{type(exc).__name__}: {exc}"[:300])
    return sent


def _send_due(
    settings: Settings, when: datetime, max_age: int, log: Any, sent: list[KeyReminder]
) -> None:
    """Mail each reminder now due and not yet sent, and record it (``sent`` grows)."""
    registry = Registry(settings, actor="loader")
    keys = registry.active_account_keys()
    recorded = registry.key_reminders_sent()
    for key in keys:
        age = key_age(key.added_at, max_age, when)
        due = age.reminder_due
        if due is None or age.expires_at is None or age.days_left is None:
            continue
        if registry.key_reminder_sent(recorded, key.fingerprint, age.expires_at, due):
            continue
        messages = notify_key_expiry(
            settings,
            key.account,
            key.fingerprint,
            key.comment,
            key.added_at,
            age.expires_at,
            age.days_left,
        )
        if not messages:
            continue  # no mail went out: due again on the next run
        registry.record_key_reminder(key.account, key.fingerprint, age.expires_at, due, messages)
        log.info(
            "key_reminder_sent",
            account=key.account,
            fingerprint=key.fingerprint,
            days=due,
            days_left=age.days_left,
        )
        sent.append(
            KeyReminder(key.account, key.fingerprint, due, age.days_left, age.expires_at, messages)
        )
