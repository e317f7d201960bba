"""Test and Save, transfers, the manual export and the status view.

Rules: no transfer before a passing test and (when verification is on) a
confirmed server fingerprint; a fingerprint that changes later blocks transfers until an
operator confirms it; a failed run never moves the "since" date; the manual export touches no
state at all. One run of a connection at a time, across processes (an fcntl lock).

A run that sends a file and picks up a pool file records the two apart: the upload's success
moves the since-date as soon as it is done, and a pool pickup that fails is a failure of its own
(a second row, ``part="pool"``). A failed run reports its first failure's message and keeps the
cause of every attempt. The daemon takes a run the agent stopped in up again once
(:func:`push_agent.daemon.recover_interrupted`): ``run_locked(..., resume=row)``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
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
from push_agent.notify import mail_change, mail_failure, operator_name
from push_agent.sources import Since, export_to, produce, remember_sent, remote_name_for
from push_agent.state import LOW_DISK_BYTES, PART_POOL, StateUnavailable, free_bytes
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
    # Every failed attempt, oldest first (``failure`` is the first of them).
    attempt_failures: list[Failure] = field(default_factory=list)
    # The pool pickup of a run that also uploaded, recorded apart (None: it did not fail).
    pool_failure: Failure | None = None
    pool_attempts: int = 0
    pool_attempt_failures: list[Failure] = field(default_factory=list)
    # The daemon took this run up again after the agent stopped in it.
    resumed: bool = False

    @property
    def host_key(self) -> str | None:
        """ "ssh-ed25519 SHA256:...": the type beside the fingerprint."""
        if not self.fingerprint:
            return None
        return f"{self.key_type} {self.fingerprint}" if self.key_type else self.fingerprint

    def as_dict(self) -> dict[str, Any]:
        failures = ("failure", "attempt_failures", "pool_failure", "pool_attempt_failures")
        out = {k: v for k, v in self.__dict__.items() if k not in failures}
        out["host_key"] = self.host_key
        out["message"] = self.failure.message if self.failure else None
        out["cause"] = self.failure.cause if self.failure else None
        out["category"] = str(self.failure.category) if self.failure else None
        out["attempt_causes"] = attempt_causes(self.attempt_failures)
        out["pool_message"] = self.pool_failure.message if self.pool_failure else None
        out["pool_cause"] = self.pool_failure.cause if self.pool_failure else None
        out["pool_category"] = str(self.pool_failure.category) if self.pool_failure else None
        out["pool_attempt_causes"] = attempt_causes(self.pool_attempt_failures)
        return out


def attempt_causes(failures: list[Failure]) -> list[dict[str, str]]:
    """What every failed attempt ended with, oldest first (stored as JSON with the run)."""
    return [{"category": str(f.category), "cause": f.cause} for f in failures]


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
    if outcome.pinned and outcome.fingerprint != row["pinned_fingerprint"]:
        _announce_pin(agent, conn, row["pinned_fingerprint"], outcome)
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


def _announce_pin(agent: Agent, conn: Connection, old: str | None, outcome: Outcome) -> None:
    """A newly confirmed server fingerprint changes which server the agent trusts: mailed and
    logged like any other change of the connection."""
    who = operator_name()
    agent.log.info(
        "fingerprint_confirmed", connection=conn.name, by=who, old=old, new=outcome.host_key
    )
    mail_change(
        agent,
        conn.name,
        conn.notify,
        "edited",
        who,
        agent.now(),
        [("confirmed server fingerprint", old, outcome.host_key)],
    )


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


def _finish(agent: Agent, run_id: int, outcome: Outcome, **extra: Any) -> None:
    failure = outcome.failure
    causes = attempt_causes(outcome.attempt_failures)
    if outcome.ok:
        extra["remote_temps"] = None  # the temporary name was renamed into place
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
        attempt_causes=json.dumps(causes) if causes else None,
        **extra,
    )


def _finish_pool(agent: Agent, run_id: int, conn: Connection, outcome: Outcome) -> None:
    failure = outcome.pool_failure
    causes = attempt_causes(outcome.pool_attempt_failures)
    agent.state.finish_run(
        run_id,
        failure is None,
        remote_file=_pool_remote(conn),
        attempts=outcome.pool_attempts,
        category=str(failure.category) if failure else None,
        message=failure.message if failure else None,
        cause=failure.cause if failure else None,
        fingerprint=outcome.fingerprint,
        attempt_causes=json.dumps(causes) if causes else None,
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


async def run_locked(
    agent: Agent, name: str, trigger: str, resume: dict[str, Any] | None = None
) -> Outcome:
    """One run, the caller holding the connection's lock; always recorded and classified.

    ``resume`` is the row of a run the agent stopped in: the daemon takes it up again (once),
    under the same row; the stop counts as its first failed attempt."""
    row = connections.get_row(agent, name)
    conn = Connection.from_row(row)
    since = since_for(agent, conn)
    outcome = Outcome(name, ok=False, since=since.text)
    with agent.state.guard():
        if resume is None:
            started = agent.now()
            run_id = agent.state.start_run(name, trigger, since.text, started)
        else:
            started, run_id = resume["started_at"], int(resume["id"])
            agent.state.restart_run(run_id)
            outcome.resumed = True
            outcome.attempt_failures.append(stopped_failure(agent, resume, taken_up=True))
    agent.log.info(
        "run_started", connection=name, trigger=trigger, since=since.text, resumed=outcome.resumed
    )
    work = agent.settings.work_dir / f"{name}.{secrets.token_hex(4)}.out"
    pool_run: list[int] = []

    def uploaded(sent: Path) -> None:
        """The upload is done: the since-date moves now, whatever the pool pickup does."""
        remember_sent(agent, conn, sent)  # its line count, for the next --min-line-share check
        outcome.ok = True
        outcome.attempts = len(outcome.attempt_failures) + 1
        with agent.state.guard():
            _finish(agent, run_id, outcome, since=since.text)
            if _pool_remote(conn):
                pool_run.append(
                    agent.state.start_run(name, trigger, since.text, agent.now(), part=PART_POOL)
                )

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
            sending = await _produce(agent, conn, since, work)
        await _transfer_with_retries(agent, conn, expected, sending, outcome, run_id, uploaded)
        outcome.ok = True
    except PushFailure as exc:
        _failed(outcome, exc.failure)
        if exc.fingerprint:
            outcome.fingerprint, outcome.key_type = exc.fingerprint, exc.key_type
        if exc.fingerprint and exc.failure.category is Category.NEW_FINGERPRINT:
            agent.state.update(name, seen_fingerprint=exc.fingerprint)
    except StateUnavailable:
        raise  # the state file cannot be written: one line; the daemon finishes the row later
    except Exception as exc:  # a run must always end recorded and classified
        _failed(outcome, classify(exc, "sftp", conn.host, conn.port))
    finally:
        work.unlink(missing_ok=True)
    if outcome.failure is not None:
        outcome.attempts = len(outcome.attempt_failures)
    elif not pool_run:
        outcome.attempts = len(outcome.attempt_failures) + 1
    if outcome.pool_attempts:
        outcome.pool_attempts = len(outcome.pool_attempt_failures) + (
            0 if outcome.pool_failure else 1
        )
    with agent.state.guard():
        if not (outcome.ok and pool_run):  # not finished yet when the upload was done
            _finish(agent, run_id, outcome, since=since.text)
        if pool_run:
            _finish_pool(agent, pool_run[0], conn, outcome)
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
        attempt_causes=attempt_causes(outcome.attempt_failures),
        pool_category=str(outcome.pool_failure.category) if outcome.pool_failure else None,
        pool_cause=outcome.pool_failure.cause if outcome.pool_failure else None,
    )
    if trigger == "scheduled":
        if failure is not None:
            mail_failure(agent, name, conn.notify, started, failure, outcome.attempt_failures)
        if outcome.pool_failure is not None:
            mail_failure(
                agent,
                name,
                conn.notify,
                started,
                outcome.pool_failure,
                outcome.pool_attempt_failures,
                pool=True,
            )
    return outcome


def _failed(outcome: Outcome, failure: Failure) -> None:
    """Keep ``failure`` among the attempts' and report the first failure of the run."""
    if not outcome.attempt_failures or outcome.attempt_failures[-1] is not failure:
        outcome.attempt_failures.append(failure)
    outcome.ok = False
    outcome.failure = outcome.attempt_failures[0]


def stopped_failure(agent: Agent, run: dict[str, Any], taken_up: bool) -> Failure:
    """The agent stopped during ``run`` (killed, out of memory, the computer went down)."""
    when = run["started_at"].astimezone(agent.settings.zone)
    what = "the pool file pickup" if run.get("part") == PART_POOL else "the run"
    cause = f"the agent stopped during {what} started {when:%Y-%m-%d %H:%M:%S %Z}"
    if taken_up:
        cause += "; the daemon took the run up again when it started"
    return Failure(Category.AGENT_STOPPED, cause)


async def _produce(agent: Agent, conn: Connection, since: Since, work: Path) -> Path:
    """Make the file to send; a write that fails on a full local disk says so plainly."""
    try:
        return await asyncio.to_thread(produce, conn, since, work, agent.settings.command_timeout)
    except PushFailure as exc:
        # A command that fails on a full disk says "tr: write error" or the like: the disk
        # is the cause (checked while its partial output still fills it).
        full = _local_disk_full(agent, f"the export said: {exc.failure.cause}")
        if full is not None:
            raise full from None
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            said = f"writing the export failed: {exc.strerror}"
            raise _disk_full(agent.settings.work_dir, said) from None
        raise


def _local_disk_full(agent: Agent, said: str) -> PushFailure | None:
    """A full disk under the work folder, if it is (less than LOW_DISK_BYTES free)."""
    free = free_bytes(agent.settings.work_dir)
    if free is None or free >= LOW_DISK_BYTES:
        return None
    return _disk_full(agent.settings.work_dir, said, free)


def _disk_full(folder: Path, said: str, free: int | None = None) -> PushFailure:
    shown = f"{free} bytes free" if free is not None else "no space left"
    cause = f"the local disk holding {folder} is full ({shown}; {said})"
    return PushFailure(Failure(Category.LOCAL_DISK, cause))


async def _transfer_with_retries(
    agent: Agent,
    conn: Connection,
    expected: str | None,
    sending: Path | None,
    outcome: Outcome,
    run_id: int,
    uploaded: Callable[[Path], None],
) -> None:
    """One session per attempt; transient failures are retried with a doubling pause.

    The upload is never sent twice: once it is done, only the pool pickup is tried again. A
    pool pickup that fails after the upload is kept in ``outcome.pool_failure`` (not raised);
    when the connection sends nothing, the pool pickup is the run itself."""
    retries = agent.settings.retries
    pool = _pool_remote(conn)
    upload_done = sending is None
    for attempt in range(retries + 1):
        in_pool = upload_done and sending is not None
        try:
            async with open_session(endpoint_for(agent, conn, expected)) as session:
                _record_host_key(outcome, session)
                if not upload_done:
                    assert sending is not None
                    await _clean_earlier_temps(agent, conn.name, session)
                    name = remote_name_for(conn, sending)

                    def remember(temp: str) -> None:
                        agent.state.add_remote_temp(run_id, temp)

                    outcome.bytes = await session.upload(
                        sending, conn.remote_dir, name, on_temp=remember
                    )
                    outcome.remote_file = posixpath.join(conn.remote_dir, name)
                    upload_done = True
                    uploaded(sending)
                    in_pool = True
                if pool is not None and conn.pool_local:
                    if in_pool:
                        outcome.pool_attempts += 1
                    await session.download(pool, Path(conn.pool_local))
                    outcome.pool_file = conn.pool_local
            return
        except PushFailure as exc:
            failures = outcome.pool_attempt_failures if in_pool else outcome.attempt_failures
            failures.append(exc.failure)
            if not exc.failure.transient or attempt == retries:
                if in_pool:
                    outcome.pool_failure = failures[0]
                    return
                raise
            pause = agent.settings.retry_backoff * (2**attempt)
            agent.log.warning(
                "attempt_failed",
                connection=conn.name,
                attempt=attempt + 1,
                part="pool" if in_pool else "upload",
                category=str(exc.failure.category),
                cause=exc.failure.cause,
                retry_in=pause,
            )
            await asyncio.sleep(pause)


def _pool_remote(conn: Connection) -> str | None:
    """The pool file's path on the server (None: this connection picks up none)."""
    if not (conn.pool_remote and conn.pool_local):
        return None
    remote = conn.pool_remote
    return remote if remote.startswith("/") else posixpath.join(conn.remote_dir, remote)


async def _clean_earlier_temps(agent: Agent, name: str, session: Session) -> None:
    """Temporary names an earlier run left on the server when the agent stopped mid-upload
    (or the connection dropped before it could remove them): removed before this upload."""
    stale = agent.state.stale_temps(name)
    for paths in stale.values():
        for path in paths:
            await session.discard(path)
    if stale:
        removed = [path for paths in stale.values() for path in paths]
        agent.log.info("stale_temporary_files_removed", connection=name, files=removed)
    agent.state.forget_temps(list(stale))


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


def _failure_of(run: dict[str, Any] | None) -> str | None:
    if run is None:
        return None
    if run.get("part") == PART_POOL:
        return "pool file pickup"
    return "connection test" if run["trigger"] == "test" else f"{run['trigger']} run"


def _stored_causes(run: dict[str, Any] | None) -> list[dict[str, str]]:
    if run is None:
        return []
    if run.get("attempt_causes"):
        return list(json.loads(run["attempt_causes"]))
    return [{"category": run["category"], "cause": run["cause"]}] if run["cause"] else []


def _older(failure: dict[str, Any] | None, success: dict[str, Any] | None) -> bool:
    """Did ``success`` end after ``failure``? (finish times; a resumed run keeps its id)."""
    if failure is None or success is None:
        return False
    if failure["finished_at"] is None or success["finished_at"] is None:
        return bool(failure["id"] < success["id"])
    return bool((failure["finished_at"], failure["id"]) < (success["finished_at"], success["id"]))


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
                # What failed: a transfer run, its pool file pickup, or a connection test.
                "last_failure_of": _failure_of(failure),
                # Every attempt of that run, oldest first: [{"category", "cause"}, ...].
                "last_failure_attempts": _stored_causes(failure),
                # A later success followed it: history, not the connection's present state.
                "last_failure_older": _older(failure, success),
                "next_run": next_run(agent, row),
                "verified_fingerprint": row["pinned_fingerprint"],
                "seen_fingerprint": row["seen_fingerprint"],
                "tested_at": row["test_passed_at"],
                "blocked": blocked,
            }
        )
    return entries
