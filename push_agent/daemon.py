"""``ingest-push daemon``: run every connection on its schedule.

Each connection remembers the last scheduled instant it handled (its anchor). At every tick,
a connection whose latest scheduled instant is after its anchor is due: the anchor moves to
that instant and the run starts. Missed instants (the machine was off) are caught up once,
never several times. The clock is injected, so tests drive days of schedule in milliseconds.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from ingest_core.errors import IngestError
from ingest_core.lifecycle import run_until_signalled
from ingest_core.schedule import wait_until
from push_agent import runs
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.runs import Outcome, connection_lock


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
    """Run everything due now (concurrently); returns the outcomes."""
    now = agent.now()
    due = due_connections(agent, now)
    results = await asyncio.gather(*(_run_due(agent, name, at) for name, at in due))
    return [r for r in results if r is not None]


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
    """Serve until SIGTERM or SIGINT; a run in progress finishes first."""
    run_until_signalled(lambda stop: serve(agent, stop))
