"""An account's recent activity, read back from the server's audit log (`ingestctl activity`).

How an operator confirms a client's test upload arrived: logins, failed logins, files
received (size, SHA-256), downloads, renames, removals and session ends, oldest first.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from ingest_core.structured_log import iter_events

SHOWN_EVENTS = (
    "auth.success",
    "auth.failure",
    "file.received",
    "file.download",
    "file.renamed",
    "file.removed",
    "upload.discarded",
    "limit.hit",
    "channel.refused",
    "session.end",
)


ACTIVITY_COLUMNS = ("when", "event", "address", "detail", "bytes", "sha256")


def account_activity(log_dir: Path, name: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` server log events about account ``name``, oldest first."""
    events = (
        e
        for e in iter_events(log_dir, "server")
        if e.get("account") == name and e.get("event") in SHOWN_EVENTS
    )
    if not limit:
        return list(events)
    return list(collections.deque(events, maxlen=limit))  # memory bounded by ``limit``


def activity_row(event: dict[str, Any]) -> tuple[Any, ...]:
    """One event as a row of ``ACTIVITY_COLUMNS``; the values are as logged (a file name can
    hold anything a client sent), so whoever prints them escapes them."""
    detail = (
        event.get("name")
        or event.get("reason")
        or event.get("fingerprint")
        or event.get("request")
        or ""
    )
    if event.get("event") == "file.renamed":
        detail = f"{event.get('old_name')} -> {event.get('name')}"
    sha = (event.get("sha256") or "")[:16]
    return (
        event.get("timestamp", ""),
        event.get("event"),
        event.get("address"),
        detail,
        event.get("bytes", ""),
        sha,
    )
