"""DST-correct schedules shared by the loader daemon and the push agent.

A daily run at local time T on day D is ``datetime.combine(D, T, tzinfo=zone)``; the next run
is the first such instant strictly after now. That rule never skips the 00:00 run after a
spring-forward change and never doubles a run in the repeated fall-back hour (APScheduler's
issues #606 and #529 are exactly those two bugs). A wall time that does not exist (02:30 on
spring-forward day) runs at the same UTC instant the previous offset gives (03:30 new time);
an ambiguous one runs at its first occurrence.

Everything here is a pure function of an injected "now", except :func:`wait_until`, which
sleeps in short steps against the UTC clock so a suspended machine or a clock step is noticed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from ingest_core.errors import Refused

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_hhmm(text: str) -> time:
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", text.strip())
    if not match:
        raise Refused(f"{text!r} is not a time of day; accepted: HH:MM in 24-hour form")
    return time(int(match.group(1)), int(match.group(2)))


def _at(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of wall time ``at`` on ``day`` in ``zone`` (fold=0)."""
    return datetime.combine(day, at, tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class Daily:
    """Every day at a local wall-clock time."""

    at: time
    zone: ZoneInfo

    def next_after(self, now: datetime) -> datetime:
        day = now.astimezone(self.zone).date() - timedelta(days=1)
        while True:
            candidate = _at(day, self.at, self.zone)
            if candidate > now:
                return candidate
            day += timedelta(days=1)

    def last_at_or_before(self, now: datetime) -> datetime:
        day = now.astimezone(self.zone).date() + timedelta(days=1)
        while True:
            candidate = _at(day, self.at, self.zone)
            if candidate <= now:
                return candidate
            day -= timedelta(days=1)

    def describe(self) -> str:
        return f"daily at {self.at:%H:%M} {self.zone.key}"


@dataclass(frozen=True)
class Weekly:
    """One day a week at a local wall-clock time (weekday 0 = Monday)."""

    weekday: int
    at: time
    zone: ZoneInfo

    def next_after(self, now: datetime) -> datetime:
        day = now.astimezone(self.zone).date() - timedelta(days=1)
        while True:
            if day.weekday() == self.weekday:
                candidate = _at(day, self.at, self.zone)
                if candidate > now:
                    return candidate
            day += timedelta(days=1)

    def last_at_or_before(self, now: datetime) -> datetime:
        day = now.astimezone(self.zone).date() + timedelta(days=1)
        while True:
            if day.weekday() == self.weekday:
                candidate = _at(day, self.at, self.zone)
                if candidate <= now:
                    return candidate
            day -= timedelta(days=1)

    def describe(self) -> str:
        return f"weekly on {WEEKDAYS[self.weekday]} at {self.at:%H:%M} {self.zone.key}"


@dataclass(frozen=True)
class EveryHours:
    """Every N hours of elapsed time, on whole UTC hours (DST cannot bunch or gap them)."""

    hours: int

    def next_after(self, now: datetime) -> datetime:
        hour = int(now.timestamp() // 3600) + 1
        hour += (-hour) % self.hours
        return datetime.fromtimestamp(hour * 3600, UTC)

    def last_at_or_before(self, now: datetime) -> datetime:
        return self.next_after(now - timedelta(hours=self.hours))

    def describe(self) -> str:
        return "hourly" if self.hours == 1 else f"every {self.hours} hours"


Frequency = Daily | Weekly | EveryHours


def parse_frequency(text: str, zone: ZoneInfo) -> Frequency:
    """``hourly``, ``every N hours``, ``daily HH:MM``, ``weekly DAY HH:MM``."""
    words = text.strip().lower().split()
    accepted = "accepted: hourly, 'every N hours', 'daily HH:MM', 'weekly mon HH:MM'"
    if words == ["hourly"]:
        return EveryHours(1)
    every = len(words) == 3 and words[0] == "every" and words[2] in ("hour", "hours")
    if every and words[1].isdigit() and 1 <= int(words[1]) <= 168:
        return EveryHours(int(words[1]))
    if len(words) == 2 and words[0] == "daily":
        return Daily(parse_hhmm(words[1]), zone)
    if len(words) == 3 and words[0] == "weekly" and words[1][:3] in WEEKDAYS:
        return Weekly(WEEKDAYS.index(words[1][:3]), parse_hhmm(words[2]), zone)
    raise Refused(f"{text!r} is not a transfer frequency; {accepted}")


def local_date(instant: datetime, zone: ZoneInfo) -> str:
    """The local calendar date a run belongs to (what 'last completed date' records)."""
    return instant.astimezone(zone).date().isoformat()


def missed_run(
    freq: Frequency, last_done_local_date: str | None, now: datetime, zone: ZoneInfo
) -> datetime | None:
    """The most recent scheduled instant not yet done, if any (catch up once, never twice)."""
    latest = freq.last_at_or_before(now)
    if last_done_local_date is not None and local_date(latest, zone) <= last_done_local_date:
        return None
    return latest


async def wait_until(
    when: datetime,
    now: Callable[[], datetime] = utc_now,
    step: float = 30.0,
    stop: asyncio.Event | None = None,
) -> bool:
    """Sleep until ``when`` in short steps; returns False if ``stop`` was set first."""
    while True:
        remaining = (when - now()).total_seconds()
        if remaining <= 0:
            return True
        delay = min(step, remaining)
        if stop is None:
            await asyncio.sleep(delay)
            continue
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
            return False
        except TimeoutError:
            continue
