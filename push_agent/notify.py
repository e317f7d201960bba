"""E-mails to a connection's addresses (and the configured administrators).

Sent when a connection is created, edited or deleted (who, when, what changed), when a server
fingerprint is confirmed, and when a scheduled run or its pool file pickup fails (when, the
first failure's message, the cause, and the cause of every attempt). Bodies never hold a
password, a key or file contents. A mail that cannot be sent is logged, never fatal.
"""

from __future__ import annotations

import os
import pwd
import smtplib
from collections.abc import Sequence
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


# Settings that shape only a query's output (the CSV writer): listed for query sources only.
QUERY_ONLY_SETTINGS = (
    "source_url",
    "source_query",
    "delimiter",
    "header",
    "row_terminator",
    "quoting",
)


def applicable(changes: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """The settings of a new connection that apply to it (no query options for a command)."""
    kind = next((new for key, _, new in changes if key == "source_kind"), None)
    if kind is None or kind == "query":
        return changes
    return [c for c in changes if c[0] not in QUERY_ONLY_SETTINGS]


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
    if action == "created":
        changes = applicable(changes)
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
    agent: Agent,
    connection: str,
    addresses: list[str],
    at: datetime,
    failure: Failure,
    attempts: Sequence[Failure] = (),
    pool: bool = False,
) -> None:
    """``failure`` is the run's first failure; ``attempts`` every failed attempt, in order.
    ``pool``: the pool file pickup failed after the upload succeeded (recorded apart)."""
    if pool:
        head = (
            f"The scheduled pickup of the pool file of the SFTP push connection {connection!r} "
            "failed. The upload of the same run succeeded: the since-date moved."
        )
        after = "The next run fetches the pool file again."
    else:
        head = f"A scheduled transfer of the SFTP push connection {connection!r} failed."
        after = "The next scheduled run sends data from the last successful transfer date again."
    lines = [
        head,
        "",
        f"Attempted: {_when(agent, at)}",
        "",
        failure.message,
        "",
        f"Cause: {failure.cause}",
    ]
    if len(attempts) > 1:
        lines += ["", f"Every attempt ({len(attempts)}):"]
        for number, attempt in enumerate(attempts, 1):
            lines.append(f"  {number}. {attempt.category}: {attempt.cause}")
    lines += [
        "",
        after,
        f"See 'ingest-push status' and 'ingest-push connection test {connection}'.",
    ]
    what = "pool file pickup" if pool else "scheduled transfer"
    subject = f"[ingest-push] {connection}: {what} failed ({failure.category})"
    _send(agent, connection, subject, "\n".join(lines) + "\n", recipients(agent, addresses))
