"""E-mails to a connection's addresses (and the configured administrators).

Sent when a connection is created, edited or deleted (who, when, what changed) and when a
scheduled run fails (when, the failure message, the cause). Bodies never hold a password, a key
or file contents. A mail that cannot be sent is logged, never fatal.
"""

from __future__ import annotations

import os
import pwd
import smtplib
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ingest_core.mail import send_mail

if TYPE_CHECKING:
    from push_agent.agent import Agent
    from push_agent.failures import Failure


def operator_name() -> str:
    """The OS user acting (and who they were before sudo, when they used it)."""
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = str(os.geteuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (via sudo by {sudo})" if sudo and sudo != name else name


def recipients(agent: Agent, addresses: list[str]) -> list[str]:
    seen: list[str] = []
    for address in [*addresses, *agent.settings.smtp.recipients]:
        if address not in seen:
            seen.append(address)
    return seen


def _when(agent: Agent, instant: datetime) -> str:
    local = instant.astimezone(agent.settings.zone)
    return f"{local:%A %Y-%m-%d %H:%M:%S %Z} ({instant.astimezone().isoformat(timespec='seconds')})"


def _send(agent: Agent, connection: str, subject: str, body: str, to: list[str]) -> None:
    if not agent.settings.smtp.host or not to:
        return
    try:
        send_mail(agent.settings.smtp, subject, body, to)
    except (OSError, smtplib.SMTPException) as exc:
        agent.log.warning("mail_failed", connection=connection, subject=subject, error=str(exc))
        return
    agent.log.info("mail_sent", connection=connection, subject=subject, recipients=to)


def _show(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "(none)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def mail_change(
    agent: Agent,
    connection: str,
    addresses: list[str],
    action: str,
    who: str,
    when: datetime,
    changes: list[tuple[str, Any, Any]],
) -> None:
    lines = [
        f"The SFTP push connection {connection!r} was {action}.",
        "",
        f"By:   {who} on {os.uname().nodename}",
        f"When: {_when(agent, when)}",
    ]
    if changes:
        lines += ["", "What changed:" if action == "edited" else "Settings:"]
        for key, old, new in changes:
            if action == "edited":
                lines.append(f"  {key}: {_show(old)} -> {_show(new)}")
            else:
                lines.append(f"  {key}: {_show(new)}")
    subject = f"[ingest-push] connection {connection} {action}"
    _send(agent, connection, subject, "\n".join(lines) + "\n", recipients(agent, addresses))


def mail_failure(
    agent: Agent, connection: str, addresses: list[str], at: datetime, failure: Failure
) -> None:
    body = "\n".join(
        [
            f"A scheduled transfer of the SFTP push connection {connection!r} failed.",
            "",
            f"Attempted: {_when(agent, at)}",
            "",
            failure.message,
            "",
            f"Cause: {failure.cause}",
            "",
            "The next scheduled run sends data from the last successful transfer date again.",
            f"See 'ingest-push status' and 'ingest-push connection test {connection}'.",
        ]
    )
    subject = f"[ingest-push] {connection}: scheduled transfer failed ({failure.category})"
    _send(agent, connection, subject, body + "\n", recipients(agent, addresses))
