"""Plain-text e-mail to operators or client contacts (SMTP, optional STARTTLS and login).

Used by the loader (failed loads and pool publishes) and the push agent (failed runs and
configuration changes). Bodies carry facts and error messages, never secrets or file contents.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from ingest_core.settings import SmtpSettings


def mail_enabled(smtp: SmtpSettings, recipients: list[str] | None = None) -> bool:
    return bool(smtp.host) and bool(recipients if recipients is not None else smtp.recipients)


def send_mail(
    smtp: SmtpSettings, subject: str, body: str, recipients: list[str] | None = None
) -> None:
    """Send one message; raises OSError/smtplib.SMTPException for the caller to log."""
    to = list(recipients if recipients is not None else smtp.recipients)
    if not smtp.host or not to:
        return
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="sis-ingest")
    message.set_content(body)
    with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as client:
        if smtp.starttls:
            client.starttls()
        if smtp.username:
            password = Path(smtp.password_file).read_text(encoding="utf-8").strip()
            client.login(smtp.username, password)
        client.send_message(message)
