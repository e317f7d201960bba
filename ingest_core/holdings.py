"""An account's sessions and quota across nodes: each node's holdings in the control DB.

On one node the listener's ledger (``ingest_server.ledger``) keeps an account within
``max_sessions_per_account`` and ``account_quota_bytes``. Several nodes behind a balancer
share the data root, so the quota is the disk's, and the session limit is the account's: each
node writes what it holds for an account (sessions, bytes reserved by uploads in flight) in
``account_holdings``, and before it admits one more session or reserves more bytes it adds
what the other live nodes hold, under a transaction-level advisory lock on the account, so
two nodes can never both take the last place. Used with a PostgreSQL control DB only (a
SQLite control DB means one node).

A node's rows count while its heartbeat is recent (``STALE_AFTER_SECONDS``): a node that died
stops holding anything within that time, and a restarted node clears its own rows first.
Every method blocks (the listener runs them on one thread of their own, in order).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from ingest_core.db import AccountHolding, ClusterNode, ControlDB, advisory_lock_key, utcnow
from ingest_core.nodes import HEARTBEAT_SECONDS

# Another node's holdings count while its heartbeat is this recent (three beats).
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS


class ClusterHoldings:
    """This node's side of ``account_holdings``."""

    def __init__(self, db: ControlDB, node: str) -> None:
        self.db = db
        self.node = node

    def clear_own(self) -> None:
        """At start: nothing is held here yet (rows of an earlier run of this node go)."""
        with self.db.session.begin() as session:
            session.execute(delete(AccountHolding).where(AccountHolding.node_id == self.node))

    def try_session(self, account: str, sessions: int, reserved: int, limit: int) -> bool:
        """Admit one more session of ``account`` if, with it, this node's ``sessions`` and
        the other live nodes' stay within ``limit``; then record this node's figures."""
        with self.db.session.begin() as session:
            others_sessions, _ = self._others(session, account)
            if sessions + others_sessions > limit:
                return False
            self._write(session, account, sessions, reserved)
            return True

    def try_reserve(
        self, account: str, sessions: int, reserved: int, quota: int, committed: int
    ) -> bool:
        """Reserve if the folder's ``committed`` bytes, this node's ``reserved`` (with the new
        reservation) and the other live nodes' reservations stay within ``quota``; then
        record this node's figures."""
        with self.db.session.begin() as session:
            _, others_reserved = self._others(session, account)
            if committed + reserved + others_reserved > quota:
                return False
            self._write(session, account, sessions, reserved)
            return True

    def publish(self, figures: dict[str, tuple[int, int]]) -> None:
        """Record this node's (sessions, reserved) of each account; an account it no longer
        holds anything of loses its row."""
        with self.db.session.begin() as session:
            for account in sorted(figures):
                sessions, reserved = figures[account]
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(account)}
                )
                self._write(session, account, sessions, reserved)

    def others(self, account: str) -> tuple[int, int]:
        """(sessions, reserved bytes) the other live nodes hold for ``account``."""
        with self.db.session.begin() as session:
            return self._others(session, account)

    def _others(self, session: Session, account: str) -> tuple[int, int]:
        """Lock the account's holdings for this transaction; the other live nodes' sums."""
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(account)})
        since = datetime.now(UTC) - timedelta(seconds=STALE_AFTER_SECONDS)
        row = session.execute(
            select(
                func.coalesce(func.sum(AccountHolding.sessions), 0),
                func.coalesce(func.sum(AccountHolding.reserved), 0),
            )
            .join(ClusterNode, ClusterNode.node_id == AccountHolding.node_id)
            .where(
                AccountHolding.account == account,
                AccountHolding.node_id != self.node,
                ClusterNode.seen_at >= since,
            )
        ).one()
        return int(row[0]), int(row[1])

    def _write(self, session: Session, account: str, sessions: int, reserved: int) -> None:
        own = (AccountHolding.account == account, AccountHolding.node_id == self.node)
        if sessions <= 0 and reserved <= 0:
            session.execute(delete(AccountHolding).where(*own))
            return
        values = {"sessions": sessions, "reserved": reserved, "updated_at": utcnow()}
        session.execute(
            insert(AccountHolding)
            .values(account=account, node_id=self.node, **values)
            .on_conflict_do_update(index_elements=["account", "node_id"], set_=values)
        )


def _lock_key(account: str) -> int:
    return advisory_lock_key(f"holdings:{account}")
