"""The nightly schedule across the 2026 and 2027 DST changes, catch-up once, never twice.

Pure functions with an injected clock; the daemon tests drive a fake clock, never sleep.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from ingest_core.schedule import Daily, local_date, parse_hhmm
from ingest_core.settings import ScheduleSettings
from ingest_core.structured_log import read_events
from loader.daemon import LOAD_JOB, POOL_JOB, LoaderDaemon, due_run, read_last_done, write_last_done

NY = ZoneInfo("America/New_York")
SYD = ZoneInfo("Australia/Sydney")


def z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def runs(zone: ZoneInfo, at: str, start_utc: str, count: int) -> list[str]:
    daily = Daily(parse_hhmm(at), zone)
    now = z(start_utc)
    out = []
    for _ in range(count):
        now = daily.next_after(now)
        out.append(now.astimezone(UTC).strftime("%m-%dT%H:%MZ"))
    return out


# (zone, local time, start instant, the next runs in UTC): computed by hand from the offsets.
CASES = [
    # New York 2026: spring forward Sun Mar 8 02:00 EST -> 03:00 EDT.
    # 00:00 the day after the change is APScheduler's skipped run (#606): it must be there.
    (NY, "00:00", "2026-03-06T12:00Z", ["03-07T05:00Z", "03-08T05:00Z", "03-09T04:00Z"]),
    (NY, "02:30", "2026-03-06T12:00Z", ["03-07T07:30Z", "03-08T07:30Z", "03-09T06:30Z"]),
    (NY, "03:00", "2026-03-06T12:00Z", ["03-07T08:00Z", "03-08T07:00Z", "03-09T07:00Z"]),
    # New York 2026: fall back Sun Nov 1 02:00 EDT -> 01:00 EST; 01:30 happens twice: run once.
    (NY, "01:30", "2026-10-30T12:00Z", ["10-31T05:30Z", "11-01T05:30Z", "11-02T06:30Z"]),
    (NY, "00:00", "2026-10-30T12:00Z", ["10-31T04:00Z", "11-01T04:00Z", "11-02T05:00Z"]),
    (NY, "03:00", "2026-10-30T12:00Z", ["10-31T07:00Z", "11-01T08:00Z", "11-02T08:00Z"]),
    # New York 2027: Mar 14 and Nov 7.
    (NY, "00:00", "2027-03-12T12:00Z", ["03-13T05:00Z", "03-14T05:00Z", "03-15T04:00Z"]),
    (NY, "02:30", "2027-03-12T12:00Z", ["03-13T07:30Z", "03-14T07:30Z", "03-15T06:30Z"]),
    (NY, "01:30", "2027-11-05T12:00Z", ["11-06T05:30Z", "11-07T05:30Z", "11-08T06:30Z"]),
    (NY, "03:00", "2027-11-05T12:00Z", ["11-06T07:00Z", "11-07T08:00Z", "11-08T08:00Z"]),
    # Sydney 2026: DST ends Sun Apr 5 03:00 AEDT -> 02:00 AEST (02:30 happens twice).
    (SYD, "02:30", "2026-04-03T12:00Z", ["04-03T15:30Z", "04-04T15:30Z", "04-05T16:30Z"]),
    (SYD, "00:00", "2026-04-03T12:00Z", ["04-03T13:00Z", "04-04T13:00Z", "04-05T14:00Z"]),
    # Sydney 2026: DST starts Sun Oct 4 02:00 AEST -> 03:00 AEDT (02:30 does not exist).
    (SYD, "02:30", "2026-10-02T12:00Z", ["10-02T16:30Z", "10-03T16:30Z", "10-04T15:30Z"]),
    (SYD, "03:00", "2026-10-02T12:00Z", ["10-02T17:00Z", "10-03T16:00Z", "10-04T16:00Z"]),
    # Sydney 2027: Apr 4 and Oct 3.
    (SYD, "02:30", "2027-04-02T12:00Z", ["04-02T15:30Z", "04-03T15:30Z", "04-04T16:30Z"]),
    (SYD, "02:30", "2027-10-01T12:00Z", ["10-01T16:30Z", "10-02T16:30Z", "10-03T15:30Z"]),
    (SYD, "00:00", "2027-10-01T12:00Z", ["10-01T14:00Z", "10-02T14:00Z", "10-03T13:00Z"]),
]


@pytest.mark.parametrize(("zone", "at", "start", "expected"), CASES)
def test_next_runs_across_dst(zone, at, start, expected):
    assert runs(zone, at, start, 3) == expected


@pytest.mark.parametrize("zone", [NY, SYD])
@pytest.mark.parametrize("at", ["00:00", "01:30", "02:00", "02:30", "03:00", "23:30"])
@pytest.mark.parametrize("year", [2026, 2027])
def test_exactly_one_run_per_local_day_all_year(zone, at, year):
    daily = Daily(parse_hhmm(at), zone)
    now = datetime(year, 1, 1, tzinfo=zone).astimezone(UTC) - timedelta(seconds=1)
    days = []
    while True:
        now = daily.next_after(now)
        if now.astimezone(zone).year != year:
            break
        days.append(local_date(now, zone))
    first = datetime(year, 1, 1).date()
    assert days == [(first + timedelta(days=i)).isoformat() for i in range(len(days))]
    assert len(days) == 365


def test_catch_up_once_after_a_restart():
    daily = Daily(parse_hhmm("03:00"), NY)
    now = z("2026-11-23T10:00Z")  # 05:00 local, the 03:00 run was missed
    due, baseline = due_run(daily, "2026-11-20", now, catch_up=True)
    assert due == z("2026-11-23T08:00Z") and baseline is None
    # done: the same clock (or a restart right after) finds nothing due: never twice
    assert due_run(daily, local_date(due, NY), now, catch_up=True) == (None, None)
    # before today's run nothing was missed since yesterday's
    assert due_run(daily, "2026-11-22", z("2026-11-23T07:59Z"), True) == (None, None)


def test_catch_up_off_and_first_start_record_a_baseline_without_running():
    daily = Daily(parse_hhmm("03:00"), NY)
    now = z("2026-11-23T10:00Z")
    assert due_run(daily, "2026-11-20", now, catch_up=False) == (None, "2026-11-23")
    assert due_run(daily, None, now, catch_up=True) == (None, "2026-11-23")
    assert due_run(daily, "2026-11-23", now, catch_up=False) == (None, None)


class FakeClock:
    """A UTC clock that moves ``tick`` per reading and stops the daemon at ``end``."""

    def __init__(self, start: datetime, tick: timedelta, end: datetime | None = None) -> None:
        self.t = start
        self.tick = tick
        self.end = end
        self.stop: asyncio.Event | None = None

    def __call__(self) -> datetime:
        self.t += self.tick
        if self.end is not None and self.t >= self.end and self.stop is not None:
            self.stop.set()
        return self.t


async def _run_until_waiting(daemon: LoaderDaemon, stop: asyncio.Event) -> None:
    task = asyncio.create_task(daemon.run(stop))
    while daemon.waiting != {LOAD_JOB, POOL_JOB} and not task.done():
        await asyncio.sleep(0.01)
    stop.set()
    await task


def test_daemon_catches_up_a_missed_load_once_never_twice(acme, kit):
    s = acme.settings.replace(loader=acme.settings.loader.__class__(precheck=False))
    kit.write_data(acme.data_file, 4)
    write_last_done(s, LOAD_JOB, "2026-11-20")
    clock = FakeClock(z("2026-11-23T10:00Z"), timedelta(0))

    daemon = LoaderDaemon(s, now=clock, step=0.01, in_process=True)
    asyncio.run(_run_until_waiting(daemon, asyncio.Event()))
    assert daemon.job_runs == [(LOAD_JOB, "2026-11-23")]
    assert not acme.data_file.exists()  # the catch-up load really ran
    assert read_last_done(s, LOAD_JOB) == "2026-11-23"
    assert read_last_done(s, POOL_JOB) == "2026-11-23"  # first start: baseline, no run

    again = LoaderDaemon(s, now=clock, step=0.01, in_process=True)
    asyncio.run(_run_until_waiting(again, asyncio.Event()))
    assert again.job_runs == []


def test_daemon_runs_each_job_once_per_local_day_across_fall_back(settings):
    schedule = ScheduleSettings(timezone="America/New_York", loader_time="01:30", pool_time="00:00")
    s = settings.replace(schedule=schedule, loader=settings.loader.__class__(precheck=False))
    clock = FakeClock(z("2026-10-30T16:00Z"), timedelta(minutes=7), end=z("2026-11-03T16:00Z"))

    async def main() -> LoaderDaemon:
        stop = asyncio.Event()
        clock.stop = stop
        daemon = LoaderDaemon(s, now=clock, step=0.001, in_process=True)
        await daemon.run(stop)
        return daemon

    daemon = asyncio.run(main())
    days = ["2026-10-31", "2026-11-01", "2026-11-02", "2026-11-03"]
    assert sorted(d for j, d in daemon.job_runs if j == LOAD_JOB) == days
    assert sorted(d for j, d in daemon.job_runs if j == POOL_JOB) == days


def test_daemon_runs_loads_in_a_child_process(acme, kit):
    """The production path: the load runs in a spawned child, not in the event loop."""
    s = acme.settings.replace(loader=acme.settings.loader.__class__(precheck=False))
    kit.write_data(acme.data_file, 4)
    write_last_done(s, LOAD_JOB, "2026-11-20")
    daemon = LoaderDaemon(s, now=FakeClock(z("2026-11-23T10:00Z"), timedelta(0)), step=0.01)
    asyncio.run(_run_until_waiting(daemon, asyncio.Event()))
    assert daemon.job_runs == [(LOAD_JOB, "2026-11-23")]
    assert not acme.data_file.exists()
    events = [e for e in read_events(s.log_dir, "loader") if e["event"] == "load_done"]
    assert events and events[-1]["rows"] == 4


def test_child_runner_survives_a_child_that_dies():
    """A load child killed (OOM, kill -9) breaks only that call; the next one gets a new child."""
    import os
    from concurrent.futures.process import BrokenProcessPool

    from loader.daemon import ChildRunner

    runner = ChildRunner()
    try:
        first = runner.call(os.getpid)
        assert first != os.getpid()
        with pytest.raises(BrokenProcessPool):
            runner.call(os._exit, 9)
        second = runner.call(os.getpid)
        assert second not in (first, os.getpid())
    finally:
        runner.close()
