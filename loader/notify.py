"""E-mail about an account's loads (never raises): to the operators, and to the account's contacts.

- a failed load or pool publish: the operators get the error in full; for a load, the
  account's contacts (``ingestctl contact``) get the words the client's folder log has;
- a late feed (an approved file that loaded before and then missed ``[alerts]
  missing_file_runs`` runs in a row), once per streak, and the feed resuming: the operators
  and the contacts get the same facts;
- a client key that expires soon (``[keys] max_age_days``; which reminder is due is decided
  in :mod:`loader.key_expiry`): the operators and the contacts get the same facts and the
  steps to rotate it.

The operators (``[smtp] recipients``) and the contacts are sent separate messages: neither
sees the other's addresses, and the contacts never see what is meant for operators only.
Bodies carry the account, the file, times and messages; never file contents (values quoted
from a file are '…' in every message that reaches here).
"""

from __future__ import annotations

import smtplib
from datetime import datetime

from ingest_core.mail import mail_enabled, send_mail
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.sis_db import LoadRecord


def _local(settings: Settings, when: datetime) -> str:
    return when.astimezone(settings.zone).isoformat(timespec="seconds")


def _send(settings: Settings, account: str, subject: str, body: str, recipients: list[str]) -> bool:
    """One message to ``recipients``; False (and a log line) if it could not go out."""
    if not mail_enabled(settings.smtp, recipients):
        return False
    try:
        send_mail(settings.smtp, subject, body, recipients)
    except (OSError, smtplib.SMTPException) as exc:
        get_logger(settings.log_dir, "loader", **log_limits(settings)).warning(
            "mail_failed", account=account, error=str(exc) or type(exc).__name__
        )
        return False
    return True


def account_contacts(settings: Settings, account: str) -> list[str]:
    """The account's contact addresses ([] if it has none, or if they cannot be read: the
    operators still get their own message)."""
    from ingest_core.registry import Registry

    try:
        return Registry(settings, actor="loader").contact_emails(account)
    except Exception as exc:  # the control database is down: the operators still hear
        get_logger(settings.log_dir, "loader", **log_limits(settings)).warning(
            "contacts_unreadable", account=account, error=f"{type(exc).__name__}: {exc}"[:300]
        )
        return []


def notify_failure(
    settings: Settings,
    what: str,
    account: str,
    file_name: str,
    error: str,
    when: datetime,
    client_message: str | None = None,
) -> bool:
    """Mail the operators about one failure, and, given ``client_message`` (the client's
    words, no values from the file), the account's contacts; True if the operators' message
    went out."""
    local = _local(settings, when)
    subject = f"[sis-ingest] {what} failed for {account}: {file_name or '-'}"
    body = (
        f"{what} failed.\n\n"
        f"account: {account}\n"
        f"file:    {file_name or '-'}\n"
        f"time:    {local}\n"
        f"error:   {error}\n\n"
        f"The previous data stays in place. See 'ingestctl log {account}' for the folder log.\n"
    )
    sent = _send(settings, account, subject, body, list(settings.smtp.recipients))
    if client_message is not None:
        contacts = account_contacts(settings, account)
        if contacts:
            _send(
                settings,
                account,
                subject,
                f"{what} failed.\n\n"
                f"account: {account}\n"
                f"file:    {file_name or '-'}\n"
                f"time:    {local}\n"
                f"result:  {client_message}\n\n"
                "The data loaded before stays in place. The same line is in the folder log "
                "(sis_loader.log) in the account's folder on the server. You get this message "
                "as a contact of the account; the operators were told too.\n",
                contacts,
            )
    return sent


def _last_load_text(settings: Settings, last: LoadRecord | None) -> str:
    if last is None:
        return "never"
    rows = "" if last.rows is None else f" ({last.rows:,} rows)"
    return f"{_local(settings, last.finished or last.started)}{rows}"


def notify_late(
    settings: Settings,
    account: str,
    file_name: str,
    last: LoadRecord | None,
    missed: int,
    latest: str,
    when: datetime,
) -> bool:
    """A feed is late: one message to the operators and one to the account's contacts
    (once per streak: the caller decides when). True if either went out."""
    subject = f"[sis-ingest] Late feed for {account}: {file_name}"
    facts = (
        f"account:      {account}\n"
        f"file:         {file_name}\n"
        f"last loaded:  {_last_load_text(settings, last)}\n"
        f"runs missed:  {missed} in a row\n"
        f"latest run:   {_local(settings, when)}: {latest}\n\n"
    )
    head = f"{file_name} of {account} has not been loaded for {missed} runs in a row.\n\n"
    tail = (
        "You are told once: the next message says when it loads again. Until then the SIS "
        "data from the last load stays in place.\n"
    )
    operators = _send(
        settings,
        account,
        subject,
        head + facts + tail + f"See 'ingestctl log {account}' for the folder log.\n",
        list(settings.smtp.recipients),
    )
    contacts = account_contacts(settings, account)
    told = contacts and _send(
        settings,
        account,
        subject,
        head
        + facts
        + "Please check that the export job still runs and uploads the file under exactly "
        "this name; the folder log (sis_loader.log) in the account's folder says what each "
        "run found. " + tail,
        contacts,
    )
    return operators or bool(told)


def notify_resumed(
    settings: Settings,
    account: str,
    file_name: str,
    rows: int,
    missed: int,
    when: datetime,
) -> bool:
    """A late feed loaded again: the operators and the account's contacts are told."""
    subject = f"[sis-ingest] Feed resumed for {account}: {file_name}"
    body = (
        f"{file_name} of {account} loaded again after {missed} runs without a load.\n\n"
        f"account:      {account}\n"
        f"file:         {file_name}\n"
        f"loaded:       {_local(settings, when)} ({rows:,} rows)\n"
        f"runs missed:  {missed}\n"
    )
    operators = _send(settings, account, subject, body, list(settings.smtp.recipients))
    contacts = account_contacts(settings, account)
    told = contacts and _send(settings, account, subject, body, contacts)
    return operators or bool(told)


def notify_key_expiry(
    settings: Settings,
    account: str,
    fingerprint: str,
    comment: str,
    added_at: datetime,
    expires_at: datetime,
    days_left: int,
) -> int:
    """A client key expires soon: one message to the operators and one to the account's
    contacts, saying how to rotate it. Returns how many of the two went out."""
    expires = _local(settings, expires_at)
    when = "in 1 day" if days_left == 1 else f"in {days_left} days"
    subject = f"[sis-ingest] Key of {account} expires {when} ({expires[:10]})"
    body = (
        f"A public key of account {account} expires {when}. From then on, logins with it "
        "are refused.\n\n"
        f"account:      {account}\n"
        f"key:          {fingerprint}\n"
        f"comment:      {comment or '-'}\n"
        f"added:        {_local(settings, added_at)}\n"
        f"expires:      {expires}\n"
        f"keys expire {settings.keys.max_age_days} days after they are added.\n\n"
        "To rotate it without a gap:\n"
        "1. the client makes a new key pair and sends the new public key (.pub) to the "
        "operators;\n"
        f"2. an operator adds it: ingestctl key add {account} NEW_KEY.pub\n"
        "3. the client switches its uploads to the new key and checks that one works;\n"
        f"4. an operator removes the old one: ingestctl key remove {account} {fingerprint}\n"
    )
    sent = _send(settings, account, subject, body, list(settings.smtp.recipients))
    contacts = account_contacts(settings, account)
    told = bool(contacts) and _send(
        settings,
        account,
        subject,
        body + "\nYou get this message as a contact of the account; the operators were told too.\n",
        contacts,
    )
    return int(sent) + int(told)


def operators_notice(settings: Settings) -> str:
    """How the operators hear of a failure, in words a client may read: no promise of a mail
    that no mail server is set up to send."""
    if settings.smtp.host and settings.smtp.recipients:
        return "the operators were notified"
    return "the operators see it in the service's log"
