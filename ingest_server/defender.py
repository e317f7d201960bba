"""Brute-force defender: score failed logins per source address, ban past a threshold.

Scores live in memory in the listener process (workers report each failed connection to
it) over a sliding window; bans live in the control DB (``defender_bans``) so they survive a
restart, are shared by nodes, and can be listed and lifted with ``ingestctl defender``.
A connection that failed counts
once, whatever number of keys it tried. An unknown user name and a wrong key weigh the same
by default: different weights would let anyone on an allowed address tell, from how soon
the ban comes, which account names exist.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from ingest_core import metrics
from ingest_core.db import ControlDB, DefenderBan, open_control_db, utcnow
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


class Defender:
    """Scores and bans, kept by the listener for all its workers."""

    def __init__(self, settings: DefenderSettings, db: ControlDB):
        self.settings = settings
        self.db = db
        self._events: dict[str, deque[tuple[float, int]]] = {}

    def is_banned(self, address: str) -> bool:
        if not self.settings.enabled:
            return False
        with self.db.session() as session:
            until = session.scalar(
                select(DefenderBan.banned_until).where(DefenderBan.address == address)
            )
        return until is not None and until > utcnow()

    def record_failure(self, address: str, unknown_user: bool) -> int | None:
        """Add one failed connection's score (in memory, cheap); the score if it calls for a
        ban, which the caller then makes with :meth:`ban` (a DB write, off the event loop)."""
        if not self.settings.enabled:
            return None
        s = self.settings
        now = time.monotonic()
        events = self._events.setdefault(address, deque())
        events.append((now, s.score_unknown_user if unknown_user else s.score_bad_key))
        while events and events[0][0] < now - s.window_seconds:
            events.popleft()
        score = sum(points for _, points in events)
        if score < s.threshold:
            return None
        del self._events[address]
        return score

    def ban(self, address: str, score: int) -> BanView:
        """Record a ban in the control DB (blocking)."""
        now = utcnow()
        until = now + timedelta(seconds=self.settings.ban_seconds)
        reason = f"score {score} >= {self.settings.threshold} in {self.settings.window_seconds}s"
        with self.db.session.begin() as session:
            ban = session.get(DefenderBan, address)
            if ban is None:
                ban = DefenderBan(address=address)
                session.add(ban)
            ban.banned_at = now
            ban.banned_until = until
            ban.score = score
            ban.reason = reason
        metrics.ban()
        return BanView(address, _iso(now), _iso(until), score, reason)


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
    """Lift the ban on ``address``; the next connection from it is judged afresh."""
    normalized = parse_address(address).address
    db = open_control_db(settings.control_db_url)
    with db.session.begin() as session:
        result = session.execute(delete(DefenderBan).where(DefenderBan.address == normalized))
        if not result.rowcount:
            raise NotFound(f"{normalized} is not banned (see 'ingestctl defender list')")
    return normalized
