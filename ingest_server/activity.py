"""An account's recent activity, read from the control DB's journal (`ingestctl activity`).

How an operator confirms a client's test upload arrived: logins, failed logins, files
received (size, SHA-256), downloads, renames, removals, refusals and session ends, oldest
first, with the node that served each. Every server node writes to the same journal
(ingest_core.journal), so the answer is the same whichever node it is asked on.
"""

from __future__ import annotations

from typing import Any

from ingest_core.db import open_control_db
from ingest_core.journal import account_events
from ingest_core.settings import Settings

ACTIVITY_COLUMNS = ("when", "node", "event", "address", "detail", "bytes", "sha256")


def account_activity(settings: Settings, name: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` journal rows about account ``name`` (0: all), oldest first."""
    return account_events(open_control_db(settings.control_db_url), name, limit)


def activity_row(event: dict[str, Any]) -> tuple[Any, ...]:
    """One event as a row of ``ACTIVITY_COLUMNS``; the values are as recorded (a file name
    can hold anything a client sent), so whoever prints them escapes them."""
    detail = (
        event.get("name")
        or event.get("reason")
        or event.get("fingerprint")
        or event.get("request")
        or ""
    )
    if event.get("event") == "file.renamed":
        detail = f"{event.get('old_name')} -> {event.get('name')}"
    if event.get("repeated"):
        detail = f"{detail} (and {event['repeated']} more)"
    sha = (event.get("sha256") or "")[:16]
    return (
        event.get("timestamp", ""),
        event.get("node", ""),
        event.get("event"),
        event.get("address"),
        detail,
        event.get("bytes", ""),
        sha,
    )
