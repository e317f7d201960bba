"""Test and Save, transfers, the manual export and the status view.

Rules: no transfer before a passing test and (when verification is on) a
confirmed server fingerprint; a fingerprint that changes later blocks transfers until an
operator confirms it; a failed run never moves the "since" date; the manual export touches no
state at all. One run of a connection at a time, across processes (an fcntl lock).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import posixpath
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from ingest_core.errors import Refused
from push_agent import connections
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.failures import Category, Failure, PushFailure, classify
from push_agent.notify import mail_failure
from push_agent.sources import Since, export_to, produce, remote_name_for
from push_agent.transfer import Endpoint, Session, open_session

FINGERPRINT_PREFIX = "SHA256:"


@dataclass
class Outcome:
    """What a test or a run ended with; ``failure`` is None on success."""

    connection: str
    ok: bool
    failure: Failure | None = None
    fingerprint: str | None = None
    # The type of that host key (ssh-ed25519, ssh-rsa, ...).
    key_type: str | None = None
    # Test only: the fingerprint is pinned now / still waits for an operator's confirmation.
    pinned: bool = False
    needs_confirmation: bool = False
    since: str | None = None
    remote_file: str | None = None
    bytes: int | None = None
    pool_file: str | None = None
    attempts: int = 0
    blocked: str | None = None
    # The server's other host keys it offered before the confirmed one ("ssh-ed25519 SHA256:..."),
    # and the plain-words note a test prints about them.
    other_host_keys: list[str] = field(default_factory=list)
    note: str | None = None

    @property
    def host_key(self) -> str | None:
        """ "ssh-ed25519 SHA256:...": the type beside the fingerprint."""
        if not self.fingerprint:
            return None
        return f"{self.key_type} {self.fingerprint}" if self.key_type else self.fingerprint

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "failure"}
        out["host_key"] = self.host_key
        out["message"] = self.failure.message if self.failure else None
        out["cause"] = self.failure.cause if self.failure else None
        out["category"] = str(self.failure.category) if self.failure else None
        return out


def normalize_fingerprint(text: str) -> str:
    value = text.strip()
    if not value.startswith(FINGERPRINT_PREFIX) or len(value) < len(FINGERPRINT_PREFIX) + 20:
        raise Refused(f"{text!r} is not a host key fingerprint; accepted: SHA256:... (43 chars)")
    return value


@contextmanager
def connection_lock(agent: Agent, name: str) -> Iterator[None]:
    """Never two runs (or a run and a test) of one connection at once, even across processes."""
    path = agent.settings.lock_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(f"{name!r} is busy: another run or test of it is in progress") from None
        yield
    finally:
        os.close(fd)


def since_for(agent: Agent, conn: Connection) -> Since:
    """The last successful transfer's start, else the connection's initial date."""
    last = agent.state.last_success(conn.name)
    zone = agent.settings.zone
    if last is not None:
        started: datetime = last["started_at"]
        return Since(started.astimezone(zone).date(), started.astimezone(UTC), True)
    day = date.fromisoformat(conn.since_initial)
    start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    return Since(day, start, False)


def endpoint_for(agent: Agent, conn: Connection, expected: str | None) -> Endpoint:
    key = connections.key_path(agent, conn.name)
    if conn.auth == "key" and not key.exists():
        raise Refused(
            f"{conn.name!r} uses key auth but has no key: "
            f"run 'ingest-push key generate {conn.name}'"
        )
    return Endpoint(
        host=conn.host,
        port=conn.port,
        username=conn.username,
        password=connections.read_password(agent, conn.name) if conn.auth == "password" else None,
        key_path=key if conn.auth == "key" else None,
        expected_fingerprint=expected,
        timeout=agent.settings.connect_timeout,
        bind_address=conn.bind_address,
    )


# -- Test and Save ---------------------------------------------------------------------------


async def test_connection(
    agent: Agent,
    name: str,
    accept: str | None = None,
    confirm: Callable[[str], bool] | None = None,
) -> Outcome:
    """Connect, log in, prove the remote path is writable; pin the fingerprint if confirmed."""
    conn = connections.get(agent, name)
    row = connections.get_row(agent, name)
    accepted = normalize_fingerprint(accept) if accept else None
    pinned = row["pinned_fingerprint"] if conn.verify_fingerprint else None
    expected = accepted or pinned
    endpoint = endpoint_for(agent, conn, expected)
    with connection_lock(agent, name):
        run_id = agent.state.start_run(name, "test", None, agent.now())
        outcome = Outcome(name, ok=False, attempts=1)
        note: str | None = None
        try:
            async with open_session(endpoint) as session:
                _record_host_key(outcome, session)
                note = same_server_note(session)
                await session.probe_writable(conn.remote_dir)
        except PushFailure as exc:
            outcome.failure = exc.failure
            outcome.fingerprint = exc.fingerprint
            outcome.key_type = exc.key_type
        updates: dict[str, Any] = {}
        if outcome.fingerprint:
            updates["seen_fingerprint"] = outcome.fingerprint
        if outcome.failure is None:
            outcome.ok = True
            updates["test_passed_at"] = agent.now()
            if conn.verify_fingerprint:
                seen = outcome.fingerprint
                shown = outcome.host_key
                confirmed = seen == expected or bool(confirm and shown and confirm(shown))
                if confirmed:
                    updates["pinned_fingerprint"] = seen
                    outcome.note = note
                outcome.pinned = confirmed
                outcome.needs_confirmation = not confirmed
        if updates:
            agent.state.update(name, **updates)
        _finish(agent, run_id, outcome)
    agent.log.info(
        "connection_tested",
        connection=name,
        ok=outcome.ok,
        category=str(outcome.failure.category) if outcome.failure else None,
        cause=outcome.failure.cause if outcome.failure else None,
        fingerprint=outcome.fingerprint,
        key_type=outcome.key_type,
        other_host_keys=outcome.other_host_keys,
        pinned=outcome.pinned,
    )
    return outcome


def _record_host_key(outcome: Outcome, session: Session) -> None:
    outcome.fingerprint = session.fingerprint
    outcome.key_type = session.host_key.key_type
    outcome.other_host_keys = [str(k) for k in session.offered_first]


def same_server_note(session: Session) -> str | None:
    """Plain words for a server that offered another of its host keys before the confirmed
    one: not a changed key (the confirmed key signed this connection's key exchange)."""
    if not session.offered_first:
        return None
    confirmed, others = session.host_key, session.offered_first
    offered = " and ".join(f"its {k.name} key {k.fingerprint}" for k in others)
    return (
        f"the server has more than one host key: you confirmed its {confirmed.name} key "
        f"{confirmed.fingerprint}, this connection was first offered {offered}. That is not a "
        f"changed key: asked for its {confirmed.name} key, the same server proved it holds the "
        f"key you confirmed, so {confirmed.fingerprint} is pinned and every transfer checks it."
    )


def _finish(agent: Agent, run_id: int, outcome: Outcome) -> None:
    failure = outcome.failure
    agent.state.finish_run(
        run_id,
        outcome.ok,
        remote_file=outcome.remote_file,
        bytes=outcome.bytes,
        attempts=outcome.attempts,
        category=str(failure.category) if failure else None,
        message=failure.message if failure else None,
        cause=failure.cause if failure else None,
        fingerprint=outcome.fingerprint,
    )


# -- transfers -------------------------------------------------------------------------------


def blocked_reason(row: dict[str, Any]) -> str | None:
    """Why transfers may not start yet (None: they may)."""
    if row["test_passed_at"] is None:
        return f"no passing test yet: run 'ingest-push connection test {row['name']}'"
    return None


def unconfirmed_fingerprint(row: dict[str, Any]) -> Failure | None:
    if not row["verify_fingerprint"] or row["pinned_fingerprint"]:
        return None
    seen = row["seen_fingerprint"] or "SHA256:?"
    return Failure(
        Category.NEW_FINGERPRINT,
        f"the server fingerprint {seen} has not been confirmed: check it with the server's "
        f"operator, then run 'ingest-push connection test {row['name']} --accept {seen}'",
    )


async def run_connection(agent: Agent, name: str, trigger: str = "manual") -> Outcome:
    """Push now (``ingest-push run``) or at a scheduled instant (the daemon)."""
    row = connections.get_row(agent, name)
    blocked = blocked_reason(row)
    if blocked:
        if trigger == "manual":
            raise Refused(f"{name!r} cannot transfer yet: {blocked}")
        agent.log.warning("run_blocked", connection=name, reason=blocked)
        return Outcome(name, ok=False, blocked=blocked)
    with connection_lock(agent, name):
        return await run_locked(agent, name, trigger)


async def run_locked(agent: Agent, name: str, trigger: str) -> Outcome:
    """One run, the caller holding the connection's lock; always recorded and classified."""
    row = connections.get_row(agent, name)
    conn = Connection.from_row(row)
    since = since_for(agent, conn)
    started = agent.now()
    run_id = agent.state.start_run(name, trigger, since.text, started)
    agent.log.info("run_started", connection=name, trigger=trigger, since=since.text)
    outcome = Outcome(name, ok=False, since=since.text)
    work = agent.settings.work_dir / f"{name}.{secrets.token_hex(4)}.out"
    try:
        unconfirmed = unconfirmed_fingerprint(row)
        if unconfirmed:
            raise PushFailure(unconfirmed)
        if conn.auth == "key" and not connections.key_path(agent, name).exists():
            raise PushFailure(
                Failure(Category.AUTHENTICATION, f"no key exists for {name} (key generate)")
            )
        expected = row["pinned_fingerprint"] if conn.verify_fingerprint else None
        sending: Path | None = None
        if conn.source_kind != "none":
            sending = await asyncio.to_thread(
                produce, conn, since, work, agent.settings.command_timeout
            )
        await _transfer_with_retries(agent, conn, expected, sending, outcome)
        outcome.ok = True
    except PushFailure as exc:
        outcome.failure = exc.failure
        if exc.fingerprint:
            outcome.fingerprint, outcome.key_type = exc.fingerprint, exc.key_type
        if exc.fingerprint and exc.failure.category is Category.NEW_FINGERPRINT:
            agent.state.update(name, seen_fingerprint=exc.fingerprint)
    except Exception as exc:  # a run must always end recorded and classified
        outcome.failure = classify(exc, "sftp", conn.host, conn.port)
    finally:
        work.unlink(missing_ok=True)
    _finish(agent, run_id, outcome)
    failure = outcome.failure
    agent.log.info(
        "run_finished",
        connection=name,
        trigger=trigger,
        ok=outcome.ok,
        since=since.text,
        remote_file=outcome.remote_file,
        bytes=outcome.bytes,
        pool_file=outcome.pool_file,
        attempts=outcome.attempts,
        host_key=outcome.host_key,
        other_host_keys=outcome.other_host_keys,
        category=str(failure.category) if failure else None,
        message=failure.message if failure else None,
        cause=failure.cause if failure else None,
    )
    if failure is not None and trigger == "scheduled":
        mail_failure(agent, name, conn.notify, started, failure)
    return outcome


async def _transfer_with_retries(
    agent: Agent, conn: Connection, expected: str | None, sending: Path | None, outcome: Outcome
) -> None:
    """One session per attempt; transient failures are retried with a doubling pause."""
    retries = agent.settings.retries
    for attempt in range(retries + 1):
        outcome.attempts = attempt + 1
        try:
            async with open_session(endpoint_for(agent, conn, expected)) as session:
                _record_host_key(outcome, session)
                await _transfer(conn, session, sending, outcome)
            return
        except PushFailure as exc:
            if not exc.failure.transient or attempt == retries:
                raise
            pause = agent.settings.retry_backoff * (2**attempt)
            agent.log.warning(
                "attempt_failed",
                connection=conn.name,
                attempt=attempt + 1,
                category=str(exc.failure.category),
                cause=exc.failure.cause,
                retry_in=pause,
            )
            await asyncio.sleep(pause)


async def _transfer(
    conn: Connection, session: Session, sending: Path | None, outcome: Outcome
) -> None:
    if sending is not None:
        name = remote_name_for(conn, sending)
        outcome.bytes = await session.upload(sending, conn.remote_dir, name)
        outcome.remote_file = posixpath.join(conn.remote_dir, name)
    if conn.pool_remote and conn.pool_local:
        remote = conn.pool_remote
        if not remote.startswith("/"):
            remote = posixpath.join(conn.remote_dir, remote)
        await session.download(remote, Path(conn.pool_local))
        outcome.pool_file = conn.pool_local


# -- manual export and status ----------------------------------------------------------------


def export_connection(agent: Agent, name: str, out: Path) -> tuple[Path, Since]:
    """Write what the next run would send, locally; reads state, never writes it."""
    conn = connections.get(agent, name)
    if conn.source_kind == "none":
        raise Refused(f"{name!r} sends no file (it only picks up a pool file): nothing to export")
    since = since_for(agent, conn)
    try:
        path = export_to(conn, since, out, agent.settings.command_timeout)
    except PushFailure as exc:
        raise Refused(f"export of {name!r} failed: {exc.failure.cause}") from None
    agent.log.info("exported", connection=name, since=since.text, out=str(path))
    return path, since


def next_run(agent: Agent, row: dict[str, Any]) -> datetime:
    """The first scheduled instant after the last one handled (may be in the past: due now)."""
    freq = Connection.from_row(row).schedule(agent)
    return freq.next_after(row["schedule_anchor"])


def status(agent: Agent) -> list[dict[str, Any]]:
    """The "configuration issues" view: one entry per connection."""
    entries = []
    for row in agent.state.all():
        name = row["name"]
        success = agent.state.last_success(name)
        failure = agent.state.last_failure(name)
        unconfirmed = unconfirmed_fingerprint(row)
        blocked = blocked_reason(row) or (unconfirmed.cause if unconfirmed else None)
        mismatch = (
            row["pinned_fingerprint"]
            and row["seen_fingerprint"]
            and row["seen_fingerprint"] != row["pinned_fingerprint"]
        )
        if mismatch:
            blocked = (
                f"the server now presents {row['seen_fingerprint']}: confirm it with "
                f"'ingest-push connection test {name} --accept {row['seen_fingerprint']}'"
            )
        entries.append(
            {
                "name": name,
                "host": f"{row['host']}:{row['port']}",
                "frequency": row["frequency"],
                "last_success": success["started_at"] if success else None,
                "since": since_for(agent, Connection.from_row(row)).text,
                "last_failure": failure["started_at"] if failure else None,
                "last_failure_message": failure["message"] if failure else None,
                "last_failure_cause": failure["cause"] if failure else None,
                "next_run": next_run(agent, row),
                "verified_fingerprint": row["pinned_fingerprint"],
                "seen_fingerprint": row["seen_fingerprint"],
                "tested_at": row["test_passed_at"],
                "blocked": blocked,
            }
        )
    return entries
