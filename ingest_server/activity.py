"""An account's recent activity, read back from the server's audit log (`ingestctl activity`).

How an operator confirms a client's test upload arrived: logins, failed logins, files
received (size, SHA-256), downloads, renames, removals and session ends, oldest first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingest_core.structured_log import read_events

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


def account_activity(log_dir: Path, name: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` server log events about account ``name``, oldest first."""
    events = [
        e
        for e in read_events(log_dir, "server")
        if e.get("account") == name and e.get("event") in SHOWN_EVENTS
    ]
    return events[-limit:] if limit else events
