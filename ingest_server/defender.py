"""Brute-force defender: score failed logins per source address, ban past a threshold.

Scores and bans live in the control DB, so every node behind a load balancer adds to one
score per address: each failed connection is a row in ``defender_failures`` (its points,
when, which node); the score is the sum of an address's rows within the window. Past the
threshold the address goes into ``defender_bans`` (it survives restarts and is refused by
every node) and its failure rows are deleted, as ``ingestctl defender unban`` deletes them:
after a ban or an unban the next connection is judged afresh on every node.

A connection that failed counts once, whatever number of keys it tried. An unknown user
name and a wrong key weigh the same by default: different weights would let anyone on an
allowed address tell, from how soon the ban comes, which account names exist.

Every method here is a DB round trip: the listener calls them in a thread, never on its
event loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from ingest_core import metrics
from ingest_core.db import ControlDB, DefenderBan, DefenderFailure, open_control_db, utcnow
from ingest_core.errors import NotFound
from ingest_core.policy import parse_address
from ingest_core.settings import DefenderSettings, Settings


@dataclass(frozen=True)
class BanView:
    address: str
    banned_at: str
    banned_until: str
    score: int
    reason: str


def _address_lock(session: Session, address: str) -> None:
    """On PostgreSQL, one transaction at a time per address (until commit): two nodes
    scoring the same address at once would each miss the other's uncommitted row. SQLite
    serializes writers anyway."""
    if session.get_bind().dialect.name == "postgresql":
        digest = hashlib.blake2b(f"defender {address}".encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(key)))


class Defender:
    """Scores and bans in the control DB, shared by every worker and every node."""

    def __init__(self, settings: DefenderSettings, db: ControlDB, node: str = ""):
        self.settings = settings
        self.db = db
        self.node = node

    def is_banned(self, address: str) -> bool:
        if not self.settings.enabled:
            return False
        with self.db.session() as session:
            until = session.scalar(
                select(DefenderBan.banned_until).where(DefenderBan.address == address)
            )
        return until is not None and until > utcnow()

    def record_failure(self, address: str, unknown_user: bool) -> BanView | None:
        """Add one failed connection's points to the address's shared score; the ban, if
        the score within the window has reached the threshold (blocking)."""
        if not self.settings.enabled:
            return None
        s = self.settings
        points = s.score_unknown_user if unknown_user else s.score_bad_key
        now = utcnow()
        window_start = now - timedelta(seconds=s.window_seconds)
        with self.db.session.begin() as session:
            _address_lock(session, address)
            session.execute(
                delete(DefenderFailure).where(
                    DefenderFailure.address == address, DefenderFailure.at < window_start
                )
            )
            session.add(DefenderFailure(address=address, at=now, points=points, node=self.node))
            session.flush()
            score = session.scalar(
                select(func.coalesce(func.sum(DefenderFailure.points), 0)).where(
                    DefenderFailure.address == address
                )
            )
            if score < s.threshold:
                return None
            ban = self._ban(session, address, int(score), now)
        metrics.ban()
        return ban

    def _ban(self, session: Session, address: str, score: int, now: datetime) -> BanView:
        until = now + timedelta(seconds=self.settings.ban_seconds)
        reason = f"score {score} >= {self.settings.threshold} in {self.settings.window_seconds}s"
        ban = session.get(DefenderBan, address)
        if ban is None:
            ban = DefenderBan(address=address)
            session.add(ban)
        ban.banned_at = now
        ban.banned_until = until
        ban.score = score
        ban.reason = reason
        session.execute(delete(DefenderFailure).where(DefenderFailure.address == address))
        return BanView(address, _iso(now), _iso(until), score, reason)


def failure_score(db: ControlDB, address: str, window_seconds: int) -> int:
    """Points of ``address``'s failed connections within the last ``window_seconds``."""
    since = utcnow() - timedelta(seconds=window_seconds)
    with db.session() as session:
        score = session.scalar(
            select(func.coalesce(func.sum(DefenderFailure.points), 0)).where(
                DefenderFailure.address == address, DefenderFailure.at >= since
            )
        )
    return int(score or 0)


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


def list_bans(settings: Settings) -> list[BanView]:
    """Bans in force now, soonest to expire first."""
    db = open_control_db(settings.control_db_url)
    with db.session() as session:
        rows = session.scalars(
            select(DefenderBan)
            .where(DefenderBan.banned_until > utcnow())
            .order_by(DefenderBan.banned_until)
        ).all()
        return [
            BanView(r.address, _iso(r.banned_at), _iso(r.banned_until), r.score, r.reason)
            for r in rows
        ]


def unban(settings: Settings, address: str) -> str:
    """Lift the ban on ``address`` and forget its failed connections on every node: the
    next connection from it is judged afresh."""
    normalized = parse_address(address).address
    db = open_control_db(settings.control_db_url)
    with db.session.begin() as session:
        _address_lock(session, normalized)
        result = session.execute(delete(DefenderBan).where(DefenderBan.address == normalized))
        session.execute(delete(DefenderFailure).where(DefenderFailure.address == normalized))
        banned = bool(result.rowcount)
    if not banned:
        raise NotFound(f"{normalized} is not banned (see 'ingestctl defender list')")
    return normalized
