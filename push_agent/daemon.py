"""``ingest-push daemon``: run every connection on its schedule.

Each connection remembers the last scheduled instant it handled (its anchor). At every tick,
a connection whose latest scheduled instant is after its anchor is due: the anchor moves to
that instant and the run starts. Missed instants (the machine was off) are caught up once,
never several times. The clock is injected, so tests drive days of schedule in milliseconds.

The anchor moves before the run, so a run the agent stops in (killed, out of memory, a
reboot) is not repeated forever; instead, every tick finishes the runs the agent stopped in
(:func:`recover_interrupted`): a scheduled run is taken up again once, under the same row; if
the agent stops in it a second time, it is recorded failed and mailed, and the next attempt is
the next scheduled instant. One daemon per state folder: a second one refuses to start
(``daemon.lock``, an flock the kernel drops with the process, so a kill -9 leaves nothing
that blocks the next start).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from ingest_core.errors import IngestError, Refused
from ingest_core.lifecycle import run_until_signalled
from ingest_core.schedule import wait_until
from push_agent import runs
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.failures import Category, Failure
from push_agent.notify import mail_failure
from push_agent.runs import Outcome, connection_lock
from push_agent.state import PART_POOL

DAEMON_LOCK = "daemon.lock"


@contextmanager
def daemon_lock(agent: Agent) -> Iterator[None]:
    """Hold the state folder's daemon lock (its file holds our PID) or refuse in one line."""
    path = agent.settings.state_dir / DAEMON_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            raise Refused(
                f"another ingest-push daemon (PID {holder}) already runs on this configuration "
                f"(state folder {agent.settings.state_dir}): one daemon runs every connection; "
                "stop that one first if you want to start it again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)


async def recover_interrupted(agent: Agent) -> list[Outcome]:
    """Finish every run the agent stopped in (its connection's lock is free: nobody runs it).

    A scheduled run is taken up again once; a second stop in the same run, a stop in a pool
    file pickup, a manual run or a test is recorded failed with its cause (scheduled ones
    mailed)."""
    outcomes = []
    for run in agent.state.unfinished_runs():
        name = run["connection"]
        try:
            with connection_lock(agent, name):
                current = agent.state.get_run(run["id"])
                if current is None or current["finished_at"] is not None:
                    continue  # it finished meanwhile
                outcome = await _recover(agent, current)
        except IngestError as exc:  # busy: that run is alive in another process
            agent.log.info("recovery_deferred", connection=name, run=run["id"], reason=str(exc))
            continue
        outcomes.append(outcome)
    return outcomes


async def _recover(agent: Agent, run: dict[str, Any]) -> Outcome:
    name = run["connection"]
    row = agent.state.get(name)
    scheduled = run["trigger"] == "scheduled"
    blocked = runs.blocked_reason(row) if row is not None else "the connection was deleted"
    if scheduled and run["part"] is None and not run["restarts"] and blocked is None:
        agent.log.warning("run_resumed", connection=name, run=run["id"])
        return await runs.run_locked(agent, name, "scheduled", resume=run)
    first = runs.stopped_failure(agent, run, taken_up=bool(run["restarts"]))
    attempts = [first]
    if run["restarts"]:
        again = runs.stopped_failure(agent, run, taken_up=False)
        cause = f"{again.cause} a second time, after the daemon took it up again"
        if row is not None:
            cause += f"; it is not tried again before the next scheduled run, {_next(agent, row)}"
        attempts.append(Failure(Category.AGENT_STOPPED, cause))
    elif run["part"] == PART_POOL:
        attempts[0] = Failure(
            Category.AGENT_STOPPED,
            f"{first.cause} (the upload had finished); the next run fetches the pool file again",
        )
    elif run["trigger"] == "manual":
        attempts[0] = Failure(Category.AGENT_STOPPED, f"{first.cause}: run it again")
    elif run["trigger"] == "test":
        attempts[0] = Failure(Category.AGENT_STOPPED, f"{first.cause}: test again")
    elif blocked is not None:
        attempts[0] = Failure(
            Category.AGENT_STOPPED, f"{first.cause}; not taken up again: {blocked}"
        )
    failure = attempts[0]
    causes = runs.attempt_causes(attempts)
    with agent.state.guard():
        agent.state.finish_run(
            run["id"],
            False,
            attempts=len(attempts),
            category=str(failure.category),
            message=failure.message,
            cause=failure.cause,
            attempt_causes=json.dumps(causes),
        )
    agent.log.warning(
        "run_stopped_recorded",
        connection=name,
        run=run["id"],
        trigger=run["trigger"],
        part=run["part"],
        attempt_causes=causes,
    )
    if scheduled and row is not None:
        notify = Connection.from_row(row).notify
        mail_failure(
            agent,
            name,
            notify,
            run["started_at"],
            failure,
            attempts,
            pool=run["part"] == PART_POOL,
        )
    return Outcome(name, ok=False, failure=failure, attempt_failures=attempts)


def _next(agent: Agent, row: dict[str, Any]) -> str:
    at = runs.next_run(agent, row).astimezone(agent.settings.zone)
    return f"{at:%Y-%m-%d %H:%M %Z}"


def due_connections(agent: Agent, now: datetime) -> list[tuple[str, datetime]]:
    """(name, scheduled instant) of every connection due at ``now``."""
    due = []
    for row in agent.state.all():
        latest = Connection.from_row(row).schedule(agent).last_at_or_before(now)
        if latest > row["schedule_anchor"]:
            due.append((row["name"], latest))
    return due


async def _run_due(agent: Agent, name: str, scheduled: datetime) -> Outcome | None:
    try:
        with connection_lock(agent, name):
            # Moved before the run: a crash mid-run must not repeat the same instant forever.
            agent.state.update(name, schedule_anchor=scheduled)
            row = agent.state.get(name)
            if row is None:
                return None
            blocked = runs.blocked_reason(row)
            if blocked:
                agent.log.warning("run_blocked", connection=name, reason=blocked)
                return Outcome(name, ok=False, blocked=blocked)
            return await runs.run_locked(agent, name, "scheduled")
    except IngestError as exc:  # busy with a manual run: try again at the next tick
        agent.log.warning("run_deferred", connection=name, reason=str(exc))
        return None


async def tick(agent: Agent) -> list[Outcome]:
    """Finish the runs the agent stopped in, then run everything due now (concurrently);
    returns the outcomes."""
    recovered = await recover_interrupted(agent)
    now = agent.now()
    due = due_connections(agent, now)
    results = await asyncio.gather(*(_run_due(agent, name, at) for name, at in due))
    return recovered + [r for r in results if r is not None]


def next_wakeup(agent: Agent) -> datetime | None:
    upcoming = [runs.next_run(agent, row) for row in agent.state.all()]
    return min(upcoming) if upcoming else None


async def serve(agent: Agent, stop: asyncio.Event) -> None:
    """Tick, sleep until the next scheduled instant (re-reading connections), repeat."""
    agent.log.info("daemon_started", connections=len(agent.state.all()))
    step = agent.settings.daemon_step
    while not stop.is_set():
        try:
            await tick(agent)
            wake = next_wakeup(agent)
        except IngestError as exc:  # a full disk under the state file, say: one plain line
            agent.log.error("tick_failed", error=str(exc))
            wake = None
        except Exception as exc:  # a bad row or a locked state file must not end the daemon
            agent.log.exception("tick_failed", error=str(exc))
            wake = None
        now = agent.now()
        # Connections may be added or edited meanwhile: never sleep longer than one step.
        target = min(wake, now + timedelta(seconds=step)) if wake else now + timedelta(seconds=step)
        if not await wait_until(target, agent.now, step=step, stop=stop):
            break
    agent.log.info("daemon_stopped")


def run_daemon(agent: Agent) -> None:
    """Serve until SIGTERM or SIGINT; a run in progress finishes first. Refused (one line
    naming the running one's PID) when another daemon already serves this state folder."""
    with daemon_lock(agent):
        run_until_signalled(lambda stop: serve(agent, stop))
