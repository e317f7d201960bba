"""This node among the others that share its data root and control DB.

Each serving node keeps a row in ``cluster_nodes`` (started_at, seen_at, draining) and a marker
file ``<data_root>/nodes/<node>``, both refreshed by its heartbeat every
``HEARTBEAT_SECONDS``. From them:

- which nodes are alive: a row seen within ``DEAD_AFTER_SECONDS``. With a SQLite control DB
  there is only this node (the guard below keeps it so).
- what happens to uploads' temporary files (their names carry the node and process that
  write them, ``folders.upload_writer``): a node removes its own at start, whatever their age
  (none of its processes runs any more); its listener removes a worker's as soon as that
  worker exits; the sweep removes another node's only when that node is dead (or never
  registered), or when a file has not been touched for ``LEFTOVER_MAX_AGE_SECONDS``. A live
  node's stalled upload is never taken from under it.
- the single-node guard: SQLite cannot be shared by several machines, so a node whose control
  DB is SQLite refuses to start while another node's marker in the same data root is fresh
  (touched within ``MARKER_FRESH_SECONDS``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update

from ingest_core.db import ClusterNode, ControlDB
from ingest_core.errors import IngestError
from ingest_core.folders import (
    node_marker,
    node_tag,
    nodes_dir,
    remove_upload_temps,
    upload_writer,
)
from ingest_core.settings import Settings

HEARTBEAT_SECONDS = 30.0
# No heartbeat for this long: the node is gone (killed, powered off, cut off).
DEAD_AFTER_SECONDS = 600.0
# Another node's marker touched within this long: that node uses this data root now.
MARKER_FRESH_SECONDS = 180.0
# An upload temporary file untouched this long is a leftover, whichever node wrote it.
LEFTOVER_MAX_AGE_SECONDS = 24 * 3600.0
SWEEP_SECONDS = 300.0


class DataRootShared(IngestError):
    """Another node uses this data root while the control DB is SQLite (exit 1)."""


def uses_sqlite(settings: Settings) -> bool:
    return settings.control_db_url.startswith("sqlite")


def this_node(settings: Settings) -> str:
    """This node's id as rows and file names carry it."""
    return node_tag(settings.node_id)


# -- the marker in the data root -------------------------------------------------------------


def touch_marker(settings: Settings) -> None:
    """Say "this node uses this data root, now" (blocking)."""
    marker = node_marker(settings, settings.node_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()  # an existing marker's time moves to now


def remove_marker(settings: Settings) -> None:
    """At a clean stop: this node no longer uses the data root."""
    with contextlib.suppress(OSError):
        node_marker(settings, settings.node_id).unlink()


def fresh_markers(settings: Settings, now: float | None = None) -> dict[str, float]:
    """Other nodes' markers touched within ``MARKER_FRESH_SECONDS``: node -> seconds ago."""
    now = time.time() if now is None else now
    own = this_node(settings)
    found: dict[str, float] = {}
    with contextlib.suppress(OSError), os.scandir(nodes_dir(settings)) as listing:
        for entry in listing:
            with contextlib.suppress(OSError):
                age = now - entry.stat(follow_symlinks=False).st_mtime
                other = entry.name != own and entry.is_file(follow_symlinks=False)
                if other and age < MARKER_FRESH_SECONDS:
                    found[entry.name] = max(age, 0.0)
    return found


def claim_data_root(settings: Settings) -> None:
    """Before this node serves: with SQLite, refuse when another node used this data root
    recently; then touch this node's marker. Raises :class:`DataRootShared`."""
    if uses_sqlite(settings):
        others = fresh_markers(settings)
        if others:
            other = min(others, key=others.__getitem__)
            raise DataRootShared(
                f"node {other!r} used the data root {settings.data_root} {others[other]:.0f} s "
                f"ago ({node_marker(settings, other)}) and the control DB is SQLite, which only "
                "one node can use: give several nodes a PostgreSQL control_db_url, or give this "
                "node its own data_root (a marker older than "
                f"{MARKER_FRESH_SECONDS:.0f} s is ignored)"
            )
    touch_marker(settings)


# -- the cluster_nodes row ---------------------------------------------------------------------


def register_node(db: ControlDB, settings: Settings) -> None:
    """This node starts: its row says started now, seen now, not draining (blocking)."""
    now = datetime.now(UTC)
    node = this_node(settings)
    with db.session.begin() as session:
        row = session.get(ClusterNode, node)
        if row is None:
            row = ClusterNode(node_id=node)
            session.add(row)
        row.host = socket.gethostname()[:255]
        row.started_at = row.seen_at = now
        row.draining = False


def note_alive(db: ControlDB, settings: Settings) -> None:
    """A process of this node that serves no clients (``ingestctl loader daemon`` alone)
    starts: the node's row exists and is seen now; a server's own row (its start time, its
    draining) is left as it is (blocking)."""
    now = datetime.now(UTC)
    node = this_node(settings)
    with db.session.begin() as session:
        row = session.get(ClusterNode, node)
        if row is None:
            session.add(
                ClusterNode(
                    node_id=node,
                    host=socket.gethostname()[:255],
                    started_at=now,
                    seen_at=now,
                    draining=False,
                )
            )
        else:
            row.seen_at = now


def heartbeat(db: ControlDB, settings: Settings) -> None:
    """This node is alive: its row's seen_at and its marker's time move to now (blocking)."""
    touch_marker(settings)
    with db.session.begin() as session:
        session.execute(
            update(ClusterNode)
            .where(ClusterNode.node_id == this_node(settings))
            .values(seen_at=datetime.now(UTC))
        )


def mark_draining(db: ControlDB, settings: Settings) -> None:
    """This node stops taking new sessions (blocking)."""
    with db.session.begin() as session:
        session.execute(
            update(ClusterNode)
            .where(ClusterNode.node_id == this_node(settings))
            .values(draining=True, seen_at=datetime.now(UTC))
        )


def live_nodes(db: ControlDB, settings: Settings, now: datetime | None = None) -> set[str]:
    """Nodes whose heartbeat is more recent than ``DEAD_AFTER_SECONDS`` (this one always;
    with SQLite only this one)."""
    own = this_node(settings)
    if uses_sqlite(settings):
        return {own}
    since = (now or datetime.now(UTC)) - timedelta(seconds=DEAD_AFTER_SECONDS)
    with db.session() as session:
        found = session.scalars(select(ClusterNode.node_id).where(ClusterNode.seen_at >= since))
        return {*found, own}


# -- leftovers -----------------------------------------------------------------------------


def remove_leftover_uploads(settings: Settings, live: set[str], now: float | None = None) -> int:
    """Remove other nodes' upload temporary files when their node is not in ``live``, and
    any node's but this one's not touched for ``LEFTOVER_MAX_AGE_SECONDS`` (blocking)."""
    now = time.time() if now is None else now
    own = this_node(settings)

    def leftover(path: Path) -> bool:
        writer = upload_writer(path.name)
        if writer is not None and writer[0] == own:
            return False  # ours: removed at start and when a worker exits, never here
        if writer is not None and writer[0] not in live:
            return True
        return now - path.lstat().st_mtime >= LEFTOVER_MAX_AGE_SECONDS

    return remove_upload_temps(settings, leftover)


def sweep_leftover_uploads(db: ControlDB, settings: Settings) -> int:
    """One sweep: the nodes alive now, then their leftovers' fate (blocking)."""
    return remove_leftover_uploads(settings, live_nodes(db, settings))
