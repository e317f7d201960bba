"""E-mail to the operators when a load or a pool publish fails (never raises).

The body carries the account, the file, the time and the error; never file contents.
"""

from __future__ import annotations

import smtplib
from datetime import datetime

from ingest_core.mail import mail_enabled, send_mail
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits


def notify_failure(
    settings: Settings, what: str, account: str, file_name: str, error: str, when: datetime
) -> bool:
    """Mail the operators about one failure; returns True if a message went out."""
    if not mail_enabled(settings.smtp):
        return False
    local = when.astimezone(settings.zone).isoformat(timespec="seconds")
    subject = f"[sis-ingest] {what} failed for {account}: {file_name or '-'}"
    body = (
        f"{what} failed.\n\n"
        f"account: {account}\n"
        f"file:    {file_name or '-'}\n"
        f"time:    {local}\n"
        f"error:   {error}\n\n"
        f"The previous data stays in place. See 'ingestctl log {account}' for the folder log.\n"
    )
    try:
        send_mail(settings.smtp, subject, body)
    except (OSError, smtplib.SMTPException) as exc:
        get_logger(settings.log_dir, "loader", **log_limits(settings)).warning(
            "mail_failed", account=account, error=str(exc) or type(exc).__name__
        )
        return False
    return True
