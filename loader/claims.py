"""Once per cluster: a nightly job (one account's load or pool publish) runs on one node only.

Several nodes may share one control DB and one data root; every node's daemon wakes at the
same scheduled minute. Two things make each account's job happen once:

- the account's **lock**, held for the whole run: on PostgreSQL a transaction-level advisory
  lock (``pg_try_advisory_xact_lock``) on a connection of its own whose transaction stays
  open for the run (it frees at commit, rollback or disconnect, so a killed node never keeps
  it; a session-level lock would survive return to the connection pool); on SQLite (one
  node) an ``flock`` on ``data_root/locks/<account>.lock``;
- a **claim** row in ``job_claims``, unique per (job, account, run key). A scheduled run's
  key is its local date (``2026-12-01``): a node that finds the row finished knows another
  node did the run. A manual run (``ingestctl loader run``) gets a key of its own
  (``manual-...``), so running it twice in a row runs twice; its row is what another node
  names in "running on NODE since TIME".

The rule for a node that died mid-run: its claim stays unfinished, but its lock is gone. A
later run of the same key that gets the lock takes the claim over and does the run.

A node that finds the job done or the account locked writes nothing anywhere the client or
the SIS history would see: the caller gets a :class:`Turn` that says so in one line.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError

from ingest_core.console import local_time
from ingest_core.db import ControlDB, JobClaim, advisory_lock_key, open_control_db, utcnow
from ingest_core.folders import lock_path
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits

LOAD = "load"
POOL = "pool"
KEYS = "keys"  # the key-expiry reminders, one pass over every account
MANUAL_PREFIX = "manual-"
# What each job's advisory lock key is made from (the account's name follows the colon).
_LOCK_PREFIX = {LOAD: "account", POOL: "pool", KEYS: "keys"}

OK = "ok"
FAILED = "failed"


def lock_key(job: str, account: str) -> int:
    """The advisory lock key of one job of one account: the first 8 bytes of blake2b of
    ``account:<name>`` (``pool:<name>`` for the pool publish) as a signed 64-bit number; the
    same on every node and every Python (``hash()`` is salted per process)."""
    return advisory_lock_key(f"{_LOCK_PREFIX[job]}:{account}")


def _lock_file(settings: Settings, job: str, account: str) -> Path:
    return lock_path(settings, account if job == LOAD else f"{account}.{job}")


@contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Hold an ``flock`` on ``path`` if free; yields False if another holder has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def advisory_lock(db: ControlDB, key: int) -> Iterator[bool]:
    """Hold a PostgreSQL transaction-level advisory lock for the ``with`` block, on a
    connection of its own whose transaction commits at the end; yields False if taken."""
    with db.engine.connect() as conn:
        transaction = conn.begin()
        try:
            got = bool(
                conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar()
            )
            yield got
        except BaseException:
            transaction.rollback()
            raise
        else:
            transaction.commit()


@contextmanager
def job_lock(settings: Settings, job: str, account: str) -> Iterator[bool]:
    """The account's lock for ``job``: advisory on PostgreSQL, a file lock on SQLite."""
    db = open_control_db(settings.control_db_url)
    if db.engine.dialect.name == "postgresql":
        with advisory_lock(db, lock_key(job, account)) as got:
            yield got
    else:
        with file_lock(_lock_file(settings, job, account)) as got:
            yield got


@dataclass
class Turn:
    """This node's turn at one job of one account: ``run`` it, or ``skipped`` says why not
    (one line: "NAME: already done by NODE at TIME" or "NAME: running on NODE since TIME").
    The caller sets ``outcome`` (recorded in the claim when the run ends)."""

    account: str
    run: bool
    skipped: str = ""
    claim_id: int | None = None
    outcome: str = OK


def _describe(settings: Settings, account: str, claim: JobClaim | None, finished: bool) -> str:
    if claim is None:
        return f"{account}: another run of this account is running"
    zone = settings.zone
    if finished and claim.finished_at is not None:
        return f"{account}: already done by {claim.node} at {local_time(claim.finished_at, zone)}"
    return f"{account}: running on {claim.node} since {local_time(claim.claimed_at, zone)}"


def _insert(db: ControlDB, job: str, account: str, run_key: str, node: str) -> JobClaim | None:
    """The new claim row, or None if (job, account, run_key) is claimed already."""
    try:
        with db.session.begin() as session:
            claim = JobClaim(
                job=job, account=account, run_key=run_key, node=node, claimed_at=utcnow()
            )
            session.add(claim)
        return claim
    except IntegrityError:
        return None


def _by_key(db: ControlDB, job: str, account: str, run_key: str) -> JobClaim | None:
    with db.session() as session:
        return session.scalar(
            select(JobClaim).where(
                JobClaim.job == job, JobClaim.account == account, JobClaim.run_key == run_key
            )
        )


def _running(db: ControlDB, job: str, account: str, other_than: int | None) -> JobClaim | None:
    """The newest unfinished claim of the account's job (the run holding its lock)."""
    with db.session() as session:
        query = select(JobClaim).where(
            JobClaim.job == job, JobClaim.account == account, JobClaim.finished_at.is_(None)
        )
        if other_than is not None:
            query = query.where(JobClaim.id != other_than)
        return session.scalar(query.order_by(JobClaim.id.desc()).limit(1))


def _drop_own(db: ControlDB, claim: JobClaim) -> None:
    """Remove a claim this node made for a run it did not do (only if still its own)."""
    with db.session.begin() as session:
        session.execute(
            delete(JobClaim).where(
                JobClaim.id == claim.id,
                JobClaim.node == claim.node,
                JobClaim.claimed_at == claim.claimed_at,
                JobClaim.finished_at.is_(None),
            )
        )


def _finish(db: ControlDB, claim_id: int, outcome: str) -> None:
    with db.session.begin() as session:
        session.execute(
            update(JobClaim)
            .where(JobClaim.id == claim_id)
            .values(finished_at=utcnow(), outcome=outcome[:32])
        )


def _take_over(db: ControlDB, claim_id: int, node: str) -> None:
    with db.session.begin() as session:
        session.execute(
            update(JobClaim)
            .where(JobClaim.id == claim_id, JobClaim.finished_at.is_(None))
            .values(node=node, claimed_at=utcnow())
        )


def _unfinished_before(db: ControlDB, job: str, account: str, before_id: int) -> list[int]:
    with db.session() as session:
        return list(
            session.scalars(
                select(JobClaim.id).where(
                    JobClaim.job == job,
                    JobClaim.account == account,
                    JobClaim.id < before_id,
                    JobClaim.finished_at.is_(None),
                )
            )
        )


def _finished_among(db: ControlDB, ids: list[int]) -> JobClaim | None:
    if not ids:
        return None
    with db.session() as session:
        return session.scalar(
            select(JobClaim)
            .where(JobClaim.id.in_(ids), JobClaim.finished_at.is_not(None))
            .order_by(JobClaim.finished_at.desc())
            .limit(1)
        )


def manual_run_key(when: datetime | None = None) -> str:
    """A key of its own for an operator's run: it never collides, so it never blocks."""
    stamp = (when or utcnow()).strftime("%Y%m%dT%H%M%S")
    return f"{MANUAL_PREFIX}{stamp}-{secrets.token_hex(6)}"


@contextmanager
def job_turn(settings: Settings, job: str, account: str, run_key: str | None) -> Iterator[Turn]:
    """Claim and lock one job of one account for the ``with`` block; the :class:`Turn` says
    whether this node runs it. ``run_key`` is the scheduled run's local date, or None for a
    manual run (which runs unless the account is busy, or a run that was going on when it
    started has finished meanwhile: that run did the work)."""
    db = open_control_db(settings.control_db_url)
    node = settings.node_id
    manual = run_key is None
    key = manual_run_key() if manual else str(run_key)
    mine = _insert(db, job, account, key, node)
    existing = None if mine is not None else _by_key(db, job, account, key)
    if existing is not None and existing.finished_at is not None:
        yield Turn(account, False, _describe(settings, account, existing, True))
        return
    # Runs of the account going on as this one started (a manual run's only way to tell it
    # overlapped another run that then finished first).
    overlapping = _unfinished_before(db, job, account, mine.id) if manual and mine else []
    locked = False
    try:
        with job_lock(settings, job, account) as got:
            locked = True
            yield from _with_lock(settings, db, job, account, key, manual, mine, overlapping, got)
    except BaseException:
        if not locked and mine is not None:  # the lock could not even be tried
            _drop_own(db, mine)
        raise


def _with_lock(
    settings: Settings,
    db: ControlDB,
    job: str,
    account: str,
    key: str,
    manual: bool,
    mine: JobClaim | None,
    overlapping: list[int],
    got: bool,
) -> Iterator[Turn]:
    """The part of :func:`job_turn` that runs with the lock tried (``got``: taken)."""
    log = get_logger(settings.log_dir, "loader", **log_limits(settings))
    node = settings.node_id
    if not got:
        if mine is not None:
            _drop_own(db, mine)
        holder = _by_key(db, job, account, key) if not manual else None
        if holder is None or holder.finished_at is not None:
            holder = _running(db, job, account, mine.id if mine else None)
        turn = Turn(account, False, _describe(settings, account, holder, False))
        log.info("job_skipped_busy", job=job, account=account, run_key=key, skipped=turn.skipped)
        yield turn
        return
    # Holding the lock: nobody else runs this account's job now.
    done = _finished_among(db, overlapping)
    current = _by_key(db, job, account, key)
    if not manual and current is not None and current.finished_at is not None:
        done = current
    if done is not None:
        if mine is not None and (current is None or current.node == node):
            _drop_own(db, mine)
        turn = Turn(account, False, _describe(settings, account, done, True))
        log.info("job_skipped_done", job=job, account=account, run_key=key, skipped=turn.skipped)
        yield turn
        return
    if current is None:  # removed meanwhile (never by a live run): claim it again
        current = _insert(db, job, account, key, node) or _by_key(db, job, account, key)
        if current is None:
            raise RuntimeError(f"the claim of {job} {account} {key} vanished")
    if current.node != node or mine is None or current.id != mine.id:
        # An unfinished claim while its lock is free: its node died mid-run.
        _take_over(db, current.id, node)
        log.warning(
            "job_claim_taken_over",
            job=job,
            account=account,
            run_key=key,
            from_node=current.node,
            claimed_at=current.claimed_at.isoformat(),
        )
    turn = Turn(account, True, claim_id=current.id)
    try:
        yield turn
    except BaseException:
        turn.outcome = FAILED
        raise
    finally:
        try:
            _finish(db, current.id, turn.outcome)
        except Exception as exc:  # the run is done; a later run may redo it
            log.error("job_claim_not_finished", job=job, account=account, error=str(exc))
